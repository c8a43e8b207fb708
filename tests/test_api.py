"""`pti.tune(...)`, the whole pipeline as a function: files, report, silence, and Ctrl-C.

Runs on the built-in tiny generator with an empty weights cache (PTI_HOME points at a temp dir), so
the weight-free losses are used; a few steps per phase keep each run to a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pti
import pti.api
from pti.engine.identity import Identity
from pti.engine.invert import InvertConfig
from pti.engine.tune import TuneConfig

skimage_data = pytest.importorskip("skimage.data")

SMALL = dict(invert_cfg=InvertConfig(steps=4), tune_cfg=TuneConfig(max_steps=4, lpips_threshold=0.0))
FILES = ("aligned.png", "pivot.png", "reconstruction.png", "report.json", "contact.png")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PTI_HOME", str(tmp_path / "pti-home"))  # never read the user's cache


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(path)
    return path


def _leftovers(folder: Path) -> list[Path]:
    """Temp or partial files: atomic writes name their temp files .<name>.<random>.tmp."""
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


def test_tune_writes_every_file_and_prints_nothing(tmp_path, photo, capsys) -> None:
    out = tmp_path / "out"
    results = pti.tune([photo], out=out, **SMALL)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""

    assert len(results) == 1
    res = results[0]
    assert res.name == "astronaut"
    for name in FILES:
        assert (out / "astronaut" / name).is_file(), name
    assert res.identity == out / "astronaut.pti" and res.identity.is_file()
    assert sorted(p.name for p in out.iterdir()) == ["astronaut", "astronaut.pti", "manifest.jsonl", "summary.csv"]
    assert _leftovers(out) == []

    report = json.loads((out / "astronaut" / "report.json").read_text())
    for phase in ("before_tuning", "after_tuning"):
        assert {"mse", "ms_ssim"} <= set(report[phase]), phase
    assert {"align", "invert", "tune"} <= set(report["seconds"])
    assert report["steps"] == {"invert": 4, "tune": 4}
    assert report["device"] == "cpu" and report["precision"] == "fp32"
    assert report["official_losses"] is False and "WEIGHT-FREE" in report["notice"]  # an empty cache says so
    assert report["after_tuning"]["mse"] < report["before_tuning"]["mse"]
    assert set(report) == set(res.report)  # the returned report is the one written

    from PIL import Image

    for name in ("aligned.png", "pivot.png", "reconstruction.png"):
        assert Image.open(out / "astronaut" / name).size == (64, 64), name
    ident = Identity.load(res.identity)
    assert ident.base_hint == "builtin:tiny" and not ident.exact
    assert ident.meta["steps"] == {"invert": 4, "tune": 4}


class _StopAt:
    """A progress callback that presses Ctrl-C at (phase, step)."""

    def __init__(self, phase: str, step: int):
        self.phase, self.step, self.calls = phase, step, []

    def __call__(self, phase, step, total, values):
        self.calls.append((phase, step))
        if (phase, step) == (self.phase, self.step):
            raise KeyboardInterrupt


def _assert_clean(out: Path, kept: list[Path]) -> None:
    from PIL import Image

    assert _leftovers(out) == []
    on_disk = sorted(p for p in out.rglob("*") if p.is_file())
    assert on_disk == sorted(kept)  # everything left is listed, everything listed is there
    for p in kept:  # and complete
        if p.suffix == ".png":
            Image.open(p).load()
        elif p.suffix == ".pti":
            Identity.load(p)


def test_ctrl_c_during_tuning_keeps_only_complete_files(tmp_path, photo) -> None:
    out = tmp_path / "out"
    stop = _StopAt("tune", 2)
    with pytest.raises(pti.api.TuneInterrupted) as info:
        pti.tune([photo], out=out, progress=stop, **SMALL)
    kept = info.value.kept
    assert sorted(p.name for p in kept) == ["aligned.png", "pivot.png"]
    assert ("invert", 4) in stop.calls  # it really got to tuning
    _assert_clean(out, kept)
    assert not (out / "astronaut.pti").exists() and not (out / "astronaut" / "reconstruction.png").exists()
    assert info.value.exit_code == 130 and "interrupted" in str(info.value)


def test_ctrl_c_while_the_identity_file_is_written(tmp_path, photo, monkeypatch) -> None:
    import safetensors.torch

    def dying_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save_file)
    out = tmp_path / "out"
    with pytest.raises(pti.api.TuneInterrupted) as info:
        pti.tune([photo], out=out, **SMALL)
    kept = info.value.kept
    assert sorted(p.name for p in kept) == ["aligned.png", "pivot.png", "reconstruction.png"]
    _assert_clean(out, kept)


def test_ctrl_c_before_anything_is_written(tmp_path, photo) -> None:
    out = tmp_path / "out"
    with pytest.raises(pti.api.TuneInterrupted) as info:
        pti.tune([photo], out=out, progress=_StopAt("align", 0), **SMALL)
    assert info.value.kept == []
    assert "Kept: nothing" in str(info.value)
    assert not out.exists() or _leftovers(out) == [] and not any(p.is_file() for p in out.rglob("*"))
