"""What every ``python -m hpo.*`` command sets up before it starts: its logging."""

from __future__ import annotations

import logging

import optuna
import transformers


def configure_logging(quiet: bool = False) -> None:
    """INFO lines with timestamps (WARNING with ``quiet``, which also hides transformers' loading bars);
    Optuna's per-trial lines are left out: the commands report trials themselves."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if quiet:
        transformers.logging.disable_progress_bar()  # "Loading weights" and "Writing model shards"
