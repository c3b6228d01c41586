"""The console: user errors as one line (the traceback behind HYDRA_FULL_ERROR=1), library noise off at its source."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from mitune.runs.console import HARMLESS_WARNINGS, LIBRARY_LOGGERS, one_line_errors
from mitune.runs.record import RunDirError


@pytest.mark.parametrize("error", [
    ValueError("generation.top_k must be in [1, M=3], got 5"),
    FileNotFoundError("prompt file my.txt does not exist"),
    RunDirError("run dir out/run holds another run: config differs at train.lr (0.0001 -> 0.001)"),
])
def test_a_user_error_is_one_line_without_traceback_or_hydra_hint(error, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("MITUNE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as stop, one_line_errors("mitune.run"):
        raise error
    assert stop.value.code == 1
    assert capsys.readouterr().err == f"mitune.run: error: {error}\n"


def test_a_missing_config_key_is_a_user_error(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    cfg = OmegaConf.create({"eval": {"round": 0}}, flags={"struct": True})
    with pytest.raises(SystemExit), one_line_errors("mitune.evaluate"):
        cfg.eval.rounds  # noqa: B018
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("mitune.evaluate: error: Key 'rounds' is not in struct")


@pytest.mark.parametrize("switch", ["HYDRA_FULL_ERROR", "MITUNE_DEBUG"])
def test_the_traceback_is_there_when_asked_for(switch, monkeypatch):
    monkeypatch.setenv(switch, "1")
    with pytest.raises(ValueError, match="bad"), one_line_errors("mitune.run"):
        raise ValueError("bad")


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(KeyError), one_line_errors("mitune.run"):
        raise KeyError("not a user error")


def test_the_known_library_notices_are_silenced_at_their_source():
    """transformers' torchvision notice, diffusers' "No LoRA keys associated to CLIPTextModel" (both loaders),
    huggingface_hub's `local_dir_use_symlinks` deprecation (passed by diffusers on every hub download)."""
    import logging
    import warnings

    from mitune.runs.console import quiet_libraries

    assert {"transformers.utils.import_utils", "diffusers.loaders.lora_base", "diffusers.loaders.peft"} <= set(LIBRARY_LOGGERS)
    quiet_libraries()
    for name in ("diffusers.loaders.peft", "diffusers.loaders.lora_base", "transformers.utils.import_utils"):
        assert not logging.getLogger(name).isEnabledFor(logging.WARNING)
    assert any("local_dir_use_symlinks" in message for message, _ in HARMLESS_WARNINGS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_libraries()
        from huggingface_hub.utils import _validators

        _validators.smoothly_deprecate_legacy_arguments("hf_hub_download", {"local_dir_use_symlinks": "auto"})
    assert not [w for w in caught if "local_dir_use_symlinks" in str(w.message)]


@pytest.mark.slow  # a subprocess per case
@pytest.mark.parametrize("full_error", [False, True])
def test_a_hydra_composition_error_is_one_line_unless_the_traceback_is_asked_for(full_error, tmp_path):
    """Hydra's own errors (a key that does not exist) printed several lines and its HYDRA_FULL_ERROR hint."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "MITUNE_DEBUG")}
    env.update({"HF_HUB_OFFLINE": "1", **({"HYDRA_FULL_ERROR": "1"} if full_error else {})})
    result = subprocess.run([sys.executable, "-m", "mitune.evaluate", "nosuch=1", f"hydra.run.dir={tmp_path}"],
                            cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 1
    if full_error:
        assert "Traceback" in result.stderr
    else:
        assert result.stderr.splitlines() == [(
            "mitune.evaluate: error: Could not override 'nosuch'. To append to your config use +nosuch=1 "
            "(Key 'nosuch' is not in struct full_key: nosuch object_type=dict)")]
        assert "HYDRA_FULL_ERROR" not in result.stdout + result.stderr
