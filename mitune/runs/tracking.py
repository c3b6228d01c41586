"""Experiment tracking shared by training, evaluation and the summaries: loggers, W&B, run names.

Imports nothing heavy at module level (Hydra, W&B and the configured loggers only inside the
functions that need them), so light entry points (``mitune.summary``, ``mitune.evaluate``) can use
it without pulling in the training stack.

A sweep's W&B runs are grouped by the sweep dir and named by the task and the values the sweep
varies (``color-cfg2.5``), so a grid can be found and compared in the W&B UI; the configs use
these through the ``${mitune.run_name:...}`` and ``${mitune.sweep_group:}`` resolvers. Each job's dir
is named by its swept overrides (``${mitune.job_dirname:}``, e.g. ``exp-color__seed-1``): Hydra's override_dirname
holds all of a job's overrides, too long for a file name once a command has a dozen, and its ``=`` and ``,``
make a path Hydra's grammar refuses as a value (``run_dir=...``).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Short names of commonly swept keys in W&B run names; other keys appear as `<last part>=<value>`.
SHORT_KEYS = {
    "generation.guidance_scale": "cfg",
    "generation.num_candidates": "M",
    "generation.top_k": "k",
    "rounds": "R",
    "seed": "seed",
    "eval.round": "r",
}


def wandb_offline_without_key() -> None:
    """Run W&B offline unless credentials are configured, so a machine without a W&B account
    logs locally instead of stopping at a login prompt; an explicit ``WANDB_MODE`` always wins."""
    if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"


def setup_wandb() -> None:
    """Offline without a key (above), and W&B's own console output off unless ``WANDB_SILENT`` is set:
    its banner and run history would outnumber mitune's lines; ``wandb_summary`` says where the run is."""
    wandb_offline_without_key()
    if "WANDB_SILENT" not in os.environ:
        import wandb

        wandb.setup(settings=wandb.Settings(silent=True))


def wandb_summary(run: Any) -> str:
    """One line: the W&B run's name and group, where it is, and how to upload it when offline."""
    where = Path(run.dir).parent
    group = f", group {run.group}" if run.group else ""
    if run.offline:
        return f"W&B: offline run {run.name}{group} in {where}; upload with `wandb sync {where}`"
    return f"W&B: run {run.name}{group} at {run.url}"


def make_loggers(cfg: Any, wandb_run_id: str | None = None) -> list[Any]:
    """The loggers of ``cfg.logger``; W&B runs offline without credentials, and a resumed run
    continues its W&B run (``wandb_run_id``, saved in the checkpoint)."""
    from hydra.utils import instantiate

    if "wandb" in cfg.logger:
        setup_wandb()
    loggers = []
    for name, spec in cfg.logger.items():
        extra = {"id": wandb_run_id} if name == "wandb" and wandb_run_id else {}
        loggers.append(instantiate(spec, **extra))
    return loggers


def start_wandb(loggers: list[Any], say: bool = True) -> str | None:
    """Create the W&B run of ``loggers`` (if one logs to W&B); says where it is (``say``) and returns that line.

    Called only once a job has got past loading its model and inputs: a job that fails before leaves no
    W&B run (an offline one would be uploaded by ``wandb sync`` as a crashed run)."""
    for logger in loggers:
        if hasattr(logger, "log_table"):  # Lightning's WandbLogger: its run is made on first use
            where = wandb_summary(logger.experiment)
            if say:
                log.info(where)
            return where
    return None


def finish_wandb() -> None:
    """Close the W&B run, if one is open, even after a failure, so a failed multirun job does not
    break the sweep."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


# ----------------------------------------------------------------------------- sweeps


def hydra_job() -> Any | None:
    """The running Hydra job's ``hydra`` config; None outside a Hydra app (e.g. ``compose`` in tests)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def in_sweep(hydra: Any | None) -> bool:
    from hydra.types import RunMode

    return hydra is not None and hydra.mode == RunMode.MULTIRUN


def swept_keys(sweep_dir: Path) -> set[str] | None:
    """Keys a sweep varies, from the ``multirun.yaml`` Hydra's sweeper writes into the sweep dir; None
    when it is not there (then all of a job's overrides name it)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    overrides = OverridesParser.create().parse_overrides(list(OmegaConf.load(path).hydra.overrides.task))
    return {o.key_or_group for o in overrides if o.is_sweep_override()}


def swept_overrides(hydra: Any) -> list[Any]:
    """This job's overrides of the keys its sweep varies (Hydra ``Override`` objects), sorted."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    swept = swept_keys(Path(hydra.sweep.dir))
    overrides = OverridesParser.create().parse_overrides(list(hydra.overrides.task))
    return sorted((o for o in overrides if swept is None or o.key_or_group in swept), key=lambda o: o.input_line)


def job_dirname() -> str:
    """A sweep job's dir: its swept overrides (``+exp=color generation.guidance_scale=2.5`` ->
    ``exp-color__generation.guidance_scale-2.5``), or the job number when the sweep varies nothing."""
    hydra = hydra_job()
    return dirname_of(swept_overrides(hydra)) or str(hydra.job.num)


def dirname_of(overrides: list[Any]) -> str:
    """``<key>-<value>`` per override, joined by ``__``, in characters Hydra's grammar takes unquoted: the dir can
    be passed back as it is (``run_dir=outputs/multiruns/<time>/exp-color__seed-1``), where Hydra's own
    override_dirname (``+exp=color,seed=1``) needs nested quoting for its ``=`` and ``,``."""
    def plain(text: str) -> str:
        return re.sub(r"[^\w.+@%-]", "_", text)

    return "__".join(plain(o.key_or_group.lstrip("+~")) + "-" + plain(o.get_value_element_as_str().strip("'\""))
                     for o in overrides)


def name_part(key: str, value: str) -> str:
    return f"{SHORT_KEYS[key]}{value}" if key in SHORT_KEYS else f"{key.split('.')[-1]}={value}"


def run_name(task_name: str) -> str:
    """``<task>-<short key><value>...`` for the keys this job's sweep varies; the task alone outside a sweep.

    A value the task name already says (``+exp=color`` with task ``color``) is left out.
    """
    hydra = hydra_job()
    if not in_sweep(hydra):
        return task_name
    values = ((o.key_or_group, o.get_value_element_as_str()) for o in swept_overrides(hydra))
    return "-".join([task_name, *(name_part(k, v) for k, v in values if v != task_name)])


def sweep_group() -> str | None:
    """The sweep dir, as W&B group of all its jobs' runs; None for a single run."""
    hydra = hydra_job()
    return str(hydra.sweep.dir) if in_sweep(hydra) else None


def run_config(cfg: Any, **derived: Any) -> dict[str, Any]:
    """The resolved config as logged: plus the job's Hydra overrides (and sweep) and ``derived`` values
    that no config key holds (e.g. the gradient accumulation computed from the batch sizes)."""
    from omegaconf import OmegaConf

    logged = OmegaConf.to_container(cfg, resolve=True)
    hydra = hydra_job()
    if hydra is not None:
        logged["hydra"] = {"overrides": list(hydra.overrides.task), "job_dir": hydra.runtime.output_dir,
                           "sweep_dir": hydra.sweep.dir if in_sweep(hydra) else None}
    if derived:
        logged["derived"] = derived
    return logged


# Where a job's composed config goes, as Hydra names it. Hydra itself writes it before the task runs
# (``hydra.output_subdir``); mitune's configs turn that off and the tasks write it once the run dir has
# accepted the config, so a refused start leaves a finished run's files as they were.
HYDRA_FILES = ".hydra"


def save_hydra_files(task_cfg: Any, out_dir: Path) -> None:
    """The job's config.yaml, hydra.yaml and overrides.yaml, as Hydra writes them (nothing outside a Hydra app)."""
    from omegaconf import OmegaConf

    from mitune.runs.io import write_text

    hydra = hydra_job()
    if hydra is None:
        return
    folder = Path(out_dir) / HYDRA_FILES
    hydra_node = OmegaConf.create({"hydra": OmegaConf.to_container(hydra, resolve=False)})
    for name, node in (("config.yaml", task_cfg), ("hydra.yaml", hydra_node), ("overrides.yaml", hydra.overrides.task)):
        write_text(folder / name, OmegaConf.to_yaml(node))
