"""Files and directories that appear complete or not at all.

Everything the tool writes that a later run reads back (caches, factor files, exports, checkpoints)
is built under a scratch name beside its target and renamed onto it once complete, so a stop at any
moment leaves either the old target or the new one, never half of one. Scratch names end in
:data:`SCRATCH_SUFFIX` and carry the process id, so concurrent writers never share one.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCRATCH_SUFFIX = ".partial"


def scratch_path(target: Path) -> Path:
    """A name beside ``target`` that no other process or earlier call in this one uses."""
    return target.with_name(f"{target.name}.{os.getpid()}-{time.monotonic_ns()}{SCRATCH_SUFFIX}")


def remove(path: Path) -> None:
    """Remove a file or a directory tree, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def move_into_place(scratch: Path, target: Path, keep_existing: bool = False) -> None:
    """Rename the complete ``scratch`` onto ``target``.

    A file replaces the target in one rename. A directory cannot be renamed onto a non-empty one, so an
    existing target directory is removed first (a stop in between leaves no target, which readers treat
    as never written). With ``keep_existing`` a target that exists wins and the scratch is dropped: for
    caches that several processes may build at once, all the same.
    """
    if target.exists() and (keep_existing or target.is_dir()):
        if keep_existing:
            remove(scratch)
            return
        remove(target)
    os.replace(scratch, target)


@contextmanager
def written_atomically(target: str | Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a scratch path for the block to write ``target``'s content into (a file or a directory).

    When the block completes, the scratch is moved onto ``target`` (:func:`move_into_place`); when it
    raises, or the process is interrupted, the scratch is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = scratch_path(target)
    try:
        yield scratch
    except BaseException:
        remove(scratch)
        raise
    move_into_place(scratch, target, keep_existing)
