"""`pti info` and `pti convert` through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from clirun import run_pti
from helpers import small_generator, write_nvidia_pickle
from pti.cli import app
from pti.engine.checkpoint import generator_hash, load_generator

runner = CliRunner()


@pytest.fixture(scope="module")
def pkl(tmp_path_factory):
    return write_nvidia_pickle(tmp_path_factory.mktemp("ckpt") / "network-snapshot-000100.pkl", small_generator())


def test_info_builtin_says_it_is_untrained():
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    assert "not a trained model" in result.output
    assert "num_ws" in result.output and "content hash" in result.output


def test_info_pkl_json(pkl):
    result = runner.invoke(app, ["info", str(pkl), "--json"])
    assert result.exit_code == 0, result.output
    rec = json.loads(result.output)
    assert rec["format"] == "stylegan2-ada-pkl"
    assert (rec["resolution"], rec["num_ws"], rec["fp16_resolutions"], rec["conv_clamp"]) == (16, 6, [16], 256)
    assert rec["params_total"] == rec["params_mapping"] + rec["params_synthesis"]
    assert rec["content_hash"] == generator_hash(load_generator(pkl))


def test_convert_then_info_same_hash(tmp_path, pkl):
    out = tmp_path / "g.safetensors"
    result = runner.invoke(app, ["convert", str(pkl), str(out)])
    assert result.exit_code == 0, result.output
    digest = generator_hash(load_generator(pkl))
    assert digest in result.output
    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and digest in info.output and "pti-safetensors" in info.output
    a, b = load_generator(pkl).state_dict(), load_generator(out).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # refuses to overwrite without --force
    again = runner.invoke(app, ["convert", str(pkl), str(out)])
    assert again.exit_code != 0
    assert runner.invoke(app, ["convert", str(pkl), str(out), "--force"]).exit_code == 0


def test_convert_builtin(tmp_path):
    proc = run_pti("convert", "builtin:tiny", tmp_path / "tiny.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert generator_hash(load_generator(tmp_path / "tiny.safetensors")) == generator_hash(load_generator())
