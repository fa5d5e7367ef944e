"""Bad input gets one clear line and exit status 2, not a traceback (and nothing is written)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from dashboards import report, serve
from hpo import evaluate
from hpo.run import main as run_main
from models.loading import ModelLoadError, load_model
from models.rope import FactorError, RopeFactors
from tests.conftest import run_tiny_study


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return run_tiny_study(tmp_path_factory.mktemp("tiny"))


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
