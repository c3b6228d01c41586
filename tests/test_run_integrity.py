"""A run dir is one run (issue #14): mismatched reruns refused, one writer, finite and checked
checkpoints, deletions confined to the run dir, typed settings, damaged rounds and prompt files named."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mitune.prompts.sources import read_prompt_file
from mitune.rounds.selection import verify_round
from mitune.run import train
from mitune.runs.artifacts import METADATA, RunDir
from mitune.runs.checkpoints import STATE, TENSORS, SafetensorsCheckpointIO, latest_checkpoint, read_state
from mitune.runs.record import RunDirError, exclusive

RECORD = RunDir(Path()).config_record.name

REPO = Path(__file__).resolve().parents[1]


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and RECORD not in p.name and not p.name.startswith(".mitune.lock")}


@pytest.fixture(scope="module")
def finished(config, tiny_sd_path, tmp_path_factory):
    """One finished 1-round run."""
    run_dir = tmp_path_factory.mktemp("finished")
    train(config(run_dir, tiny_sd_path))
    return run_dir


# ----------------------------------------------------------------------------- cases 1-3: one config per dir


@pytest.mark.slow
@pytest.mark.parametrize("overrides, changed", [
    (["generation.guidance_scale=3.0"], ["generation.guidance_scale: 7.5 -> 3.0"]),
    (["generation.guidance_scale=3.0", "resume=true"], ["generation.guidance_scale: 7.5 -> 3.0"]),
    (["generation.num_candidates=4", "data.limit=3", "resume=true"],
     ["data.limit: 2 -> 3", "generation.num_candidates: 3 -> 4"]),
    (["resume=true", "train.lr=1e-2", "train.steps_per_round=8"],
     ["train.lr: 0.0001 -> 0.01", "train.steps_per_round: 3 -> 8"]),
], ids=["cfg", "cfg-resume", "M-and-prompts", "training-settings"])
def test_another_config_in_a_finished_run_dir_is_refused(config, tiny_sd_path, finished, overrides, changed):
    before = snapshot(finished)
    with pytest.raises(RunDirError) as err:
        train(config(finished, tiny_sd_path, *overrides))
    for line in changed:
        assert line in str(err.value)
    assert snapshot(finished) == before


@pytest.mark.slow
def test_a_rerun_without_resume_is_refused(config, tiny_sd_path, finished):
    before = snapshot(finished)
    with pytest.raises(RunDirError, match="already holds a run; add resume=true"):
        train(config(finished, tiny_sd_path))
    assert snapshot(finished) == before  # no retraining, no *-v1.ckpt, adapters untouched


@pytest.mark.slow
def test_resume_may_add_rounds_keeps_the_csv_and_cleans_temporaries(config, tiny_sd_path, tmp_path):
    train(config(tmp_path, tiny_sd_path, "trainer.log_every_n_steps=1"))
    rows = lambda: list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    first = rows()
    assert any(r.get("train/loss") for r in first)
    orphans = [tmp_path / "checkpoints" / ".step-000009.ckpt.tmp-x1", tmp_path / "rounds" / "round_1" / ".x.png.tmp"]
    orphans[0].mkdir()
    orphans[1].write_bytes(b"half")

    train(config(tmp_path, tiny_sd_path, "trainer.log_every_n_steps=1", "rounds=2", "resume=true"))
    after = rows()
    assert after[: len(first)] == [{**r, **{k: "" for k in after[0].keys() - r.keys()}} for r in first]
    assert max(int(r["step"]) for r in after) > max(int(r["step"]) for r in first)
    assert not any(p.exists() for p in orphans)
    assert (tmp_path / "rounds" / "round_2" / "adapter").is_dir()


def test_a_start_that_failed_before_any_work_does_not_tie_the_dir(config, tiny_sd_path, tmp_path):
    with pytest.raises(ValueError, match="train.t_max=2000 exceeds"):  # found once the model is there
        train(config(tmp_path, tiny_sd_path, "train.t_max=2000"))
    assert (tmp_path / RECORD).is_file()
    train(config(tmp_path, tiny_sd_path))  # another config in the same, still empty, dir


# ----------------------------------------------------------------------------- case 4: checkpoints stay finite


@pytest.mark.slow
def test_diverged_training_leaves_only_finite_checkpoints(config, tiny_sd_path, tmp_path):
    with pytest.raises(FloatingPointError) as err:
        train(config(tmp_path, tiny_sd_path, "train.lr=1e6", "train.steps_per_round=6", "train.effective_batch=2"))
    found = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    for path in found:
        weights = {k: t for k, t in load_file(path / TENSORS).items() if "/state_dict/" in k or "/optimizer_states/" in k}
        assert weights and all(torch.isfinite(t).all() for t in weights.values()), path
    newest = latest_checkpoint(tmp_path / "checkpoints")
    assert (str(newest) if newest else "none yet") in str(err.value) or "refusing to write checkpoint" in str(err.value)


# ----------------------------------------------------------------------------- case 5: deletions confined


@pytest.fixture
def io_and_victim(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep")
    return SafetensorsCheckpointIO(root=run), run, victim


def test_a_checkpoint_path_with_dotdot_outside_the_run_is_not_deleted(io_and_victim):
    io, run, victim = io_and_victim
    with pytest.raises(ValueError, match="outside the run dir"):
        io.remove_checkpoint(run / "checkpoints" / ".." / ".." / "victim")
    assert (victim / "precious.txt").read_text() == "keep"


def test_a_symlinked_checkpoint_pointing_outside_is_not_deleted(io_and_victim):
    io, run, victim = io_and_victim
    link = run / "checkpoints" / "step-000002.ckpt"
    link.symlink_to(victim, target_is_directory=True)
    with pytest.raises(ValueError, match="outside the run dir"):
        io.remove_checkpoint(link)
    assert (victim / "precious.txt").read_text() == "keep"


def test_resume_does_not_follow_a_checkpoint_link_out_of_the_run(io_and_victim):
    io, run, victim = io_and_victim
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 99,
                        "loops": {"fit_loop": {"epoch_progress": {"current": {"processed": 0}}}}}, victim / "x.ckpt")
    (run / "checkpoints" / "step-000099.ckpt").symlink_to(victim / "x.ckpt", target_is_directory=True)
    assert latest_checkpoint(run / "checkpoints") is None


def test_only_checkpoint_dirs_are_deleted(io_and_victim):
    io, run, _ = io_and_victim
    other = run / "checkpoints" / "notes"
    other.mkdir()
    (other / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="not a checkpoint dir"):
        io.remove_checkpoint(other)
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, run / "checkpoints" / "a.ckpt")
    io.remove_checkpoint(run / "checkpoints" / "a.ckpt")
    assert not (run / "checkpoints" / "a.ckpt").exists() and other.exists()


# ----------------------------------------------------------------------------- case 10: corruption is named


@pytest.fixture
def saved(tmp_path):
    io = SafetensorsCheckpointIO(root=tmp_path)
    path = tmp_path / "step-000001.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.arange(4096, dtype=torch.float32)}, "global_step": 1}, path)
    return io, path


def test_a_checkpoint_reads_back(saved):
    io, path = saved
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.arange(4096, dtype=torch.float32))


def test_bit_flips_in_a_checkpoint_are_caught(saved):
    io, path = saved
    data = bytearray((path / TENSORS).read_bytes())
    for i in range(256):
        data[-(16 * i + 1)] ^= 0x10
    (path / TENSORS).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{path / TENSORS} does not match the checksum"):
        io.load_checkpoint(path)


def test_a_truncated_tensors_file_is_named(saved):
    io, path = saved
    (path / TENSORS).write_bytes((path / TENSORS).read_bytes()[:100])
    with pytest.raises(ValueError, match=str(path / TENSORS)):
        io.load_checkpoint(path)


def test_a_truncated_state_file_is_named(saved):
    io, path = saved
    (path / STATE).write_text((path / STATE).read_text()[:20])
    with pytest.raises(ValueError, match=f"checkpoint state {path / STATE} is corrupt"):
        read_state(path)
    with pytest.raises(ValueError, match=str(path / STATE)):
        io.load_checkpoint(path)


def test_a_non_finite_checkpoint_is_not_written(tmp_path):
    io = SafetensorsCheckpointIO(root=tmp_path)
    weights = torch.ones(8)
    weights[3] = float("nan")
    with pytest.raises(FloatingPointError, match="1 non-finite values"):
        io.save_checkpoint({"state_dict": {"w": weights}}, tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


# ----------------------------------------------------------------------------- cases 6, 10: damaged rounds


def test_a_metadata_file_missing_lines_is_rebuilt_from_parts(round_dir):
    out, settings, generation = round_dir
    whole = (out / METADATA).read_bytes()
    (out / METADATA).write_bytes(b"".join(whole.splitlines(keepends=True)[:2]))
    verify_round(out, settings, 2, generation)
    assert (out / METADATA).read_bytes() == whole


def test_a_damaged_metadata_file_without_its_parts_is_refused(round_dir):
    out, settings, generation = round_dir
    (out / METADATA).write_text("")
    (out / "parts" / "000001.jsonl").unlink()
    with pytest.raises(ValueError, match="parts/000001.jsonl is missing"):
        verify_round(out, settings, 2, generation)


def test_a_deleted_selected_image_is_named(round_dir):
    out, settings, generation = round_dir
    selected = next(json.loads(x) for x in (out / METADATA).read_text().splitlines() if json.loads(x)["selected"])
    (out / selected["file_name"]).unlink()
    with pytest.raises(FileNotFoundError, match=selected["file_name"]):
        verify_round(out, settings, 2, generation)


def test_a_finished_round_with_other_settings_is_refused(round_dir):
    out, settings, generation = round_dir
    other = {**settings, "generation": {**settings["generation"], "guidance_scale": 3.0}}
    with pytest.raises(ValueError, match=r"different settings \(generation\)"):
        verify_round(out, other, 2, generation)


# ----------------------------------------------------------------------------- case 7: one writer


def test_a_second_run_on_a_locked_dir_fails_at_once_naming_the_holder(config, tiny_sd_path, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from mitune.runs.record import exclusive\n"
         f"with exclusive(Path({str(tmp_path)!r})):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with pytest.raises(RunDirError, match=f"in use by another mitune run \\(pid {holder.pid} on "):
            train(config(tmp_path, tiny_sd_path))
        assert time.monotonic() - start < 10
    finally:
        holder.kill()
        holder.wait()
    with exclusive(tmp_path):  # released when its holder died
        pass


# ----------------------------------------------------------------------------- trainer settings and rounds


@pytest.mark.parametrize("override, message", [
    ("+trainer.max_steps=3", "trainer.max_steps=3 would break the rounds"),
    ("trainer.max_epochs=5", r"trainer.max_epochs=5 would break the rounds: one epoch is one round.*= rounds \(1\)"),
    ("+trainer.limit_train_batches=0.5", "trainer.limit_train_batches=0.5 would break the rounds"),
    ("+trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches=2 would break the rounds: mitune derives it"),
    ("trainer.use_distributed_sampler=true", "trainer.use_distributed_sampler=True would break the rounds"),
    ("+trainer.fast_dev_run=true", "trainer.fast_dev_run=True would break the rounds"),
])
def test_trainer_settings_that_break_rounds_are_refused_before_the_model_loads(config, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        train(config(tmp_path / "run", tmp_path / "never-built", override))


@pytest.mark.slow
def test_rounds_do_not_depend_on_reloading_the_dataloaders(config, tiny_sd_path, tmp_path):
    """The callback loads each round into the data module's set, so Lightning's reload setting changes nothing."""
    adapters = []
    for reload in (0, 1):
        run_dir = tmp_path / f"reload{reload}"
        train(config(run_dir, tiny_sd_path, "rounds=2", f"+trainer.reload_dataloaders_every_n_epochs={reload}"))
        adapters.append(load_file(str(run_dir / "adapter" / "pytorch_lora_weights.safetensors")))
    # Tensors, not file bytes: safetensors writes its metadata keys in a per-process order.
    assert adapters[0].keys() == adapters[1].keys() and adapters[0]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


# ----------------------------------------------------------------------------- case 8: typed settings


@pytest.mark.parametrize("override, message", [
    ("rounds=1.5", "config key rounds: Value '1.5' of type 'float' could not be converted to Integer"),
    ("generation.num_candidates=4.5", "config key generation.num_candidates: Value '4.5'"),
    ("generation.num_candidates=abc", "config key generation.num_candidates: Value 'abc'"),
    ("train.lr=nan", "train.lr must be a finite number, got nan"),
    ("generation.guidance_scale=nan", "generation.guidance_scale must be a finite number, got nan"),
    ("train.betas=[0.9,inf]", "train.betas must be a finite number"),
    ("adapter.alpha=abc", "config key adapter.alpha"),
])
def test_bad_types_and_non_finite_numbers_name_the_key_before_the_model_loads(config, tmp_path, override, message):
    never_built = tmp_path / "never-built"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        train(config(tmp_path / "run", never_built, override))
    assert not never_built.exists()


# ----------------------------------------------------------------------------- case 11: prompt files


@pytest.mark.parametrize("content, message", [
    ("a red cube\nun café\n".encode("latin-1"), r"line 2: not UTF-8"),
    (b"a red cube\na blue\x00 ball\n", r"line 2: control character U\+0000"),
    (bytes(range(256)), r"line 2: not UTF-8"),  # byte 10 is a newline
])
def test_bad_prompt_files_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{path}.*{message}"):
        read_prompt_file(path)


def test_a_byte_order_mark_is_dropped(tmp_path, caplog):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa red cube\na blue ball\n".encode("utf-8"))
    assert read_prompt_file(path).prompts == ["a red cube", "a blue ball"]
    assert "byte-order mark" in caplog.text


def test_a_directory_is_not_a_prompt_file(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        read_prompt_file(tmp_path)


@pytest.mark.slow
def test_a_record_written_before_the_sub_packages_still_resumes_and_still_refuses_a_change(finished):
    """Run records name ``_target_``s; those that moved with the sub-packages are read under their new names, and a
    setting added since (``ADDED_SETTINGS``) at the value that reproduces the earlier runs."""
    import yaml

    from mitune.runs.record import MOVED_TARGETS, check_config

    record = finished / RECORD
    current = yaml.safe_load(record.read_text(encoding="utf-8"))
    renamed = {new: old for old, new in MOVED_TARGETS.items()}

    def as_before(tree):
        if isinstance(tree, dict):
            return {k: renamed.get(v, v) if k == "_target_" else as_before(v) for k, v in tree.items()}
        return tree

    before = as_before(current)
    for key in ("gradient_checkpointing", "real_images", "real_fraction", "real_prompt_column", "restart"):
        del before["train"][key]
    del before["generator"], before["rounds_from"]
    assert before["generation"]["_target_"] == "mitune.generation.GenerationConfig"
    assert before["train"]["_target_"] == "mitune.config.TrainConfig"
    record.write_text(yaml.safe_dump(before, sort_keys=True), encoding="utf-8")
    config, weights = {k: v for k, v in current.items() if k != "weights"}, current["weights"]
    try:
        check_config(finished, config, resume=True, weights=weights)
        changed = {**config, "train": {**config["train"], "lr": 1.0}}
        with pytest.raises(RunDirError, match=r"train\.lr: 0\.0001 -> 1\.0"):
            check_config(finished, changed, resume=True, weights=weights)
    finally:
        record.write_text(yaml.safe_dump(current, sort_keys=True), encoding="utf-8")


def test_a_record_from_before_train_restart_resumes_without_it_and_refuses_turning_it_on(tmp_path):
    """``train.restart`` (issue 31) is in ``ADDED_SETTINGS`` at False, the behaviour of every earlier run."""
    import yaml

    from mitune.runs.record import check_config

    config = {"train": {"lr": 1e-4, "restart": False}, "rounds": 1}
    check_config(tmp_path, config, resume=False, weights={})  # writes the record: the dir holds no work yet
    (RunDir(tmp_path).checkpoints / "step-000002.ckpt").mkdir(parents=True)
    record = RunDir(tmp_path).config_record
    before = yaml.safe_load(record.read_text(encoding="utf-8"))
    del before["train"]["restart"]
    record.write_text(yaml.safe_dump(before), encoding="utf-8")
    check_config(tmp_path, config, resume=True, weights={})
    with pytest.raises(RunDirError, match=r"train\.restart: False -> True"):
        check_config(tmp_path, {**config, "train": {"lr": 1e-4, "restart": True}}, resume=True, weights={})


# ----------------------------------------------------------------------------- the base model's weights


@pytest.mark.slow
def test_a_resume_on_other_weights_is_refused_naming_the_file(config, tiny_sd_path, tmp_path):
    """The record holds each weight file's SHA-256; new bytes under the same path are another model."""
    import yaml

    from mitune.models.weights import weights_of

    model = Path(shutil.copytree(tiny_sd_path, tmp_path / "model"))
    run_dir = tmp_path / "run"
    train(config(run_dir, model, f"paths.cache_dir={tmp_path / 'cache'}"))
    recorded = yaml.safe_load((run_dir / RECORD).read_text(encoding="utf-8"))["weights"]
    assert recorded == weights_of(model, None, tmp_path / "other-cache").record()
    assert (recorded["repo"], recorded["revision"]) == (None, None) and len(recorded["files"]) == 3

    name = "unet/diffusion_pytorch_model.safetensors"
    unet = model / name
    tensors = load_file(unet)
    first = sorted(tensors)[0]
    save_file({**tensors, first: tensors[first] + 1}, unet)
    before = snapshot(run_dir)
    with pytest.raises(RunDirError) as err:
        train(config(run_dir, model, f"paths.cache_dir={tmp_path / 'cache'}", "resume=true"))
    assert f"weights.files.{name}: '{recorded['files'][name]}' -> " in str(err.value)
    assert f"weights.digest: '{recorded['digest']}' -> " in str(err.value)
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_a_record_without_weights_resumes_and_is_left_as_written(finished):
    """Run dirs made before mitune recorded weights: their weights are unknown, and accepted."""
    import yaml

    from mitune.runs.record import check_config

    record = finished / RECORD
    current = yaml.safe_load(record.read_text(encoding="utf-8"))
    config, weights = {k: v for k, v in current.items() if k != "weights"}, current["weights"]
    old = yaml.safe_dump(config, sort_keys=True)
    record.write_text(old, encoding="utf-8")
    try:
        check_config(finished, config, resume=True, weights={**weights, "digest": "0" * 12})
        assert record.read_text(encoding="utf-8") == old
        with pytest.raises(RunDirError, match=r"train\.lr: 0\.0001 -> 1\.0"):
            check_config(finished, {**config, "train": {**config["train"], "lr": 1.0}}, resume=True, weights=weights)
    finally:
        record.write_text(yaml.safe_dump(current, sort_keys=True), encoding="utf-8")


def test_another_hub_commit_with_the_same_files_is_the_same_model(tmp_path):
    from mitune.runs.record import check_config

    weights = {"repo": "org/model", "revision": "a" * 40, "digest": "d", "files": {"unet/x.safetensors": "h"}}
    check_config(tmp_path, {"seed": 0}, resume=False, weights=weights)
    (tmp_path / "rounds").mkdir()
    (tmp_path / "rounds" / "round_1").mkdir()  # work: the dir is tied to its record
    check_config(tmp_path, {"seed": 0}, resume=True, weights={**weights, "revision": "b" * 40})
    with pytest.raises(RunDirError, match=r"weights\.files\.unet/x\.safetensors: 'h' -> 'i'"):
        check_config(tmp_path, {"seed": 0}, resume=True, weights={**weights, "files": {"unet/x.safetensors": "i"}})
