"""Shared fixtures: a tiny random llama for fast tests, the real embedded model where behaviour must be real."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY_WINDOW = 64


def tiny_llama_config(**rope_parameters) -> LlamaConfig:
    """A 2-layer llama with head_dim 16 (8 rotary pairs) and a 64-token window."""
    return LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=TINY_WINDOW,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **rope_parameters},
        attn_implementation="eager", tie_word_embeddings=False,
    )


def tiny_llama(**rope_parameters) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(**rope_parameters)).eval()


@pytest.fixture
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def input_ids() -> torch.Tensor:
    """Longer than the tiny window, so rescaling matters."""
    return torch.randint(0, 128, (1, 3 * TINY_WINDOW), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def real_model():
    """The embedded SmolLM2-135M (fetched into the cache by `make test`'s set-up)."""
    from models.loading import load_model

    return load_model("smollm2-135m", dtype="float32")


def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql: `make test` installs "
                           "Debian's postgresql package; install it by hand with apt-get install postgresql")
    return found[-1].parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server on loopback, run as the `postgres` user when we are root."""
    binaries = _postgres_bin()
    # not under pytest's tmp dir: that is private to root, and the server user must reach its files
    data_dir = Path(tempfile.mkdtemp(prefix="longrope-hpo-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(data_dir, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()

    def run(*args) -> None:
        done = subprocess.run([*as_user, *map(str, args)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(str(args[0])).name} failed: {done.stderr or done.stdout}")

    run(binaries / "initdb", "-D", data_dir / "db", "-U", "longrope", "--auth=trust")
    run(binaries / "pg_ctl", "-D", data_dir / "db", "-l", data_dir / "log", "-w", "start",
        "-o", f"-p {port} -k {data_dir} -c listen_addresses=127.0.0.1")
    try:
        run(binaries / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "longrope", "studies")
        yield f"postgresql+psycopg://longrope@127.0.0.1:{port}/studies"
    finally:
        run(binaries / "pg_ctl", "-D", data_dir / "db", "-m", "immediate", "stop")
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def _tiny_study_once(tmp_path_factory) -> Path:
    """The tiny preset run for real once per test session (a random 2-layer llama, 128 -> 256 tokens, about 20 s)."""
    out = tmp_path_factory.mktemp("tiny-once")
    done = subprocess.run([sys.executable, "-m", "hpo.run", "--study", "tiny", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def run_dir(_tiny_study_once: Path, tmp_path_factory) -> Path:
    """A finished tiny study (storage and outputs) of the module's own, which its tests may add to freely."""
    out = tmp_path_factory.mktemp("tiny")
    shutil.copytree(_tiny_study_once, out, dirs_exist_ok=True)
    return out


@contextmanager
def deadline(seconds: int, what: str) -> Iterator[None]:
    """Fail the test with ``TimeoutError`` when the block (a wait on a condition) runs over ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"waited over {seconds}s for {what}")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
