"""A quiet console for mitune's entry points: mitune's own messages, library chatter off at its source.

Importing this module sets the levels of a few library loggers (stdlib only, so an entry point can
import it before the libraries that would print while being imported); ``quiet_libraries`` also
turns off the libraries' own progress bars and silences two known, harmless library warnings by
their exact text. Library users who import ``mitune`` alone keep the libraries' defaults.
``one_line_errors`` ends a task on an error that says what to set or fetch with that line alone.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

LIBRARY_LOGGERS = {
    # transformers' notice, on importing diffusers, that image processors fall back to PIL without
    # torchvision (mitune never uses torchvision).
    "transformers.utils.import_utils": logging.ERROR,
    # Lightning's accelerator inventory, product tips and "`Trainer.fit` stopped": the run says what it did.
    "lightning.pytorch.utilities.rank_zero": logging.WARNING,
    "lightning.fabric.utilities.rank_zero": logging.WARNING,
    # "No LoRA keys associated to CLIPTextModel" on loading an adapter that trained the UNet alone (the
    # default; the adapter's own metadata lists the components it holds), once per evaluation job.
    "diffusers.loaders.lora_base": logging.ERROR,
    "diffusers.loaders.peft": logging.ERROR,
}

HARMLESS_WARNINGS = [
    # torch deprecates `isinstance(x, LeafSpec)`, which Lightning's own pytree helper still uses.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree"),
    # The frozen base model stays in eval mode on purpose (it has no dropout or batch statistics);
    # only the adapter layers train.
    (r"Found \d+ module\(s\) in eval mode at the start of training", r"lightning\.pytorch\.loops\.fit_loop"),
    # A resume finds the run's own checkpoints in its checkpoint folder (mitune.runs.record: one run per dir).
    (r"Checkpoint directory .* exists and is not empty", r"lightning\.pytorch\.callbacks\.model_checkpoint"),
    # diffusers' config loader passes huggingface_hub a deprecated argument on every hub download; nothing
    # a user can change.
    (r"The `local_dir_use_symlinks` argument is deprecated", r"huggingface_hub\.utils\._validators"),
]


def quiet_library_loggers() -> None:
    for name, level in LIBRARY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def quiet_libraries() -> None:
    """Loggers as above, no model-loading progress bars, and the known harmless warnings filtered."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    quiet_library_loggers()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    for message, module in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)


quiet_library_loggers()


def one_line(err: BaseException) -> str:
    """The error's message on one line, even where a library's message has several."""
    return " ".join(str(err).split())


def user_errors() -> tuple[type[Exception], ...]:
    """What bad input raises in mitune's tasks: a setting's value or type (ValueError, TypeError, omegaconf's
    errors: a missing or misspelt key), a path (OSError: missing, unreadable, not writable). Their messages
    name the key or file; a bug raises something else and keeps its traceback."""
    from omegaconf.errors import OmegaConfBaseException

    return ValueError, TypeError, OSError, OmegaConfBaseException


_REPORTING_HYDRA_ERRORS = False  # set by ``hydra_task``, which turns Hydra's own reporting off


def debugging() -> bool:
    """``HYDRA_FULL_ERROR=1`` (Hydra's own switch, as the user set it) or ``MITUNE_DEBUG=1``: errors keep their
    full traceback."""
    if os.environ.get("MITUNE_DEBUG") == "1":
        return True
    return not _REPORTING_HYDRA_ERRORS and os.environ.get("HYDRA_FULL_ERROR") == "1"


def hydra_task(main: Callable[[], Any], task: str) -> None:
    """Run a ``@hydra.main`` task so that Hydra's own errors (an override of a key that does not exist, a config
    group option that is not there) are one line too, without Hydra's "Set the environment variable
    HYDRA_FULL_ERROR=1" hint: Hydra is told to raise (its ``HYDRA_FULL_ERROR``) and ``one_line_errors`` reports."""
    global _REPORTING_HYDRA_ERRORS
    from hydra.errors import HydraException

    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        os.environ["MITUNE_DEBUG"] = "1"  # the user asked for tracebacks
    os.environ["HYDRA_FULL_ERROR"] = "1"
    _REPORTING_HYDRA_ERRORS = True
    with one_line_errors(task, HydraException):
        main()


@contextmanager
def one_line_errors(task: str, *errors: type[Exception]) -> Iterator[None]:
    """User errors (``user_errors``) and ``errors`` end the task with ``<task>: error: <message>`` on stderr
    and exit status 1: their message says what to set or fetch, and a traceback and Hydra's
    "Set the environment variable HYDRA_FULL_ERROR=1" hint would bury it. ``debugging()`` keeps the traceback."""
    try:
        yield
    except (*user_errors(), *errors) as err:
        if debugging():
            raise
        cause = err.__cause__  # Hydra's composition errors say what went wrong in their cause
        detail = f" ({one_line(cause)})" if cause is not None and str(cause) not in str(err) else ""
        print(f"{task}: error: {one_line(err)}{detail}", file=sys.stderr)
        raise SystemExit(1) from None
