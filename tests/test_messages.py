"""Bad input gets one clear line and exit status 2, not a traceback (and nothing is written)."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dashboards import report, serve
from hpo import evaluate
from hpo.finetune import main as finetune_main
from hpo.run import main as run_main
from models import assets
from models.baselines import yarn
from models.loading import ModelLoadError, load_model
from models.rope import FactorError, RopeFactors, RopeGeometry
from objectives.data import DataError, load_documents


@pytest.mark.parametrize(("device", "line"), [("cuda:7", "device 'cuda:7'"), ("quantum", "unknown device 'quantum'")])
def test_a_device_this_machine_lacks(tmp_path, capsys, device, line):
    assert run_main(["--study", "tiny", "--out", str(tmp_path), "--device", device, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and line in err


@pytest.mark.parametrize(("flag", "value", "line"), [("--seed", "-1", "--seed: must be >= 0"),
                                                     ("--n-trials", "0", "--n-trials: must be > 0"),
                                                     ("--samples", "-2", "--samples: must be > 0")])
def test_a_bad_number_names_its_flag_before_anything_loads(tmp_path, capsys, flag, value, line):
    with pytest.raises(SystemExit) as exited:
        run_main(["--study", "tiny", "--out", str(tmp_path), flag, value])
    assert exited.value.code == 2 and line in capsys.readouterr().err


def test_a_sliding_stride_of_zero_is_refused_not_ignored(capsys):
    with pytest.raises(SystemExit) as exited:
        evaluate.main(["--model", "tiny-random-llama", "--sliding-stride", "0"])
    assert exited.value.code == 2 and "--sliding-stride: must be > 0" in capsys.readouterr().err


def test_a_local_path_that_does_not_exist_is_not_a_hub_id(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model directory or file"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelLoadError, match="no such model directory or file"):
        load_model("./no-such-model")


def test_a_factor_file_with_a_string_version(tmp_path):
    path = tmp_path / "factors.json"
    path.write_text(json.dumps({"version": "2", "rescale_factors": [1.0], "original_length": 8, "target_length": 16}))
    with pytest.raises(FactorError, match="version must be an integer, got '2'"):
        RopeFactors.load(path)


def test_report_html_that_is_a_directory(run_dir, tmp_path, capsys):
    assert report.main(["--study", "tiny", "--out", str(run_dir), "--html", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a directory" in err


def test_serve_on_a_port_in_use(run_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "dashboards.serve", "--study", "tiny", "--out", str(run_dir),
                               "--port", str(port)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: cannot serve on 127.0.0.1:{port}")
    assert "--port 0" in done.stderr


def test_serve_with_a_port_out_of_range(capsys):
    with pytest.raises(SystemExit) as exited:
        serve.main(["--study", "tiny", "--port", "70000"])
    assert exited.value.code == 2 and "--port: must be from 0 to 65535" in capsys.readouterr().err



@pytest.fixture
def not_utf8(tmp_path):
    """A text file, a JSON Lines file, a directory of texts and a factor file, each with a byte that is not UTF-8."""
    (tmp_path / "bad.txt").write_bytes(b"hello \xff world")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("fine")
    (tmp_path / "texts" / "b.txt").write_bytes(b"\xfe\xff")
    (tmp_path / "factors.json").write_bytes(b'{"rescale_factors": [1.0], "method": "caf\xe9"}')
    return tmp_path


@pytest.mark.parametrize(("source", "bad_file", "where"), [("bad.txt", "bad.txt", "byte 0xff at offset 6"),
                                                           ("bad.jsonl", "bad.jsonl", "byte 0xe9 at offset 30"),
                                                           ("texts", "texts/b.txt", "byte 0xfe at offset 0")])
def test_a_text_file_that_is_not_utf8_is_named(not_utf8, source, bad_file, where):
    with pytest.raises(DataError) as raised:
        load_documents(str(not_utf8 / source))
    assert str(raised.value) == f"cannot read {not_utf8 / bad_file}: not UTF-8 text ({where})"


def test_a_factor_file_that_is_not_utf8_is_named(not_utf8):
    with pytest.raises(FactorError) as raised:
        RopeFactors.load(not_utf8 / "factors.json")
    assert str(raised.value) == f"cannot read {not_utf8 / 'factors.json'}: not UTF-8 text (byte 0xe9 at offset 41)"


@pytest.mark.parametrize(("flag", "name", "where"), [("--data", "bad.txt", "byte 0xff at offset 6"),
                                                     ("--factors", "factors.json", "byte 0xe9 at offset 41")])
def test_evaluate_names_a_file_that_is_not_utf8(not_utf8, capsys, flag, name, where):
    code = evaluate.main(["--model", "tiny-random-llama", "--methods", "none", "--lengths", "64", "--samples", "1",
                          "--no-progress", flag, str(not_utf8 / name)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    # the model loads first (transformers may draw its loading bar); then one line
    assert [line for line in err.splitlines() if "error" in line] == [
        f"error: cannot read {not_utf8 / name}: not UTF-8 text ({where})"]


# the real SmolLM2 GGUF cut in its header, in its metadata (the tokenizer) and in its tensor data
@pytest.fixture(params=[8, 2048, 2 << 20], ids=["header", "metadata", "tensor-data"])
def truncated_gguf(request, tmp_path):
    with assets.smollm2_gguf_path().open("rb") as whole:
        head = whole.read(request.param)
    assert head[:4] == b"GGUF"
    path = tmp_path / "model.gguf"
    path.write_bytes(head)
    return path, f"cannot read {path} ({request.param:,} bytes; truncated or corrupt?): "


def test_a_truncated_gguf_is_named_as_truncated(truncated_gguf):
    path, start = truncated_gguf
    with pytest.raises(ModelLoadError) as raised:
        load_model(str(path), dtype="float32")
    assert str(raised.value).startswith(start) and "\n" not in str(raised.value)


def test_evaluate_with_a_truncated_gguf(truncated_gguf, capsys):
    path, start = truncated_gguf
    assert evaluate.main(["--model", str(path), "--methods", "none", "--lengths", "64", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {start}") and err.count("\n") == 1


def other_window_factors(tmp_path, original_length: int) -> Path:
    """YaRN factors for the tiny random llama's rotary dim (16) but another window than its 128 tokens."""
    return yarn(RopeGeometry(16, 10000.0, original_length), 2 * original_length).save(
        tmp_path / f"yarn_{original_length}.json")


def window_warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.levelno == logging.WARNING and "original window" in record.getMessage()]


def test_a_factor_file_for_another_window_is_used_with_a_warning(tmp_path, caplog):
    path = other_window_factors(tmp_path, 64)
    factors = RopeFactors.load(path, RopeGeometry(16, 10000.0, 128))
    assert factors.original_length == 64
    assert window_warnings(caplog) == [f"factor file {path}: made for an original window of 64 tokens (64 -> 128), "
                                       "but the model's is 128 tokens; applying them as they are"]
    caplog.clear()
    RopeFactors.load(path, RopeGeometry(16, 10000.0, 64))
    assert window_warnings(caplog) == []


def test_evaluate_a_factor_file_for_another_window(tmp_path, caplog, capsys):
    path = other_window_factors(tmp_path, 256)
    assert evaluate.main(["--model", "tiny-random-llama", "--methods", "", "--factors", str(path), "--lengths", "128",
                          "--samples", "1", "--no-progress"]) == 0
    assert "yarn_256" in capsys.readouterr().out
    (warning,) = window_warnings(caplog)
    assert str(path) in warning and "256 tokens (256 -> 512), but the model's is 128 tokens" in warning


def test_finetune_with_a_factor_file_for_another_window(tmp_path, caplog, capsys):
    path = other_window_factors(tmp_path, 256)  # the tiny preset trains at 256 tokens: not beyond this window
    assert finetune_main(["--study", "tiny", "--out", str(tmp_path / "run"), "--factors", str(path)]) == 2
    assert "must be longer than the original window 256" in capsys.readouterr().err
    (warning,) = window_warnings(caplog)
    assert "the yarn factors: made for an original window of 256 tokens" in warning
    assert "the model's is 128 tokens" in warning


def test_a_preset_file_that_is_not_utf8_is_named(tmp_path, capsys):
    preset = tmp_path / "latin1.toml"
    preset.write_bytes('description = "caf\xe9"\ntarget_length = 256\n'.encode("latin-1"))
    assert run_main(["--study", str(preset), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot read {preset}: not UTF-8 text (byte 0xe9 at offset 18)" in err
