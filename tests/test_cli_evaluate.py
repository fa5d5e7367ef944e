"""`python -m hpo.evaluate` as a user runs it, on the embedded model at short lengths."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from models.baselines import yarn
from models.rope import RopeGeometry

pytestmark = pytest.mark.real_model

# A pretend 128-token window makes 256 tokens a 2x extension while keeping the forwards short.
SHORT = ["--lengths", "256", "--samples", "2", "--original-length", "128", "--no-progress"]


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpo.evaluate", *args], capture_output=True, text=True,
                          timeout=600)


def test_table_and_json_with_a_factor_file(tmp_path):
    factor_file = yarn(RopeGeometry(64, 100000.0, 128), 256).save(tmp_path / "yarn_copy.json")
    out = tmp_path / "results.json"
    result = evaluate(*SHORT, "--methods", "none,pi,yarn", "--factors", str(factor_file), "--json", str(out),
                      "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    for method in ("none", "pi", "yarn", "yarn_copy"):
        assert method in result.stdout
    rows = {row["method"]: row for row in json.loads(out.read_text())["results"]}
    assert set(rows) == {"none", "pi", "yarn", "yarn_copy"}
    assert all(row["length"] == 256 and row["windows"] == 2 and row["tokens"] == 2 * 255 for row in rows.values())
    assert all(row["dtype"] == "float32" for row in rows.values()) and "perplexity (seconds), float32" in result.stdout
    assert rows["yarn_copy"]["perplexity"] == pytest.approx(rows["yarn"]["perplexity"], rel=1e-6)
    assert rows["pi"]["perplexity"] != pytest.approx(rows["none"]["perplexity"], rel=1e-6)


def test_a_hand_made_curve_by_its_table_name():
    result = evaluate(*SHORT, "--methods", "yarn,yarn (32/1),ntk+attn (s=3)", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    perplexities = {line.split("|")[0].strip(): line.split("|")[1].split()[0]
                    for line in result.stdout.splitlines() if "|" in line}
    assert {"yarn", "yarn (32/1)", "ntk+attn (s=3)"} <= set(perplexities)
    assert perplexities["yarn"] == perplexities["yarn (32/1)"]  # the default betas are 32/1


def test_position_bins_split_the_window_and_pool_back_to_its_perplexity(tmp_path):
    out = tmp_path / "results.json"
    result = evaluate(*SHORT, "--methods", "pi", "--position-bins", "2", "--json", str(out), "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["results"]
    whole = [row for row in rows if row["depth"] is None]
    bins = sorted((row for row in rows if row["depth"] is not None), key=lambda row: row["depth"])
    assert len(whole) == 1 and [row["depth"] for row in bins] == [0.25, 0.75]
    assert [row["tokens"] for row in bins] == [2 * 127, 2 * 128]  # token 0 of each window is never scored
    pooled = sum(row["tokens"] * math.log(row["perplexity"]) for row in bins) / whole[0]["tokens"]
    assert math.exp(pooled) == pytest.approx(whole[0]["perplexity"], rel=1e-9)
    assert "ppl by position" in result.stdout and "pi @25.0%" in result.stdout and "pi @75.0%" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "none,rope"], "unknown method(s) rope"),
        (["--factors", "missing.json"], "does not exist"),
        (["--lengths", "400000"], "text too short"),
        (["--data", "no/such/corpus.txt"], "unknown corpus"),
    ],
)
def test_bad_input_exits_2_with_a_message(args, message):
    result = evaluate(*SHORT[:-1], "--no-progress", *args) if "--lengths" not in args else evaluate(
        "--samples", "1", "--no-progress", "--methods", "none", *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_wrong_length_factor_file(tmp_path):
    factor_file = yarn(RopeGeometry(48, 100000.0, 128), 256).save(tmp_path / "short.json")
    result = evaluate(*SHORT, "--methods", "", "--factors", str(factor_file))
    assert result.returncode == 2
    assert "24 rescale factors given" in result.stderr and "needs 32" in result.stderr
