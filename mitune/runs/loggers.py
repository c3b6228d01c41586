"""Lightning loggers as a resumable run needs them."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from mitune.runs.io import write_text


class AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts; a resumed run must
    keep its earlier rounds' rows, so this one starts from the file's columns and appends. Rows a resumed
    run logs again (steps from its checkpoint's global step on, logged before the run stopped) are dropped
    first, so each step appears once."""

    def __init__(self, log_dir: str, resume_step: int | None = None) -> None:
        self.resume_step = resume_step
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            text = file.read()
        reader = csv.DictReader(io.StringIO(text))
        self.metrics_keys = list(reader.fieldnames or [])
        if self.resume_step is None:
            return
        rows = list(reader)
        kept = [row for row in rows if not row.get("step") or int(float(row["step"])) < self.resume_step]
        if len(kept) < len(rows):
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=self.metrics_keys, lineterminator="\n")
            writer.writeheader()
            writer.writerows(kept)
            write_text(Path(self.metrics_file_path), buffer.getvalue())


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose resumed run appends to ``metrics.csv`` (new columns are merged in); ``resume_from``
    says from which global step the run continues."""

    resume_step: int | None = None

    def resume_from(self, global_step: int) -> None:
        """Rows of steps >= ``global_step`` were logged after the checkpoint and are logged again: drop them."""
        self.resume_step = global_step

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingWriter:
        if self._experiment is None:
            self._experiment = AppendingWriter(log_dir=self.log_dir, resume_step=self.resume_step)
        return self._experiment
