"""What a person at a terminal sees, through the installed console script on a pseudo-terminal 80 columns
wide: names and package hints printed as written (Rich markup never eats `[b]` or `[ray]`), tables laid
out for the width (no value broken inside a word, less important columns left out and named), `--json`
and piped output with every value whole, and proper plurals in the summaries."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import termios

import numpy as np
import pytest
from PIL import Image

from clirun import env_with, no_traceback, pti_bin, run_pti

WIDTH = 80
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def run_in_terminal(*args, env: dict, cwd=None, columns: int = WIDTH, timeout: float = 300) -> tuple[int, str]:
    """`pti ARGS` with stdin, stdout and stderr on a pseudo-terminal `columns` wide; the exit code and what
    the terminal showed, colour and cursor codes removed, one string per line."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {**env, "COLUMNS": str(columns)}
    proc = subprocess.Popen([pti_bin(), *map(str, args)], stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd)
    os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            if not ready:
                proc.kill()
                raise AssertionError(f"pti {' '.join(map(str, args))} did not finish in {timeout} s")
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its side of the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    code = proc.wait(timeout)
    text = ANSI.sub("", b"".join(chunks).decode("utf-8", "replace")).replace("\r\n", "\n")
    return code, text


def summary_table(text: str) -> list[str]:
    """The lines of tune's summary table: from its title to the first `NAME: wrote ...` line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "pti tune")
    end = next(i for i, line in enumerate(lines) if i > start and ": wrote " in line)
    return lines[start:end]


# ------------------------------------------------------------------------------------------- help texts

COMMANDS = [
    "demo",
    "tune",
    "render",
    "export",
    "studio",
    "directions",
    "directions ganspace",
    "align",
    "generate",
    "info",
    "convert",
    "import",
    "weights",
    "weights list",
    "weights fetch",
    "weights import",
    "bench",
]


def test_help_prints_pip_extras_as_written():
    """Typer renders help as Rich markup: `pti[ray]` must not lose its `[ray]` as a style tag."""
    env = env_with(COLUMNS="250")  # wide: a wrapped line must not be what hides the extra
    helps = {}
    for cmd in COMMANDS:
        p = run_pti(*cmd.split(), "--help", env=env)
        assert p.returncode == 0 and no_traceback(p), (cmd, p.stderr)
        helps[cmd] = p.stdout
        assert "install 'pti'" not in p.stdout, cmd
    assert "pip install 'pti[ray]'" in helps["tune"]
    assert "pip install 'pti[video]'" in helps["render"]


# ------------------------------------------------------------------------- a photo named a[b]c.png

STEPS = ["--invert-steps", "4", "--tune-steps", "3", "--device", "cpu", "--no-align"]


@pytest.fixture(scope="module")
def bracketed(tmp_path_factory):
    """`pti tune a[b]c.png` on a pseudo-terminal 80 columns wide (empty weights cache: weight-free losses)."""
    tmp = tmp_path_factory.mktemp("brackets")
    photo = tmp / "a[b]c.png"
    Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8)).save(photo)
    env = env_with(PTI_HOME=str(tmp / "cache"), TERM="xterm")
    code, text = run_in_terminal("tune", photo, "-o", tmp / "out", *STEPS, env=env)
    assert code == 0, text
    return dict(
        tmp=tmp,
        photo=photo,
        out=tmp / "out",
        env=env,
        text=text,
        report=json.loads((tmp / "out" / "a[b]c" / "report.json").read_text()),
    )


@pytest.mark.slow
def test_a_file_name_with_brackets_prints_intact_in_a_terminal_and_piped(bracketed):
    text = bracketed["text"]
    assert "ac.png" not in text and "ac.pti" not in text, text  # what Rich leaves of a[b]c when it reads [b] as bold
    assert any("a[b]c.png" in line for line in summary_table(text)), text
    piped = run_pti("tune", bracketed["photo"], "-o", bracketed["tmp"] / "piped", *STEPS, env=bracketed["env"])
    assert piped.returncode == 0, piped.stderr
    assert "ac.png" not in piped.stdout and "ac.pti" not in piped.stdout, piped.stdout
    assert "a[b]c.png" in piped.stdout


@pytest.mark.slow
def test_a_warning_that_names_an_extra_prints_intact(bracketed, tmp_path):
    """`--mp4` without imageio-ffmpeg warns `pip install 'pti[video]'`; the render line names a[b]c.pti whole."""
    from pti.engine import edits as E
    from pti.engine.generator import tiny_generator

    dirs = E.save_ganspace(E.ganspace(tiny_generator(), components=2, samples=200, seed=0), tmp_path / "d.pt")
    missing = tmp_path / "missing"  # imageio_ffmpeg as if not installed, whatever this machine has
    (missing / "imageio_ffmpeg").mkdir(parents=True)
    (missing / "imageio_ffmpeg" / "__init__.py").write_text("raise ImportError('imageio_ffmpeg is not installed')\n")
    env = {**bracketed["env"], "PYTHONPATH": str(missing)}
    p = run_pti(
        "render",
        bracketed["out"] / "a[b]c.pti",
        "--edit",
        f"{dirs}:0=-1:1:3",
        "--mp4",
        "-o",
        tmp_path / "r",
        "--device",
        "cpu",
        env=env,
    )
    assert p.returncode == 0, p.stderr
    assert "pip install 'pti[video]'" in p.stdout, p.stdout
    assert "a[b]c.pti" in p.stdout and "ac.pti" not in p.stdout, p.stdout


# ------------------------------------------------------------------------------------- tables at 80


def test_tune_summary_fits_80_columns_without_splitting_a_value(bracketed):
    rep, lines = bracketed["report"], summary_table(bracketed["text"])
    assert len(lines) >= 5, bracketed["text"]  # title, rules, header, a row
    assert max(map(len, lines)) <= WIDTH, "\n".join(lines)
    b, a = rep["before_tuning"], rep["after_tuning"]
    key = "lpips_alex" if "lpips_alex" in a else "perceptual_weight_free"
    for value in (f"{b['mse']:.4f}->{a['mse']:.4f}", f"{b[key]:.4f}->{a[key]:.4f}", "a[b]c.png"):
        assert any(value in line for line in lines), (value, "\n".join(lines))


def test_one_photo_is_one_photo_in_the_summary(bracketed):
    again = run_pti("tune", bracketed["photo"], "-o", bracketed["out"], *STEPS, env=bracketed["env"])
    assert again.returncode == 0, again.stderr
    assert "1 photo: 0 done, 1 skipped, 0 failed" in again.stdout and "1 photos" not in again.stdout, again.stdout


@pytest.fixture()
def cache(tmp_path):
    """A weights cache holding one imported file (a first-use sha256 of its own) beside the missing ones."""
    from pti.engine import weights as W

    env = env_with(PTI_HOME=str(tmp_path / "cache"), TERM="xterm")
    fake = tmp_path / "ffhq.pkl"
    fake.write_bytes(b"not really a generator")
    p = run_pti("weights", "import", fake, "--name", "ffhq", env=env)
    assert p.returncode == 0, p.stderr
    piped = run_pti("weights", "list", env=env)
    assert piped.returncode == 0, piped.stderr
    head, *rows = [line.split("\t") for line in piped.stdout.splitlines()]
    return dict(
        env=env, home=tmp_path / "cache", entries=W.DEFAULT_ENTRIES, rows={r[0]: dict(zip(head, r)) for r in rows}
    )


def test_weights_list_fits_80_columns_and_never_splits_a_value(cache):
    code, text = run_in_terminal("weights", "list", env=cache["env"])
    assert code == 0, text
    first, *lines = [line for line in text.splitlines() if line.strip()]
    # The cache folder is one word, never broken: the terminal wraps that line if it must.
    assert first == f"weights cache: {cache['home']}", text
    assert max(map(len, lines)) <= WIDTH, text
    # At most three lines per file plus the header, rules and notes (166 lines before).
    assert len(lines) <= 3 * len(cache["entries"]) + 12, text
    digests = [row["sha256"] for row in cache["rows"].values() if re.fullmatch(r"[0-9a-f]{64}", row["sha256"])]
    assert digests, cache["rows"]
    for digest in digests:
        assert any(digest[:12] in line for line in lines), (digest, text)  # a prefix at least, in one piece
    for e in cache["entries"]:
        assert any(re.search(rf"(^|\W){re.escape(e.name)}(\W|$)", line) for line in lines), (e.name, text)
    assert "--json" in text
    # An ellipsis only where a digest is deliberately shortened, never a value Rich cut.
    assert all(re.search(r"[0-9a-f]{12}\u2026", line) for line in lines if "\u2026" in line), text


def test_weights_list_json_keeps_every_value_whole(cache):
    for code, out in (
        run_in_terminal("weights", "list", "--json", env=cache["env"]),
        (lambda p: (p.returncode, p.stdout))(run_pti("weights", "list", "--json", env=cache["env"])),
    ):
        assert code == 0, out
        listed = {w["name"]: w for w in json.loads(out)["weights"]}
        assert set(listed) == {e.name for e in cache["entries"]}
        for e in cache["entries"]:
            w, row = listed[e.name], cache["rows"][e.name]
            assert (w["source"], w["license"], w["used_by"], w["status"]) == (
                e.url,
                e.license,
                e.used_by,
                row["status"],
            )
            assert w["path"] == row["path"] and w["format"] == row["format"] and w["checksum"] == row["checksum"]
            if re.fullmatch(r"[0-9a-f]{64}", row["sha256"]):
                assert w["sha256"] == row["sha256"]
            else:
                assert w["sha256"] is None
        assert listed["ffhq"]["bytes"] == int(cache["rows"]["ffhq"]["bytes"])
