"""The CLI as a person uses it, through the installed console script: fast help, outputs where
expected, a log-friendly summary that keeps every value, and `pti info` on identity files.
(Errors, interrupts and exit codes: test_cli_contract.py.)"""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from clirun import env_with, files_under, run_pti


def test_help_lists_commands_without_importing_torch():
    code = "import sys; import pti.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", "pti --help must not import torch (it must appear in under a second)"
    res = run_pti("--help")
    assert res.returncode == 0
    for cmd in ("demo", "tune", "align", "generate", "info", "convert", "import", "weights"):
        assert cmd in res.stdout


def test_generate_writes_one_png_per_seed_and_a_grid(tmp_path):
    res = run_pti(
        "generate",
        "--seeds",
        "0-2,5",
        "--trunc",
        "0.7",
        "--noise-mode",
        "const",
        "--outdir",
        tmp_path,
        "--device",
        "cpu",
    )
    assert res.returncode == 0, res.stderr
    assert "not a trained model" in res.stdout
    assert files_under(tmp_path) == ["grid.png", "seed0000.png", "seed0001.png", "seed0002.png", "seed0005.png"]
    a = np.asarray(Image.open(tmp_path / "seed0000.png"))
    assert a.shape == (64, 64, 3)
    # same seed, same image; different seeds differ
    again = tmp_path / "again"
    assert run_pti("generate", "--seeds", "0", "--outdir", again, "--device", "cpu").returncode == 0
    assert np.array_equal(a, np.asarray(Image.open(again / "seed0000.png")))
    assert not np.array_equal(a, np.asarray(Image.open(tmp_path / "seed0001.png")))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """`pti tune` on the astronaut with output piped (a log file, not a terminal)."""
    import skimage.data

    tmp = tmp_path_factory.mktemp("tune")
    photo = tmp / "astronaut_with_a_long_file_name_for_the_summary.png"
    Image.fromarray(skimage.data.astronaut()).save(photo)
    out = tmp / "out"
    res = run_pti(
        "tune",
        photo,
        "-o",
        out,
        "--invert-steps",
        "4",
        "--tune-steps",
        "3",
        "--device",
        "cpu",
        env=env_with(PTI_HOME=str(tmp / "cache")),
    )  # empty cache: weight-free losses, said plainly
    assert res.returncode == 0, res.stderr
    return photo, out, res


def test_tune_writes_identity_report_and_renders(tuned):
    photo, out, res = tuned
    name = photo.stem
    assert "WEIGHT-FREE" in res.stdout
    assert files_under(out) == sorted(
        [f"{name}.pti", "manifest.jsonl", "summary.csv"]
        + [f"{name}/{f}" for f in ("aligned.png", "pivot.png", "reconstruction.png", "contact.png", "report.json")]
    )
    report = json.loads((out / name / "report.json").read_text())
    assert report["steps"] == {"invert": 4, "tune": 3}
    assert report["device"] == "cpu" and report["precision"] == "fp32"
    assert report["official_losses"] is False


def test_piped_tune_output_keeps_every_value(tuned):
    photo, out, res = tuned
    report = json.loads((out / photo.stem / "report.json").read_text())
    assert "…" not in res.stdout and "..." not in res.stdout
    summary = [line for line in res.stdout.splitlines() if line.startswith("photo: ")]
    assert len(summary) == 1
    line = summary[0]
    assert f"photo: {photo}" in line and f"identity: {out / (photo.stem + '.pti')}" in line
    b, a = report["before_tuning"], report["after_tuning"]
    assert f"MSE before->after: {b['mse']:.4f}->{a['mse']:.4f}" in line
    key = "perceptual_weight_free"
    assert f"{key} before->after: {b[key]:.4f}->{a[key]:.4f}" in line
    # progress is logged as lines (each phase's last step at least), not as a terminal bar
    assert "invert 4/4" in res.stdout and "tune 3/3" in res.stdout


def test_info_on_an_identity_file(tuned):
    photo, out, _ = tuned
    ident = out / f"{photo.stem}.pti"
    report = json.loads((out / photo.stem / "report.json").read_text())
    res = run_pti("info", ident, "--json")
    assert res.returncode == 0, res.stderr
    rec = json.loads(res.stdout)
    assert rec["kind"] == "identity" and rec["bytes"] == ident.stat().st_size
    assert rec["base_hash"] == report["base_hash"] and rec["base_hint"] == "builtin:tiny"
    assert rec["pivot_shape"] == [10, 64] and rec["encoding"] == "delta-fp16" and rec["weights_dtype"] == ["float16"]
    assert rec["before_tuning"] == report["before_tuning"] and rec["after_tuning"] == report["after_tuning"]
    assert rec["tune_config"] == report["tune_config"] and rec["versions"] == report["versions"]
    text = run_pti("info", ident)
    assert text.returncode == 0
    rows = dict(re.match(r"(\S.*?)\s{2,}(.*)", line).groups() for line in text.stdout.splitlines())  # "key   value"
    assert rows["base generator"] == "builtin:tiny (found)" and rows["base hash"] == report["base_hash"]
    for needle in (
        "pivot",
        "[10, 64] float32",
        "fp16 deltas",
        "locality on",
        f"{report['before_tuning']['mse']:.4f} -> {report['after_tuning']['mse']:.4f}",
        f"pti {report['versions']['pti']}",
    ):
        assert needle in text.stdout, (needle, text.stdout)


def test_identity_file_given_as_network_says_what_it_is(tuned, tmp_path):
    photo, out, _ = tuned
    ident = out / f"{photo.stem}.pti"
    res = run_pti("generate", "--network", ident, "--seeds", "0", "--outdir", tmp_path / "g", "--device", "cpu")
    assert res.returncode == 1
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "is a pti identity file" in lines[0] and f"pti info {ident}" in lines[0]
