"""MI-TUNE: self-supervised text-to-image alignment with point-wise mutual information.

The tasks are ``mitune.run``, ``mitune.evaluate``, ``mitune.summary``, ``mitune.analysis``,
``mitune.rerank`` and the ``mitune`` command (``mitune.cli``); the MI library is ``mitune.mi``.
Importing the package does nothing beyond naming where its shipped files are.
"""

from pathlib import Path

ASSETS = Path(__file__).with_name("assets")
