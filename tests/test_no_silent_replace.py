"""Never replace a person's identity silently (issue 16, part 2), and the tune-side defects of part 4.

Two different photos with the same file name tuned into one folder must not overwrite each other: the
second run refuses before any work, naming both photos, and `--force` replaces. The same for renders of
different identities into one folder. All through the installed console script, on the built-in tiny
generator (64 px) with pre-aligned photos and a few steps, so each run takes seconds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clirun import env_with, error_lines, files_under, no_traceback, run_pti

FAST = ["--no-align", "--invert-steps", "2", "--tune-steps", "2", "--device", "cpu"]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PTI_HOME", str(tmp_path / "pti-home"))


def _photo(path: Path, seed: int, size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_same_name_from_another_photo_is_refused_and_force_replaces(tmp_path):
    a = _photo(tmp_path / "dirA" / "face.png", 0)
    b = _photo(tmp_path / "dirB" / "face.png", 1)
    out = tmp_path / "out"
    first = run_pti("tune", a, "-o", out, *FAST)
    assert first.returncode == 0, first.stderr
    before = _sha(out / "face.pti")

    second = run_pti("tune", b, "-o", out, *FAST)
    assert second.returncode == 1 and no_traceback(second), second.stderr
    lines = error_lines(second.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert str(a) in lines[0] and str(b) in lines[0] and "--force" in lines[0]
    assert _sha(out / "face.pti") == before  # untouched
    assert [r["status"] for r in _manifest(out)] == ["done"]  # no second row for the file

    forced = run_pti("tune", b, "-o", out, *FAST, "--force")
    assert forced.returncode == 0, forced.stderr
    assert _sha(out / "face.pti") != before
    rows = _manifest(out)
    assert rows[-1]["photo"] == str(b.resolve()) and rows[-1]["status"] == "done"


@pytest.mark.slow
def test_the_same_photo_again_resumes_and_a_folder_clash_is_refused_before_any_work(tmp_path):
    a = _photo(tmp_path / "dirA" / "face.png", 0)
    out = tmp_path / "out"
    assert run_pti("tune", a, "-o", out, *FAST).returncode == 0
    again = run_pti("tune", a, "-o", out, *FAST)
    assert again.returncode == 0 and "skipped" in again.stdout, again.stdout + again.stderr
    # a copy of the same photo elsewhere is the same person: no clash
    copy = tmp_path / "copy" / "face.png"
    copy.parent.mkdir()
    copy.write_bytes(a.read_bytes())
    assert run_pti("tune", copy, "-o", out, *FAST).returncode == 0

    folder = tmp_path / "dirC"
    _photo(folder / "other.png", 2)
    _photo(folder / "face.png", 3)  # clashes with out/face.pti
    before = files_under(out)
    clash = run_pti("tune", folder, "-o", out, *FAST)
    assert clash.returncode == 1 and no_traceback(clash)
    assert len(error_lines(clash.stderr)) == 1 and "face.png" in clash.stderr
    assert files_under(out) == before  # refused before any photo was tuned


@pytest.mark.slow
def test_joint_runs_refuse_the_same_way(tmp_path):
    a = _photo(tmp_path / "dirA" / "face.png", 0)
    b = _photo(tmp_path / "dirB" / "face.png", 1)
    other = _photo(tmp_path / "dirB" / "other.png", 2)
    out = tmp_path / "out"
    assert run_pti("tune", a, "-o", out, *FAST).returncode == 0
    before = _sha(out / "face.pti")
    joint = run_pti("tune", other, b, "-o", out, *FAST, "--joint")
    assert joint.returncode == 1 and str(b) in joint.stderr
    assert _sha(out / "face.pti") == before and not (out / "other.pti").exists()


@pytest.mark.slow
def test_renders_of_another_identity_into_one_folder_are_refused(tmp_path):
    out = tmp_path / "out"
    a = _photo(tmp_path / "a.png", 0)
    b = _photo(tmp_path / "b.png", 1)
    assert run_pti("tune", a, b, "-o", out, *FAST).returncode == 0
    edits = tmp_path / "edits"
    first = run_pti("render", out / "a.pti", "-o", edits, "--device", "cpu")
    assert first.returncode == 0, first.stderr
    png = edits / "reconstruction.png"
    before = _sha(png)
    again = run_pti("render", out / "a.pti", "-o", edits, "--device", "cpu")  # the same person: fine
    assert again.returncode == 0, again.stderr

    other = run_pti("render", out / "b.pti", "-o", edits, "--device", "cpu")
    assert other.returncode == 1 and no_traceback(other)
    line = error_lines(other.stderr)
    assert len(line) == 1 and "a.pti" in line[0] and "--force" in line[0]
    assert _sha(png) == before
    forced = run_pti("render", out / "b.pti", "-o", edits, "--device", "cpu", "--force")
    assert forced.returncode == 0, forced.stderr
    assert _sha(png) != before
    assert json.loads((edits / "render.json").read_text())["identity"].endswith("b.pti")


@pytest.mark.slow
def test_a_file_that_pti_did_not_write_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    assert run_pti("tune", _photo(tmp_path / "a.png", 0), "-o", out, *FAST).returncode == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "reconstruction.png").write_bytes(b"my own picture")
    proc = run_pti("render", out / "a.pti", "-o", mine, "--device", "cpu")
    assert proc.returncode == 1 and "reconstruction.png" in proc.stderr
    assert (mine / "reconstruction.png").read_bytes() == b"my own picture"


def test_an_export_into_a_folder_of_other_files_is_refused(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"my own model")
    proc = run_pti("export", "builtin:tiny", "--format", "onnx", "-o", folder)
    assert proc.returncode == 1 and no_traceback(proc) and "--force" in proc.stderr
    assert len(error_lines(proc.stderr)) == 1
    assert (folder / "model.onnx").read_bytes() == b"my own model"


@pytest.mark.slow
def test_the_base_generator_path_is_stored_absolute(tmp_path):
    """An identity tuned on a checkpoint given by a relative path renders from any folder."""
    work = tmp_path / "work"
    work.mkdir()
    made = run_pti("convert", "builtin:tiny", "tiny.safetensors", cwd=work)
    assert made.returncode == 0, made.stderr
    _photo(work / "p.png", 0)
    assert run_pti("tune", "p.png", "--network", "tiny.safetensors", "-o", "out", *FAST, cwd=work).returncode == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_pti("render", work / "out" / "p.pti", "-o", "edits", "--device", "cpu", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr


def test_a_photo_smaller_than_the_generator_is_refused_with_no_align(tmp_path):
    out = tmp_path / "out"
    proc = run_pti("tune", _photo(tmp_path / "tiny.png", 0, size=1), "-o", out, *FAST)
    assert proc.returncode == 1 and no_traceback(proc)
    assert len(error_lines(proc.stderr)) == 1 and "1x1" in proc.stderr and "64" in proc.stderr
    assert not (out / "tiny.pti").exists()


def test_a_bad_photo_in_a_joint_run_leaves_nothing(tmp_path):
    good = _photo(tmp_path / "a.png", 0)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    proc = run_pti("tune", good, bad, "-o", out, *FAST, "--joint")
    assert proc.returncode == 1 and no_traceback(proc)
    assert not out.exists() or files_under(out) == [], files_under(out)


@pytest.mark.parametrize(
    "argv",
    [
        ["render", "{pti}", "-o", "{tmp}/r/edits", "--backend", "onnx", "--engine", "{tmp}/no-export"],
        ["align", "{tmp}/noface.png", "-o", "{tmp}/r/aligned"],
        ["export", "{pti}", "--format", "tensorrt", "-o", "{tmp}/r/exp"],
        ["tune", "{tmp}/a.png", "-o", "{tmp}/r/out", "--ray", "127.0.0.1:1", *FAST],
    ],
    ids=["render", "align", "export", "ray"],
)
@pytest.mark.slow
def test_failed_runs_leave_no_empty_folders(tmp_path, argv):
    out = tmp_path / "out"
    assert run_pti("tune", _photo(tmp_path / "a.png", 0), "-o", out, *FAST).returncode == 0
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(tmp_path / "noface.png")
    args = [a.format(pti=out / "a.pti", tmp=tmp_path) for a in argv]
    proc = run_pti(*args)
    assert proc.returncode == 1 and no_traceback(proc), proc.stderr
    assert len(error_lines(proc.stderr)) == 1, proc.stderr
    assert not (tmp_path / "r").exists(), files_under(tmp_path / "r")


def test_device_is_reported_as_given_and_checked_before_writing(tmp_path):
    proc = run_pti("demo", "--device", "cuda:7", "--out", tmp_path / "demo", env=env_with(CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 1 and "cuda:7" in proc.stderr, proc.stderr
    assert not (tmp_path / "demo").exists()


def test_tune_progress_names_the_loss_it_uses_and_the_note_comes_once(tmp_path):
    photos = [_photo(tmp_path / f"p{i}.png", i) for i in range(2)]
    proc = run_pti("tune", *photos, "-o", tmp_path / "out", *FAST)
    assert proc.returncode == 0, proc.stderr
    tune_lines = [line for line in proc.stdout.splitlines() if line.startswith("tune ")]
    assert tune_lines and all("1-ms_ssim" in line and "lpips" not in line for line in tune_lines), tune_lines
    assert proc.stdout.count("WEIGHT-FREE loss") == 1, proc.stdout


@pytest.mark.slow
def test_worker_processes_show_progress_per_photo_as_it_happens(tmp_path):
    photos = [_photo(tmp_path / f"p{i}.png", i) for i in range(2)]
    proc = run_pti("tune", *photos, "-o", tmp_path / "out", *FAST, "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for name in ("p0", "p1"):
        assert any(line.startswith(f"{name} invert ") for line in lines), proc.stdout
        assert any(line.startswith(f"{name} tune ") for line in lines), proc.stdout
    first_summary = next(i for i, line in enumerate(lines) if line.startswith("photo: "))
    assert any(line.startswith("p0 tune ") for line in lines[:first_summary])


@pytest.mark.slow
def test_ray_address_where_no_cluster_answers_is_one_line(tmp_path):
    """A server that accepts connections and never answers (what a firewall or proxy can look like): Ray
    itself would retry for about 20 s, a log line a second; pti says so in one line."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    threading.Thread(target=lambda: held.extend(server.accept() for _ in range(4)), daemon=True).start()
    try:
        port = server.getsockname()[1]
        proc = run_pti(
            "tune",
            _photo(tmp_path / "a.png", 0),
            "-o",
            tmp_path / "out",
            *FAST,
            "--ray",
            f"127.0.0.1:{port}",
            timeout=60,
        )
    finally:
        server.close()
    assert proc.returncode == 1 and no_traceback(proc)
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "Ray cluster" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()
