"""Fine-tuning: only adapters train, the loss falls, t, accumulation, resume, NaN and checkpoint safety."""

from __future__ import annotations

import errno
import json
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from mitune.mi.pipeline import encode_prompts, index_embedding, latent_shape, null_embedding
from mitune.models.adapters import AdapterConfig
from mitune.models.loading import load_pipeline
from mitune.rounds.data import EMPTY_PROMPT, FinetuneData, FinetuneSet, RoundSet
from mitune.rounds.loop import MIRounds
from mitune.rounds.module import MITuneModule, TrainConfig, accumulation_steps
from mitune.rounds.settings import GenerationConfig
from mitune.runs import checkpoints as ckpt
from mitune.runs.artifacts import METADATA, RoundDir
from mitune.runs.checkpoints import SafetensorsCheckpointIO, flatten, latest_checkpoint, unflatten

PROMPTS = ["a red cube", "a blue ball"]
ADAPTER = AdapterConfig(rank=4, alpha=4)  # DoRA on attention + feed-forward, as the paper


def make_module(tiny: Path, dtype: str = "float32", **train: object) -> MITuneModule:
    """A fresh pipeline with a fresh adapter (seeded), prompts set for a fixed two-latent set."""
    module = MITuneModule(load_pipeline(str(tiny), torch_dtype=dtype), ADAPTER, TrainConfig(**train))
    module.set_prompts(PROMPTS)
    return module


def tiny_set(module: MITuneModule, steps: int, batch: int, t_range: tuple[int, int] = (500, 1000)) -> FinetuneSet:
    """Two fixed latents, one per prompt, served for ``steps`` optimizer steps of ``batch`` samples."""
    latents = torch.randn(latent_shape(module.pipe, 2), generator=torch.Generator().manual_seed(1))
    return loaded_set(latents, torch.tensor([0, 1]), steps * batch, t_range)


def loaded_set(latents: torch.Tensor, prompt_index: torch.Tensor, length: int, t_range: tuple[int, int]) -> FinetuneSet:
    """A set with round 1's latents loaded, as the rounds callback loads them."""
    dataset = FinetuneSet(length, seed=0, t_range=t_range)
    dataset.load(round_set(latents, prompt_index))
    return dataset


def round_set(latents: torch.Tensor, prompt_index: torch.Tensor) -> RoundSet:
    """Round 1's set: ``latents``, each of the prompt ``prompt_index`` points to."""
    prompts = [f"prompt {i}" for i in range(int(prompt_index.max()) + 1)]
    return RoundSet(1, latents, prompts, prompt_index)


def fit(module: MITuneModule, dataset: Dataset, micro_batch: int, accumulate: int, steps: int,
        callbacks: Sequence[L.Callback] = (), root: Path | None = None) -> None:
    """Lightning fit with the production optimisation settings (clipping, accumulation, checkpoint IO)."""
    callbacks = list(callbacks)
    trainer = L.Trainer(
        max_steps=steps, accumulate_grad_batches=accumulate, gradient_clip_val=1.0, callbacks=callbacks,
        plugins=[SafetensorsCheckpointIO()], use_distributed_sampler=False, logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), default_root_dir=root,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(dataset, batch_size=micro_batch))


def adapter_weights(module: MITuneModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class Recorder(L.Callback):
    """Every micro-batch's loss, timesteps and logged t_mean; raises at ``crash_at`` global step."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.crash_at = crash_at
        self.losses: list[float] = []
        self.t: list[torch.Tensor] = []
        self.logged_t_mean: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.crash_at:
            raise RuntimeError(f"simulated crash at global step {self.crash_at}")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())
        self.t.append(batch["t"].clone())
        self.logged_t_mean.append(trainer.callback_metrics["train/t_mean"].item())


# ----------------------------------------------------------------------------- what trains


def test_training_moves_only_adapter_weights(tiny_sd_path):
    module = make_module(tiny_sd_path, lr=1e-3)
    parts = {"unet": module.pipe.unet, "vae": module.pipe.vae, "text_encoder": module.pipe.text_encoder}
    named = {f"{part}.{n}": p for part, m in parts.items() for n, p in m.named_parameters()}
    adapter = {n for n in named if "lora_" in n}
    assert adapter and {id(named[n]) for n in adapter} == {id(p) for p in module.trainable}
    before = {n: p.detach().clone() for n, p in named.items()}

    fit(module, tiny_set(module, steps=3, batch=2), micro_batch=2, accumulate=1, steps=3)

    moved = {n for n, p in named.items() if not torch.equal(p, before[n])}
    assert moved == adapter
    assert set(module.state_dict()) == adapter  # checkpoints hold exactly the adapter


def test_loss_falls_on_a_tiny_overfit_set(tiny_sd_path):
    module = make_module(tiny_sd_path, lr=1e-2)
    sample = tiny_set(module, steps=1, batch=2, t_range=(500, 510))
    fixed = [sample[0], sample[1]] * 40  # the same two (latent, prompt, t, noise) in every step
    recorder = Recorder()
    fit(module, fixed, micro_batch=2, accumulate=1, steps=40, callbacks=[recorder])
    first, last = recorder.losses[:5], recorder.losses[-5:]
    # Deterministic samples: a step that does not descend (no update, wrong sign, lost gradients)
    # leaves the loss flat or raises it. Rank-4 adapters on the tiny UNet get it from ~1.1 to ~0.87.
    assert sum(last) / 5 < 0.9 * sum(first) / 5, recorder.losses


class GradNorms(L.Callback):
    """Per optimizer step: the norm of all adapter gradients, concatenated in float64, and the logged one."""

    def __init__(self, accumulate: int) -> None:
        self.accumulate = accumulate
        self.expected: list[float] = []
        self.logged: list[float] = []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:  # runs before the module's hook
        grads = torch.cat([p.grad.double().flatten() for p in module.trainable])
        self.expected.append(torch.linalg.vector_norm(grads).item())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.accumulate == 0:
            self.logged.append(trainer.callback_metrics["train/grad_norm"].item())


def test_logged_grad_norm_is_the_total_norm_of_the_accumulated_adapter_gradients(tiny_sd_path):
    module = make_module(tiny_sd_path)
    recorder = GradNorms(accumulate=2)
    fit(module, tiny_set(module, steps=3, batch=4), micro_batch=2, accumulate=2, steps=3, callbacks=[recorder])
    assert len(recorder.expected) == len(recorder.logged) == 3
    assert recorder.logged == pytest.approx(recorder.expected, rel=1e-6)


def dora_magnitudes_moved(module: MITuneModule, lr: float) -> float:
    """Share of DoRA magnitude entries that one optimizer step at ``lr`` changes."""
    magnitudes = [p for n, p in module.named_parameters() if "lora_magnitude_vector" in n]
    before = [p.detach().clone() for p in magnitudes]
    fit(module, tiny_set(module, steps=1, batch=2), micro_batch=2, accumulate=1, steps=1)
    moved = sum((p != b).sum().item() for p, b in zip(magnitudes, before))
    return moved / sum(b.numel() for b in before)


def test_a_bf16_base_model_trains_fp32_adapters(tiny_sd_path):
    """Magnitudes are ~1, where bf16's step is 2**-7: AdamW's ~lr-sized updates vanish in bf16 weights."""
    module = make_module(tiny_sd_path, dtype="bfloat16", lr=1e-6)
    assert {p.dtype for p in module.trainable} == {torch.float32}
    assert module.unet.conv_in.weight.dtype == torch.bfloat16  # the frozen base stays in its dtype
    assert dora_magnitudes_moved(module, lr=1e-6) == 1.0
    states = [s for s in module.trainer.optimizers[0].state.values()]
    assert states and {s["exp_avg"].dtype for s in states} == {torch.float32}

    # The failure this guards against: the same step with the adapter kept in bf16 changes nothing.
    control = make_module(tiny_sd_path, dtype="bfloat16", lr=1e-6)
    for param in control.trainable:
        param.data = param.data.bfloat16()
    assert dora_magnitudes_moved(control, lr=1e-6) == 0.0


# ----------------------------------------------------------------------------- timesteps


def test_finetune_set_draws_t_in_its_range():
    latents = torch.zeros(3, 4, 2, 2)
    t = torch.stack([loaded_set(latents, torch.arange(3), 400, (500, 1000))[i]["t"]
                     for i in range(400)])
    assert t.min() >= 500 and t.max() < 1000
    assert (t < 750).sum() > 100 and (t >= 750).sum() > 100  # both halves, roughly evenly
    narrow = torch.stack([loaded_set(latents, torch.arange(3), 200, (10, 14))[i]["t"]
                          for i in range(200)])
    assert set(narrow.tolist()) == {10, 11, 12, 13}


def test_empty_prompt_samples_keep_their_t_and_noise_and_come_at_the_configured_rate():
    latents = torch.zeros(3, 4, 2, 2)
    plain = loaded_set(latents, torch.arange(3), 2000, (500, 1000))
    dropping = FinetuneSet(2000, seed=0, t_range=(500, 1000), empty_prompt_prob=0.25)
    dropping.load(round_set(latents, torch.arange(3)))
    items = [(plain[i], dropping[i]) for i in range(2000)]
    assert all(torch.equal(a["t"], b["t"]) and torch.equal(a["noise"], b["noise"]) for a, b in items)
    empty = [b["prompt"].item() == EMPTY_PROMPT for _, b in items]
    assert 0.22 < sum(empty) / len(empty) < 0.28
    assert all(a["prompt"] == b["prompt"] for (a, b), e in zip(items, empty) if not e)
    assert not any(a["prompt"].item() == EMPTY_PROMPT for a, _ in items)


@pytest.mark.parametrize("kind, train", [("sd", {}), ("sdxl", {}), ("sd", {"train_text_encoder": True})])
def test_empty_prompt_samples_are_conditioned_as_cfg_conditions_its_unconditional_branch(kind, train, request):
    module = make_module(request.getfixturevalue(f"tiny_{kind}_path"), **train)
    with torch.no_grad():
        emb = module.prompt_embedding(torch.tensor([1, EMPTY_PROMPT, 0]))
    prompts = encode_prompts(module.pipe, PROMPTS)
    expected = [index_embedding(prompts, torch.tensor([1])), null_embedding(module.pipe),
                index_embedding(prompts, torch.tensor([0]))]
    for row, want in enumerate(expected):
        got = index_embedding(emb, torch.tensor([row]))
        if isinstance(got, dict):
            assert {key: torch.equal(got[key], want[key]) for key in want} == dict.fromkeys(want, True), row
        else:
            assert torch.equal(got, want)
    if kind == "sdxl":  # force_zeros_for_empty_prompt: CFG's unconditional text parts are zeros, not encode("")
        assert not emb["encoder_hidden_states"][1].any()


@pytest.mark.slow
def test_training_uses_the_configured_t_range_and_logs_its_mean(tiny_sd_path, tmp_path):
    recorder = Recorder()
    run_rounds(tiny_sd_path, tmp_path, [recorder], rounds=1, t_min=200, t_max=300)
    t = torch.cat(recorder.t)
    assert len(t) == STEPS_PER_ROUND * EFFECTIVE and t.min() >= 200 and t.max() < 300
    assert len(set(t.tolist())) > 8  # drawn, not a constant
    expected = [batch.float().mean().item() for batch in recorder.t]
    assert recorder.logged_t_mean == pytest.approx(expected)


# ----------------------------------------------------------------------------- gradient accumulation


class GradRecorder(L.Callback):
    """The accumulated gradient of every optimizer step, before clipping."""

    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.grads.append([p.grad.detach().clone() for p in module.trainable])


def test_accumulation_matches_one_big_batch(tiny_sd_path):
    results = {}
    for micro, accumulate in [(8, 1), (2, 4), (4, 2)]:
        assert accumulation_steps(8, micro) == accumulate
        module = make_module(tiny_sd_path, effective_batch=8, micro_batch=micro)  # the paper's lr, 1e-4
        grads = GradRecorder()
        fit(module, tiny_set(module, steps=2, batch=8), micro_batch=micro, accumulate=accumulate, steps=2,
            callbacks=[grads])
        results[micro] = adapter_weights(module), grads.grads
    (weights, grads), *others = results.values()
    start = adapter_weights(make_module(tiny_sd_path))
    # Adam moves a weight by up to ~lr per step: 100x the tolerance below, so a different gradient shows.
    assert max((weights[k] - start[k]).abs().max() for k in weights) > 1e-4
    for other_weights, other_grads in others:
        for step, other_step in zip(grads, other_grads, strict=True):
            for g, h in zip(step, other_step, strict=True):
                torch.testing.assert_close(h, g, rtol=1e-4, atol=1e-7)
        for k in weights:
            torch.testing.assert_close(other_weights[k], weights[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("effective, micro, world", [(400, 7, 1), (10, 4, 2), (8, 16, 1)])
def test_unreachable_effective_batch_is_refused(effective, micro, world):
    with pytest.raises(ValueError, match=f"effective batch {effective} is not reachable with micro_batch {micro}"):
        accumulation_steps(effective, micro, world)


def test_accumulation_steps():
    assert accumulation_steps(400, 8) == 50
    assert accumulation_steps(400, 8, 2) == 25
    assert accumulation_steps(8, 8) == 1


# ----------------------------------------------------------------------------- rounds, crash and resume

STEPS_PER_ROUND, EFFECTIVE, MICRO = 4, 8, 2


def run_rounds(tiny: Path, out: Path, extra: list[L.Callback], *, rounds: int = 2, resume: bool = False,
               dtype: str = "float32", **train: object) -> MITuneModule:
    """The production wiring (MIRounds + FinetuneData + two ModelCheckpoints), small."""
    config = TrainConfig(effective_batch=EFFECTIVE, micro_batch=MICRO, steps_per_round=STEPS_PER_ROUND, **train)
    module = MITuneModule(load_pipeline(str(tiny), torch_dtype=dtype), ADAPTER, config)
    generation = GenerationConfig(num_candidates=4, top_k=1, num_inference_steps=3, micro_batch=8)
    mi_rounds = MIRounds(PROMPTS, generation, out, base_model=str(tiny))
    checkpoints = out / "checkpoints"
    callbacks = [
        mi_rounds,
        ModelCheckpoint(dirpath=checkpoints, filename="step-{step:06d}", every_n_train_steps=2, save_top_k=1),
        ModelCheckpoint(dirpath=checkpoints, filename="round-{epoch}", every_n_epochs=1, save_on_train_epoch_end=True,
                        save_top_k=-1),
        *extra,
    ]
    trainer = L.Trainer(
        max_epochs=rounds, accumulate_grad_batches=accumulation_steps(EFFECTIVE, MICRO), gradient_clip_val=1.0,
        callbacks=callbacks, plugins=[SafetensorsCheckpointIO()], use_distributed_sampler=False, logger=False,
        reload_dataloaders_every_n_epochs=1, default_root_dir=out, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=FinetuneData(config),
                ckpt_path=latest_checkpoint(checkpoints) if resume else None)
    return module


@pytest.fixture(scope="module")
def uninterrupted(tiny_sd_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    return adapter_weights(run_rounds(tiny_sd_path, out, [])), out


@pytest.mark.slow
@pytest.mark.parametrize("crash_at, resumed_from", [(3, 2), (4, 4), (7, 6)],
                         ids=["mid-round-1", "round-boundary", "mid-round-2"])
def test_resume_after_a_crash_is_exact(tiny_sd_path, tmp_path, uninterrupted, crash_at, resumed_from):
    expected, full_dir = uninterrupted
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_rounds(tiny_sd_path, tmp_path, [Recorder(crash_at=crash_at)])
    assert ckpt.read_state(latest_checkpoint(tmp_path / "checkpoints"))["global_step"] == resumed_from

    recorder = Recorder()
    resumed = adapter_weights(run_rounds(tiny_sd_path, tmp_path, [recorder], resume=True))

    # It continued from the checkpoint rather than training again from scratch.
    assert len(recorder.losses) == (2 * STEPS_PER_ROUND - resumed_from) * EFFECTIVE // MICRO
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    name = f"rounds/round_2/{METADATA}"
    assert (tmp_path / name).read_bytes() == (full_dir / name).read_bytes()


@pytest.mark.slow
def test_resume_of_a_bf16_model_is_exact(tiny_sd_path, tmp_path):
    """fp32 adapters on a bf16 base: the checkpoint restores them (and AdamW's state) bit for bit."""
    full = adapter_weights(run_rounds(tiny_sd_path, tmp_path / "full", [], dtype="bfloat16"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_rounds(tiny_sd_path, tmp_path / "crashed", [Recorder(crash_at=3)], dtype="bfloat16")
    resumed = adapter_weights(run_rounds(tiny_sd_path, tmp_path / "crashed", [], resume=True, dtype="bfloat16"))
    assert {v.dtype for v in resumed.values()} == {torch.float32}
    assert resumed.keys() == full.keys() and all(torch.equal(resumed[k], full[k]) for k in full)


# ----------------------------------------------------------------------------- train.restart (issue 31)


class RoundProbe(L.Callback):
    """The adapter and the optimizer's state count as each round's training starts and ends (after MIRounds' hook)."""

    def __init__(self) -> None:
        self.start: list[dict[str, torch.Tensor]] = []
        self.end: list[dict[str, torch.Tensor]] = []
        self.optimizer_states: list[int] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        self.start.append(adapter_weights(module))
        self.optimizer_states.append(len(trainer.optimizers[0].state))

    def on_train_epoch_end(self, trainer, module) -> None:
        self.end.append(adapter_weights(module))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def probed(tiny_sd_path, tmp_path_factory):
    """Two rounds with and without train.restart, each with a RoundProbe."""
    runs = {}
    for restart in (False, True):
        out, probe = tmp_path_factory.mktemp(f"restart-{restart}"), RoundProbe()
        runs[restart] = adapter_weights(run_rounds(tiny_sd_path, out, [probe], restart=restart)), out, probe
    return runs


def test_union_of_round_sets_concatenates_the_latents_and_remaps_the_prompts():
    first = RoundSet(1, torch.arange(3.0).view(3, 1), ["x", "y"], torch.tensor([1, 0, 1]))
    second = RoundSet(2, torch.arange(3.0, 5.0).view(2, 1), ["z", "x"], torch.tensor([0, 1]))
    union = RoundSet.union(2, [first, second])
    assert union.round_index == 2 and union.prompts == ["x", "y", "z"]
    assert union.latents.flatten().tolist() == [0, 1, 2, 3, 4]
    assert [union.prompts[i] for i in union.prompt_index] == ["y", "x", "y", "z", "x"]


@pytest.mark.slow
def test_without_restart_round_2_continues_from_round_1s_adapter_and_optimizer(probed):
    _, _, probe = probed[False]
    assert same(probe.start[1], probe.end[0]) and not same(probe.start[1], probe.start[0])
    assert probe.optimizer_states == [0, len(probe.end[0])]  # AdamW's moments carried over


@pytest.mark.slow
def test_restart_trains_round_2_from_the_initial_adapter_on_rounds_1_and_2(tiny_sd_path, probed):
    trained, out, probe = probed[True]
    assert same(probe.start[1], probe.start[0]) and not same(probe.start[1], probe.end[0])
    assert probe.optimizer_states == [0, 0]
    assert same(probe.end[0], probed[False][2].end[0])  # round 1 is the paper's: one set, a fresh adapter
    assert not same(trained, probed[False][0])

    # An independent construction: a fresh module trained for one round on both rounds' selected latents, in order.
    rows = [RoundDir(out / "rounds" / f"round_{r}").selected_rows() for r in (1, 2)]
    latents = torch.cat([RoundDir(out / "rounds" / f"round_{r}").latents(rs) for r, rs in zip((1, 2), rows)])
    assert len(latents) == 2 * len(PROMPTS)
    prompts = list(dict.fromkeys(row["prompt"] for rs in rows for row in rs))
    index = torch.tensor([prompts.index(row["prompt"]) for rs in rows for row in rs])
    fresh = MITuneModule(load_pipeline(str(tiny_sd_path)), ADAPTER,
                         TrainConfig(effective_batch=EFFECTIVE, micro_batch=MICRO, steps_per_round=STEPS_PER_ROUND))
    fresh.set_prompts(prompts)
    dataset = FinetuneSet(STEPS_PER_ROUND * EFFECTIVE, seed=0, t_range=(500, 1000))
    dataset.load(RoundSet(2, latents, prompts, index))
    fit(fresh, dataset, micro_batch=MICRO, accumulate=EFFECTIVE // MICRO, steps=STEPS_PER_ROUND)
    assert same(adapter_weights(fresh), trained)


@pytest.mark.slow
@pytest.mark.parametrize("crash_at, resumed_from", [(4, 4), (7, 6)], ids=["round-boundary", "mid-round-2"])
def test_restart_resumes_exactly(tiny_sd_path, tmp_path, probed, crash_at, resumed_from):
    """At a round's start the restored adapter is reset after it generated the round; mid-round it is kept."""
    expected, full_dir, _ = probed[True]
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_rounds(tiny_sd_path, tmp_path, [Recorder(crash_at=crash_at)], restart=True)
    assert ckpt.read_state(latest_checkpoint(tmp_path / "checkpoints"))["global_step"] == resumed_from
    resumed = adapter_weights(run_rounds(tiny_sd_path, tmp_path, [], resume=True, restart=True))
    assert same(resumed, expected)
    name = f"rounds/round_2/{METADATA}"
    assert (tmp_path / name).read_bytes() == (full_dir / name).read_bytes()


def test_restart_with_real_pairs_is_refused():
    with pytest.raises(ValueError, match="train.restart is not available with train.real_images"):
        TrainConfig(restart=True, real_images="pairs", real_fraction=0.5)


# ----------------------------------------------------------------------------- non-finite loss


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny_sd_path, tmp_path):
    module = make_module(tiny_sd_path, lr=1e-3)
    eps_fn = module.eps_fn

    def poisoned(z_t, t, emb):
        out = eps_fn(z_t, t, emb)
        return out * float("nan") if module.global_step >= 3 else out

    module.eps_fn = poisoned
    saver = ModelCheckpoint(dirpath=tmp_path, filename="step-{step}", every_n_train_steps=1, save_top_k=1)
    with pytest.raises(FloatingPointError, match="at global step 3"):
        fit(module, tiny_set(module, steps=5, batch=2), micro_batch=2, accumulate=1, steps=5,
            callbacks=[saver], root=tmp_path)

    (kept,) = tmp_path.glob("*.ckpt")
    state = SafetensorsCheckpointIO().load_checkpoint(kept)
    assert state["global_step"] == 3  # written after the third optimizer step, before the NaN
    weights = adapter_weights(module)  # the NaN came before any backward of step 4
    assert state["state_dict"].keys() == weights.keys()
    assert all(torch.equal(state["state_dict"][k], weights[k]) for k in weights)


# ----------------------------------------------------------------------------- checkpoint files


def test_full_disk_while_overwriting_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    io = SafetensorsCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(64)}}, path)

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(OSError) as err:
        io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(64)}}, path)
    assert err.value.errno == errno.ENOSPC

    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary dirs left behind
    state = io.load_checkpoint(path)
    assert state["global_step"] == 1 and torch.equal(state["state_dict"]["w"], torch.ones(64))


def assert_same(a, b) -> None:
    """Equal, including types (tuple vs list, int vs str keys) and tensors' dtype and values."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b) and all(type(k) is type(j) for k, j in zip(a, b))
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_flatten_roundtrips_checkpoint_values(tmp_path):
    obj = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}, 1: None},
        "betas": (0.9, 0.999),
        "groups": [{"params": [0, 1], "lr": 1e-4, "amsgrad": False}],
        "nested": {"t": (torch.arange(4, dtype=torch.int64), [torch.ones(1, dtype=torch.bfloat16), "x"])},
        "name": "run",
    }
    tensors: dict[str, torch.Tensor] = {}
    state = json.loads(json.dumps(flatten(obj, tensors)))
    assert len(tensors) == 4
    assert_same(unflatten(state, tensors), obj)

    io = SafetensorsCheckpointIO()
    io.save_checkpoint(obj, tmp_path / "x.ckpt")
    assert_same(io.load_checkpoint(tmp_path / "x.ckpt"), obj)


def test_values_that_need_pickle_are_refused_with_their_path(tmp_path):
    with pytest.raises(TypeError, match=r"/loops/fit/1 of type set"):
        SafetensorsCheckpointIO().save_checkpoint({"loops": {"fit": [1, {2}]}}, tmp_path / "x.ckpt")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- a broken fine-tuning set


@pytest.fixture
def round_dir(tmp_path) -> Path:
    """A round with two prompts x two candidates; candidate 1 of prompt 0 and candidate 0 of prompt 1 selected."""
    rows = []
    for pid, prompt in enumerate(PROMPTS):
        name = f"latents/{pid:06d}.safetensors"
        (tmp_path / "latents").mkdir(exist_ok=True)
        save_file({"latents": torch.full((2, 4, 2, 2), float(pid)) + torch.arange(2).view(2, 1, 1, 1) / 10},
                  str(tmp_path / name))
        rows += [{"prompt": prompt, "candidate": c, "selected": c == 1 - pid, "latents": name} for c in range(2)]
    (tmp_path / METADATA).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_a_complete_set_loads_its_selected_latents(round_dir):
    rows = RoundDir(round_dir).selected_rows()
    assert [(r["prompt"], r["candidate"]) for r in rows] == [(PROMPTS[0], 1), (PROMPTS[1], 0)]
    latents = RoundDir(round_dir).latents(rows)
    assert latents[:, 0, 0, 0].tolist() == pytest.approx([0.1, 1.0])


def test_missing_metadata_names_the_round(round_dir):
    (round_dir / METADATA).unlink()
    with pytest.raises(FileNotFoundError, match=str(round_dir)):
        RoundDir(round_dir).selected_rows()


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_corrupt_metadata_is_a_value_error(round_dir, damage):
    path = round_dir / METADATA
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20] if damage == "truncated" else b"\xff\xfe\x00garbage" + data[5:])
    with pytest.raises(ValueError, match=f"{path} is corrupt"):
        RoundDir(round_dir).selected_rows()


@pytest.mark.parametrize("damage", ["missing", "garbled"])
def test_broken_latents_file_is_named(round_dir, damage):
    path = round_dir / "latents" / "000001.safetensors"
    path.unlink() if damage == "missing" else path.write_bytes(b"not a safetensors file")
    rows = RoundDir(round_dir).selected_rows()
    with pytest.raises(ValueError, match=f"{path} are missing or corrupt"):
        RoundDir(round_dir).latents(rows)


def test_a_set_with_nothing_selected_is_refused(round_dir):
    path = round_dir / METADATA
    rows = [{**json.loads(line), "selected": False} for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="no selected candidates"):
        RoundDir(round_dir).selected_rows()


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("field, bad", [
    ("effective_batch", {"effective_batch": 0}),
    ("micro_batch", {"micro_batch": -1}),
    ("steps_per_round", {"steps_per_round": 0}),
    ("lr", {"lr": 0.0}),
    ("t_min", {"t_min": -1}),
    ("t_max", {"t_min": 600, "t_max": 600}),
    ("empty_prompt_prob", {"empty_prompt_prob": 1.0}),
])
def test_train_config_errors_name_the_field(field, bad):
    with pytest.raises(ValueError, match=rf"train\.[a-z_/]*{field}"):
        TrainConfig(**bad)


def test_t_max_beyond_the_schedule_is_refused(tiny_sd_path):
    with pytest.raises(ValueError, match=r"train\.t_max=1001 exceeds the model's 1000 timesteps"):
        MITuneModule(load_pipeline(str(tiny_sd_path)), ADAPTER, TrainConfig(t_max=1001))


def test_flatten_keeps_colliding_paths_and_tuple_keys_apart():
    obj = {"a/b": torch.ones(1), "a": {"b": torch.zeros(1)}, 0: torch.full((1,), 2.0), "0": torch.full((1,), 3.0),
           (1, 2): "tuple key"}
    tensors: dict[str, torch.Tensor] = {}
    back = unflatten(json.loads(json.dumps(flatten(obj, tensors))), tensors)
    assert back.keys() == obj.keys()
    assert back[(1, 2)] == "tuple key"
    for key in ("a/b", 0, "0"):
        assert torch.equal(back[key], obj[key])
    assert torch.equal(back["a"]["b"], obj["a"]["b"])
