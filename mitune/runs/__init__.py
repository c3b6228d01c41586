"""The run dir and its conventions: file names (``artifacts``), the config record and lock (``record``),
checkpoints, atomic writes, seeds, SIGTERM, loggers and the console."""
