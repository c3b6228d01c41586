"""The fault campaign of issue #27: the 17 faults it found (cases A-F, each test named by its case) and the
checkpoint names. With the promises of README's "Resume" and "A run dir is one run" that earlier tests hold (kill
and SIGTERM at every phase, changed-config refusal, the lock, bad values, prompt-file cleaning, crafted checkpoint
paths, damaged rounds and checkpoints), the whole campaign is::

    pytest tests/test_faults.py tests/test_run_integrity.py \
        tests/test_run.py::test_run_killed_in_each_phase_resumes_identically \
        tests/test_run.py::test_sigterm_checkpoints_exits_143_and_resumes_identically \
        tests/test_run.py::test_bad_input_fails_before_the_model_loads tests/test_run.py::test_two_rounds_end_to_end_with_logs

Runs are tiny (``scale=smoke``, 2 demo prompts, the random-init tiny model); the end-to-end ones are marked slow.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_run_integrity import RECORD, snapshot

from mitune.cli import main as cli_main
from mitune.rounds.selection import verify_round
from mitune.run import resume_command, train
from mitune.runs.artifacts import METADATA, RESULT_COLUMNS, DamagedFolder, OutsideRunDir, RunDir
from mitune.runs.checkpoints import CHECKSUM, STATE, TENSORS, SafetensorsCheckpointIO
from mitune.runs.io import csv_text, sha256_file
from mitune.runs.record import RunDirError
from mitune.summary import SummaryError, collect

REPO = Path(__file__).resolve().parents[1]


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def outside_with_files(tmp_path: Path) -> Path:
    """A folder outside the run dir holding files a run would write (round 3's first image and its metadata)."""
    outside = tmp_path / "outside"
    (outside / "images").mkdir(parents=True)
    (outside / "images" / "000000_000.png").write_bytes(b"someone else's image")
    (outside / METADATA).write_text("someone else's rows\n")
    return outside


# ----------------------------------------------------------------------------- A: writes outside the run dir


def partial_round_1(run_dir: Path, outside: Path) -> None:
    """As if killed while generating round 1 into a folder outside the run dir: prompt 0 is done."""
    round_1 = run_dir / "rounds" / "round_1"
    for name in ["round.json", "parts/000000.jsonl", "latents/000000.safetensors",
                 *(str(p.relative_to(round_1)) for p in round_1.glob("images/000000_*.png"))]:
        (outside / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(round_1 / name, outside / name)
    for path in [run_dir / "checkpoints", run_dir / "adapter", round_1]:
        shutil.rmtree(path)


@pytest.mark.slow
@pytest.mark.parametrize("linked, overrides", [
    ("rounds/round_3", ["rounds=3", "resume=true"]),  # a finished run extended into a linked round
    ("rounds/round_1", ["resume=true"]),  # a partial round 1 linked elsewhere
    ("checkpoints", ["rounds=2", "resume=true"]),
])
def test_A_a_link_out_of_the_run_dir_is_refused_before_any_write(config, tiny_sd_path, tmp_path, linked, overrides):
    run_dir = tmp_path / "run"
    train(config(run_dir, tiny_sd_path))
    outside = outside_with_files(tmp_path)
    if linked == "rounds/round_1":
        partial_round_1(run_dir, outside)
    elif linked == "checkpoints":
        for path in (run_dir / "checkpoints").iterdir():
            path.rename(outside / path.name)
        (run_dir / "checkpoints").rmdir()
    (run_dir / linked).symlink_to(outside, target_is_directory=True)
    before, inside = files_under(outside), snapshot(run_dir)
    with pytest.raises(OutsideRunDir, match=f"{run_dir / linked} resolves to {outside}, outside the run dir"):
        train(config(run_dir, tiny_sd_path, *overrides))
    assert files_under(outside) == before and snapshot(run_dir) == inside


# ----------------------------------------------------------------------------- B: silent input changes


@pytest.mark.slow
def test_B_a_prompt_file_edited_between_rounds_is_refused_naming_it(config, tiny_sd_path, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue ball\n")
    run_dir = tmp_path / "run"
    data = ["data=file", f"data.prompt_file={prompts}"]
    train(config(run_dir, tiny_sd_path, *data))
    prompts.write_text("a red cube\na green cone\n")  # data.limit=2: the first two count
    before = snapshot(run_dir)
    with pytest.raises(RunDirError, match=rf"(?s)prompts\.sha256: .*The prompts of {prompts} are not those"):
        train(config(run_dir, tiny_sd_path, *data, "rounds=2", "resume=true"))
    assert snapshot(run_dir) == before
    assert not (run_dir / "rounds" / "round_2").exists()


def test_B_resume_from_another_run_dirs_checkpoint_is_refused(config, tmp_path):
    other = tmp_path / "other" / "checkpoints" / "round-002.ckpt"
    SafetensorsCheckpointIO(root=tmp_path / "other").save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 6}, other)
    never_built = tmp_path / "never-built"
    with pytest.raises(RunDirError, match=f"resume={other} is not a checkpoint of this run dir"):
        train(config(tmp_path / "new", never_built, "rounds=3", f"resume={other}"))
    assert not never_built.exists() and not (tmp_path / "new" / RECORD).exists()


# ----------------------------------------------------------------------------- C: damage that goes unnoticed


def first_row(run_dir: Path, selected: bool) -> dict:
    rows = [json.loads(x) for x in (run_dir / "rounds" / "round_1" / METADATA).read_text().splitlines()]
    return next(row for row in rows if row["selected"] == selected)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["truncated summary.json", "metadata.jsonl lines lost", "latents deleted",
                                  "unselected PNG deleted"])
def test_C_an_earlier_round_is_checked_when_a_run_is_extended(config, tiny_sd_path, tmp_path, case, caplog):
    run_dir = tmp_path / "run"
    train(config(run_dir, tiny_sd_path))
    round_1 = run_dir / "rounds" / "round_1"
    whole = {name: (round_1 / name).read_bytes() for name in ("summary.json", METADATA)}
    if case == "truncated summary.json":
        (round_1 / "summary.json").write_bytes(whole["summary.json"][:40])
    elif case == "metadata.jsonl lines lost":
        (round_1 / METADATA).write_bytes(b"".join(whole[METADATA].splitlines(keepends=True)[:2]))
    else:
        row = first_row(run_dir, selected=case == "latents deleted")
        damaged = round_1 / (row["latents"] if case == "latents deleted" else row["file_name"])
        damaged.unlink()
        with pytest.raises(DamagedFolder, match=f"{damaged} is missing"):
            train(config(run_dir, tiny_sd_path, "rounds=2", "resume=true"))
        assert not (run_dir / "rounds" / "round_2").exists()
        return
    with caplog.at_level(logging.WARNING):
        train(config(run_dir, tiny_sd_path, "rounds=2", "resume=true"))
    assert "rebuilt the round's metadata and summary from its parts" in caplog.text
    assert {name: (round_1 / name).read_bytes() for name in whole} == whole  # rebuilt exactly
    assert (run_dir / "rounds" / "round_2" / "adapter").is_dir()


@pytest.mark.parametrize("name, damage, message", [
    ("parts/000001.jsonl", lambda p: p.write_text(p.read_text()[:-9]), r"has \d+ bytes, \d+ when the round completed"),
    ("images/000000_001.png", lambda p: p.write_bytes(b"x"), "has 1 bytes"),
    ("round.json", lambda p: None, None),  # untouched: the check passes
])
def test_C_every_file_of_a_round_is_checked_against_its_recorded_size(round_dir, name, damage, message):
    out, settings, generation = round_dir
    damage(out / name)
    if message is None:
        verify_round(out, settings, 2, generation)
        return
    with pytest.raises(DamagedFolder, match=f"{out / name} {message}"):
        verify_round(out, settings, 2, generation)


def test_C_a_round_finished_before_sizes_were_recorded_is_still_reused(round_dir):
    out, settings, generation = round_dir
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("files", None)
    (out / "summary.json").write_text(json.dumps(summary))
    verify_round(out, settings, 2, generation)
    rows = [json.loads(x) for x in (out / METADATA).read_text().splitlines()]
    victim = out / next(r for r in rows if not r["selected"])["file_name"]
    victim.unlink()
    with pytest.raises(DamagedFolder, match=f"{victim} is missing"):
        verify_round(out, settings, 2, generation)


# ----------------------------------------------------------------------------- D: validation before work


@pytest.mark.parametrize("override, message", [
    ("generation.num_inference_steps=1500", r"generation.num_inference_steps=1500 exceeds the model's 1000 timesteps"),
    ("generation.mi.min_timestep=5000", r"generation.mi.min_timestep=5000 leaves no timestep of the model's 1000"),
    ("generation.guidance_scale=1e30", r"guidance_scale must be <= 100, got 1e\+30"),
    ("data.limit=1.5", r"data.limit must be an integer >= 1 or null, got 1.5"),
])
def test_D_bad_values_are_refused_before_the_model_loads_and_leave_no_file(config, tiny_sd_path, tmp_path, override,
                                                                            message, monkeypatch):
    import mitune.run

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(mitune.run, "MITuneModule", no_loading)
    run_dir = tmp_path / "run"
    with pytest.raises(Exception, match=message):
        train(config(run_dir, tiny_sd_path, override))
    assert not (run_dir / RECORD).exists() and not (run_dir / "rounds").exists()


def cli_run(*args: str, tiny: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mitune.run", "model=tiny", f"model.path_or_id={tiny}", "scale=smoke", "data=demo",
               "data.limit=2", "logger=csv", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})


@pytest.mark.slow
def test_D_a_refused_start_leaves_the_runs_hydra_files_as_they_were(tiny_sd_path, tmp_path):
    run_dir = tmp_path / "run"
    done = cli_run("rounds=1", f"hydra.run.dir={run_dir}", tiny=tiny_sd_path)
    assert done.returncode == 0, done.stderr[-2000:]
    hydra = files_under(run_dir / ".hydra")
    assert sorted(hydra) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert "guidance_scale: 7.5" in hydra["config.yaml"].decode()
    refused = cli_run("rounds=1", "generation.guidance_scale=3.0", "resume=true", f"hydra.run.dir={run_dir}",
                      tiny=tiny_sd_path)
    assert refused.returncode != 0 and "generation.guidance_scale: 7.5 -> 3.0" in refused.stderr
    assert files_under(run_dir / ".hydra") == hydra


# ----------------------------------------------------------------------------- E: recovery paths


def test_E_a_checkpoint_with_non_finite_weights_is_refused_naming_the_newest_finite_one(tmp_path):
    io = SafetensorsCheckpointIO(root=tmp_path)
    loops = {"fit_loop": {"epoch_progress": {"current": {"processed": 0}}}}
    good, bad = tmp_path / "step-000012.ckpt", tmp_path / "step-000014.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(4)}, "global_step": 12, "loops": loops}, good)
    io.save_checkpoint({"state_dict": {"w": torch.ones(4)}, "global_step": 14, "loops": loops}, bad)
    # NaN weights under a valid checksum: written by something other than mitune's checkpoint IO.
    tensors = load_file(bad / TENSORS)
    key = next(k for k in tensors if "/state_dict/" in k)
    save_file({**tensors, key: torch.full((4,), float("nan"))}, bad / TENSORS)
    state = json.loads((bad / STATE).read_text())
    (bad / STATE).write_text(json.dumps({**state, CHECKSUM: sha256_file(bad / TENSORS)}))
    with pytest.raises(FloatingPointError, match=f"checkpoint {bad} holds 4 non-finite .* the newest finite "
                                                 f"checkpoint is {good}"):
        io.load_checkpoint(bad)
    assert torch.equal(io.load_checkpoint(good)["state_dict"]["w"], torch.ones(4))


@pytest.mark.slow
def test_E_a_copied_run_dir_resumes(config, tiny_sd_path, tmp_path):
    original, copy = tmp_path / "D", tmp_path / "D2"
    train(config(original, tiny_sd_path))
    shutil.copytree(original, copy, symlinks=True)
    train(config(copy, tiny_sd_path, "rounds=2", "resume=true"))
    assert (copy / "rounds" / "round_2" / "adapter").is_dir() and not (original / "rounds" / "round_2").exists()
    with pytest.raises(RunDirError, match=r"train\.lr: 0\.0001 -> 0\.01"):  # still one run: a change is refused
        train(config(copy, tiny_sd_path, "rounds=2", "resume=true", "train.lr=1e-2"))


def back_to_mid_round_1(run_dir: Path) -> None:
    """As if killed after round 1's second optimizer step: only its step checkpoint is left."""
    for path in [*(run_dir / "checkpoints").glob("round-*"), run_dir / "adapter", run_dir / "rounds" / "round_1" / "adapter"]:
        shutil.rmtree(path)
    (run_dir / "rounds" / "progress.json").unlink()
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000002.ckpt"]


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["mid-round 1", "end of round 1"])
def test_E_lower_micro_batches_on_resume_give_the_same_adapter_up_to_float_rounding(config, tiny_sd_path, tmp_path,
                                                                                    stop):
    """What a user does after an out-of-memory error: resume with smaller micro-batches (same effective batch)."""
    rounds = "rounds=1" if stop == "mid-round 1" else "rounds=2"
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(config(whole, tiny_sd_path, rounds))
    train(config(resumed, tiny_sd_path))
    if stop == "mid-round 1":
        back_to_mid_round_1(resumed)
    train(config(resumed, tiny_sd_path, rounds, "resume=true", "train.micro_batch=1", "generation.micro_batch=2"))
    assert json.loads((resumed / "rounds" / "progress.json").read_text()) == json.loads(
        (whole / "rounds" / "progress.json").read_text())  # the same rounds and optimizer steps
    a, b = (load_file(d / "adapter" / "pytorch_lora_weights.safetensors") for d in (whole, resumed))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- F: tools


def results_csv(path: Path, rows: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    row = {"method": "mitune", "category": "color", "round": 1, "cfg": 7.5, "metric": "toy_oracle", "kind": "alignment",
           "value": 0.5, "std": 0.1, "n": 4, "num_prompts": 2, "images_per_prompt": 2, "seed": 1, "train_seed": 0,
           "model": "tiny", "weights": "abc", "run_dir": "r", "image_dir": "i"}
    path.write_text(csv_text([{**row, "seed": s} for s in range(rows)], RESULT_COLUMNS))
    return path


def test_F_summary_names_the_file_and_line_of_a_truncated_results_csv(tmp_path):
    path = results_csv(tmp_path / "job" / "results.csv")
    path.write_text(path.read_text()[:-30])
    with pytest.raises(SummaryError, match=f"{path}, line 3: damaged row"):
        collect([tmp_path])


def test_F_summary_says_it_leaves_out_an_empty_results_csv(tmp_path, caplog):
    results_csv(tmp_path / "a" / "results.csv")
    empty = tmp_path / "b" / "results.csv"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        assert len(collect([tmp_path])) == 2
    assert f"{empty} is empty (0 bytes): left out" in caplog.text


def test_F_evaluate_with_a_missing_run_dir_fails_and_creates_nothing(task_config, tmp_path):
    from mitune.evaluate import evaluate

    missing = tmp_path / "no-such-run"
    cfg = task_config("evaluate", ["model=tiny", f"model.path_or_id={tmp_path / 'never-built'}", "data=demo",
                                   f"run_dir={missing}", "eval.round=0"], tmp_path / "job")
    with pytest.raises(FileNotFoundError, match=f"run_dir {missing} does not exist"):
        evaluate(cfg)
    assert not missing.exists()


def test_F_a_corrupt_progress_file_is_named(tmp_path):
    run = RunDir(tmp_path)
    run.rounds_dir.mkdir()
    run.progress_file.write_text('{"rounds_trained": ')
    with pytest.raises(ValueError, match=f"{run.progress_file} is corrupt"):
        run.rounds_trained()


def test_F_rerank_into_another_prompts_folder_is_refused_before_the_model_loads(tmp_path, capsys):
    from PIL import Image

    from mitune.rerank import Candidate, write_ranking

    out = tmp_path / "ranked"
    image = Image.new("RGB", (4, 4))
    write_ranking([Candidate(index=0, seed=1, mi=1.0, score=1.0, rank=1, image=image)], out, prompt="a red circle")
    before = files_under(out)
    code = cli_main(["rerank", "--model", str(tmp_path / "no-model"), "--prompt", "a blue square", "-n", "2",
                     "--out", str(out)])
    assert code == 1
    assert "holds the ranking of another prompt ('a red circle')" in capsys.readouterr().err
    assert files_under(out) == before
    # The same prompt again replaces its ranking whole: no image of the earlier one is left.
    write_ranking([Candidate(index=1, seed=2, mi=2.0, score=2.0, rank=1, image=image)], out, prompt="a red circle")
    assert sorted(p.name for p in out.glob("*.png")) == ["rank001_candidate001.png"]


@pytest.mark.slow
def test_F_merge_does_not_replace_a_runs_adapter_unless_asked(config, tiny_sd_path, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(config(run_dir, tiny_sd_path, "rounds=2"))
    adapters = [str(run_dir / "rounds" / f"round_{r}" / "adapter") for r in (1, 2)]
    before = files_under(run_dir / "adapter")
    assert cli_main(["merge", "--adapters", *adapters, "--out", str(run_dir / "adapter")]) == 1
    assert "already holds an adapter" in capsys.readouterr().err
    assert files_under(run_dir / "adapter") == before
    merged = tmp_path / "merged"
    shutil.copytree(run_dir / "adapter", merged)
    assert cli_main(["merge", "--adapters", *adapters, "--out", str(merged), "--overwrite"]) == 0
    assert files_under(merged) != before


def test_F_the_sigterm_resume_command_is_shell_quoted(tmp_path):
    argv = ["data.prompts=[a red circle,a blue square]", "rounds=2", f"hydra.run.dir={tmp_path}/old", "resume=false"]
    command = resume_command(argv, tmp_path / "run dir")
    assert shlex.split(command) == ["python", "-m", "mitune.run", "data.prompts=[a red circle,a blue square]",
                                    "rounds=2", f"hydra.run.dir={tmp_path}/run dir", "resume=true"]


@pytest.mark.slow
def test_F_a_resumed_run_logs_each_step_once(config, tiny_sd_path, tmp_path):
    run_dir = tmp_path / "run"
    train(config(run_dir, tiny_sd_path, "trainer.log_every_n_steps=1"))
    back_to_mid_round_1(run_dir)
    train(config(run_dir, tiny_sd_path, "trainer.log_every_n_steps=1", "resume=true"))
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(row["step"]) for row in rows if row["train/loss"]) == [0, 1, 2]
    assert [int(row["step"]) for row in rows if row["round/index"]] == [0]


# ----------------------------------------------------------------------------- checkpoint names


@pytest.mark.slow
def test_checkpoints_are_named_by_round_without_equals_signs_and_old_names_resume(config, tiny_sd_path, tmp_path):
    run_dir = tmp_path / "run"
    train(config(run_dir, tiny_sd_path))
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["round-001.ckpt", "step-000002.ckpt"]
    # A run dir made before: its round 1 checkpoint under Lightning's name.
    (run_dir / "checkpoints" / "round-001.ckpt").rename(run_dir / "checkpoints" / "round-epoch=0.ckpt")
    train(config(run_dir, tiny_sd_path, "rounds=2", "resume=true"))
    assert (run_dir / "checkpoints" / "round-002.ckpt").is_dir()
    assert json.loads((run_dir / "rounds" / "progress.json").read_text())["rounds_trained"] == 2
