"""Logging for the command line: what ``--quiet`` and ``--verbose`` mean for every command."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(quiet: bool, verbose: bool) -> None:
    """Log INFO to stderr (WARNING with ``quiet``, DEBUG with ``verbose``); ``quiet`` also hides
    the progress bars of transformers, Optuna and datasets."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        logging.getLogger("optuna").setLevel(logging.WARNING)
        # datasets' "Generating ... split" bars (a first run caching lm-eval's local task data):
        # datasets reads the variable when imported, so it is set before, and a user's value kept
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
