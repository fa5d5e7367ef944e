"""What every ``python -m hpo.*`` command sets up before it starts: its logging, and the options they share."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable

import optuna
import transformers

from hpo.records import StorageError
from models.assets import AssetError
from models.loading import ModelLoadError


def configure_logging(quiet: bool = False) -> None:
    """INFO lines with timestamps (WARNING with ``quiet``, which also hides transformers' loading bars);
    Optuna's per-trial lines are left out: the commands report trials themselves."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if quiet:
        transformers.logging.disable_progress_bar()  # "Loading weights" and "Writing model shards"


DTYPE_CHOICES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")  # models.loading.pick_dtype's


def add_dtype_argument(parser: argparse.ArgumentParser, default: str | None, what: str) -> None:
    """``--dtype``, the same in every command; :func:`checked_dtype` checks it inside the command's error handling."""
    parser.add_argument("--dtype", default=default, metavar="DTYPE",
                        help=f"{what}: {', '.join(DTYPE_CHOICES)}. The LongRoPE reference evaluates in fp16 "
                             "(float16); auto is bf16 on GPUs that compute it natively, and on a CPU the type "
                             "measured fastest for the model (a probe of a few seconds, cached per machine)")


def checked_dtype(dtype: str | None) -> str | None:
    """``dtype`` unchanged if known, else a one-line error before the model and the text are loaded."""
    if dtype is not None and dtype not in DTYPE_CHOICES:
        raise ValueError(f"unknown --dtype {dtype!r}; choose from {', '.join(DTYPE_CHOICES)}")
    return dtype


def positive(kind: type, allow_zero: bool = False):
    """An argparse type: a number of ``kind`` that is > 0 (>= 0 with ``allow_zero``)."""
    def parse(text: str):
        value = kind(text)
        if value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if allow_zero else '> 0'}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid value" message
    return parse


def comma_separated(kind: type):
    """An argparse type: comma-separated values of ``kind`` (``"0.25,0.5"``), as a tuple."""
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(item) for item in text.split(",") if item.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None

    parse.__name__ = f"comma-separated {kind.__name__}"
    return parse


# What a user can fix (a wrong name or value, a model or a cluster that cannot be reached, a text too short,
# a factor file of the wrong length, a broken storage URL): one line and exit status 2, not a traceback.
# The errors of a bad input (PresetError, StudyError, ResultsError, FactorError, DataError, RulerError,
# GgufExportError...) are ValueErrors; the others are the runtime errors of what the command reaches.
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, StorageError, AssetError, ModelLoadError)


def command(interrupted: str | None = None, more_errors: tuple[type[Exception], ...] = ()
            ) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a command's ``main``: a :data:`USER_ERRORS` (or one of ``more_errors``, those of layers the
    readers must not import, such as the runner's backend) becomes ``error: ...`` on stderr and status 2,
    and with ``interrupted`` a Ctrl-C (or a stop signal turned into one) prints ``interrupted: ...`` and
    exits 130 (what to run to continue); without it, Ctrl-C propagates as usual."""
    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def checked(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except (*USER_ERRORS, *more_errors) as error:
                print(f"error: {error}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                if interrupted is None:
                    raise
                print(f"interrupted: {interrupted}", file=sys.stderr)
                return 130
        return checked
    return decorate
