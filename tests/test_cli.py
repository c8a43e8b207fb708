"""The CLI as a person uses it: fast help, outputs where expected, one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pti.cli import app

runner = CliRunner()


def _main(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pti.cli", *args], capture_output=True, text=True, timeout=300, env=env)


def test_help_lists_commands_without_importing_torch():
    code = "import sys; from pti.cli import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", "pti --help must not import torch (it must appear in under a second)"
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("demo", "tune", "align", "generate", "info", "convert", "weights"):
        assert cmd in res.output


def test_generate_writes_one_png_per_seed_and_a_grid(tmp_path):
    res = runner.invoke(app, ["generate", "--seeds", "0-2,5", "--trunc", "0.7", "--noise-mode", "const", "--outdir", str(tmp_path), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "not a trained model" in " ".join(res.output.split())
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["grid.png", "seed0000.png", "seed0001.png", "seed0002.png", "seed0005.png"]
    a = np.asarray(Image.open(tmp_path / "seed0000.png"))
    assert a.shape == (64, 64, 3)
    # same seed, same image; different seeds differ
    again = tmp_path / "again"
    runner.invoke(app, ["generate", "--seeds", "0", "--outdir", str(again), "--device", "cpu"])
    assert np.array_equal(a, np.asarray(Image.open(again / "seed0000.png")))
    assert not np.array_equal(a, np.asarray(Image.open(tmp_path / "seed0001.png")))


@pytest.mark.parametrize("args,needle", [
    (["generate", "--seeds", "3-1"], "cannot read seeds"),
    (["generate", "--noise-mode", "loud"], "--noise-mode"),
    (["generate", "--network", "/nonexistent/ffhq.pkl"], "/nonexistent/ffhq.pkl"),
    (["tune", "/nonexistent/photo.jpg"], "photo.jpg"),
])
def test_errors_are_one_line_with_nonzero_exit(args, needle, tmp_path):
    res = _main(*args, "--device", "cpu") if args[0] == "generate" else _main(*args, "-o", str(tmp_path), "--device", "cpu")
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0], res.stderr


def test_cuda_without_gpu_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    res = _main("generate", "--device", "cuda", "--outdir", str(tmp_path))
    assert res.returncode == 1 and "no CUDA GPU" in res.stderr


def test_tune_cli_writes_identity_report_and_renders(tmp_path, monkeypatch):
    monkeypatch.setenv("PTI_HOME", str(tmp_path / "cache"))  # empty cache: weight-free losses, said plainly
    import skimage.data

    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(photo)
    out = tmp_path / "out"
    res = runner.invoke(app, ["tune", str(photo), "-o", str(out), "--invert-steps", "4", "--tune-steps", "3", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "WEIGHT-FREE" in " ".join(res.output.split())
    assert (out / "astronaut.pti").is_file()
    for name in ("aligned.png", "pivot.png", "reconstruction.png", "contact.png", "report.json"):
        assert (out / "astronaut" / name).is_file(), name
    report = json.loads((out / "astronaut" / "report.json").read_text())
    assert report["steps"] == {"invert": 4, "tune": 3}
    assert report["device"] == "cpu" and report["precision"] == "fp32"
    assert report["official_losses"] is False
    assert "astronaut.pti" in res.output
    assert not list(out.rglob("*.tmp"))


def test_ctrl_c_during_tune_leaves_no_partial_files_and_says_what_was_kept(tmp_path):
    import os
    import signal
    import time

    import skimage.data

    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(photo)
    out = tmp_path / "out"
    env = {**os.environ, "PTI_HOME": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "pti.cli", "tune", str(photo), "-o", str(out), "--invert-steps", "100000",
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (out / "astronaut" / "aligned.png").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)  # now inside the inversion loop
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "interrupted" in last and "aligned.png" in last, err
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["astronaut/aligned.png"]  # complete files only; no .tmp, no .pti
