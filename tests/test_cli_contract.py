"""One contract for every command, checked through the installed console script in a subprocess.

- a usage error prints the usage message and exits 2, and writes nothing;
- a PTIError (bad input, missing file, file-system trouble) prints one line and exits 1;
- Ctrl-C or SIGTERM prints "interrupted" and the complete files kept, exits 130, and leaves no
  temporary file behind;
- never a traceback, unless --debug is given (anywhere on the command line).
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from clirun import (
    can_drop_dac,
    drop_dac,
    env_with,
    error_lines,
    files_under,
    handlers_installed,
    no_traceback,
    run_pti,
    start_pti,
    temp_files_under,
    wait_until,
)

POSIX = os.name == "posix"
LINUX = sys.platform.startswith("linux")


@pytest.fixture(scope="module")
def astronaut(tmp_path_factory) -> Path:
    import skimage.data

    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(path)
    return path


# ------------------------------------------------------------------------------------ usage errors

USAGE_ERRORS = [
    ([], "Usage: pti"),  # no command: help, exit 2
    (["weights"], "Usage: pti weights"),  # group without subcommand
    (["tune", "--bogus"], "No such option"),
    (["tune", "x.png", "--bogus"], "No such option"),
    (["align", "x.png"], "Missing option"),  # -o is required
    (["convert", "builtin:tiny"], "Missing argument"),
    (["tune", "x.png", "--invert-steps", "abc"], "--invert-steps"),
    (["tune", "x.png", "--invert-steps", "0"], "--invert-steps"),
    (["tune", "x.png", "--tune-steps", "-5"], "--tune-steps"),
    (["tune", "x.png", "--lpips-threshold", "-1"], "--lpips-threshold"),
    (["tune", "x.png", "--locality-samples", "0"], "--locality-samples"),
    (["tune", "x.png", "--locality-interval", "0"], "--locality-interval"),
    (["tune", "x.png", "--seed", "-1"], "--seed"),
    (["tune", "x.png", "--face", "-1"], "--face"),
    (["tune", "x.png", "--space", "z"], "--space"),
    (["tune", "x.png", "--device", "gpu"], "--device"),
    (["generate", "--trunc", "x"], "--trunc"),
    (["generate", "--trunc", "-3"], "--trunc"),
    (["generate", "--seeds", "5-1"], "--seeds"),
    (["generate", "--seeds", "a-b"], "--seeds"),
    (["generate", "--seeds", "99999999999"], "--seeds"),
    (["generate", "--noise-mode", "loud"], "--noise-mode"),
    (["align", "x.png", "-o", "o", "--size", "10"], "--size"),
    (["align", "x.png", "-o", "o", "--face", "-1"], "--face"),
    (["convert", "builtin:tiny", "x.onnx"], ".safetensors"),
    (["info", "a", "b"], "unexpected extra argument"),
]


@pytest.mark.parametrize("args,needle", USAGE_ERRORS, ids=[" ".join(a) or "no-args" for a, _ in USAGE_ERRORS])
def test_usage_errors_exit_2_with_usage_and_write_nothing(args, needle, tmp_path):
    proc = run_pti(*args, cwd=tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert no_traceback(proc), proc.stderr
    text = " ".join((proc.stdout + proc.stderr).split())
    assert "Usage: pti" in text and needle.lower() in text.lower(), text
    assert files_under(tmp_path) == []


def test_help_is_exit_0_on_stdout():
    proc = run_pti("tune", "--help")
    assert proc.returncode == 0 and "Usage: pti tune" in proc.stdout and proc.stderr == ""
    assert "--invert-steps" in proc.stdout and "--debug" in run_pti("--help").stdout


# ------------------------------------------------------------------------------------ one-line errors


def test_pti_errors_are_one_line_exit_1(tmp_path):
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    cases = [
        (["tune", str(tmp_path / "missing.jpg"), "-o", str(tmp_path / "out")], "photo not found"),
        (["generate", "--network", str(tmp_path / "ffhq.pkl"), "-o", str(tmp_path / "g")], "ffhq.pkl: no such file"),
        (["info", str(tmp_path / "photo.png")], "is a PNG image"),
        (["align", str(tmp_path / "photo.png"), "-o", str(tmp_path / "a")], "photo.png"),
        (["weights", "path", "nonexistent"], "unknown weights"),
    ]
    for args, needle in cases:
        proc = run_pti(*args, env=env_with(PTI_HOME=str(tmp_path / "cache")))
        assert proc.returncode == 1, (args, proc.stderr)
        lines = error_lines(proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (args, proc.stderr)
        assert no_traceback(proc)
    assert not (tmp_path / "out").exists() and not (tmp_path / "g").exists()


def test_debug_anywhere_shows_the_traceback_and_keeps_the_exit_code(tmp_path):
    missing = str(tmp_path / "missing.jpg")
    for args in (["--debug", "tune", missing], ["tune", missing, "--debug"]):
        proc = run_pti(*args, cwd=tmp_path)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" in proc.stderr and "ImageError" in proc.stderr
        assert error_lines(proc.stderr)[-1] == f"error: photo not found: {missing}"


def test_cuda_without_gpu_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = run_pti("generate", "--device", "cuda", "--outdir", tmp_path)
    assert proc.returncode == 1 and "no CUDA GPU" in proc.stderr and len(error_lines(proc.stderr)) == 1


# ------------------------------------------------------------------------------------ file-system errors


@pytest.mark.parametrize("command", ["align", "generate", "tune", "demo"])
def test_output_folder_that_is_a_file(command, tmp_path, astronaut):
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    args = {
        "align": ["align", astronaut, "-o", blocker, "--no-align"],
        "generate": ["generate", "--seeds", "0", "--outdir", blocker, "--device", "cpu"],
        "tune": ["tune", astronaut, "-o", blocker, "--device", "cpu"],
        "demo": ["demo", "-o", blocker / "sub", "--device", "cpu"],
    }[command]
    proc = run_pti(*args, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and f"{blocker} is a file, not a folder" in lines[0], proc.stderr
    assert blocker.read_text() == "not a folder" and files_under(tmp_path) == ["results"]


def test_convert_onto_a_folder_or_an_existing_file(tmp_path):
    folder = tmp_path / "g.safetensors"
    folder.mkdir()
    proc = run_pti("convert", "builtin:tiny", folder)
    assert proc.returncode == 1 and error_lines(proc.stderr) == [f"error: cannot write {folder}: it is a folder"]
    existing = tmp_path / "h.safetensors"
    existing.write_bytes(b"mine")
    proc = run_pti("convert", "builtin:tiny", existing)
    assert proc.returncode == 1 and "--force" in proc.stderr and existing.read_bytes() == b"mine"


def test_missing_parent_folders_are_created(tmp_path):
    out = tmp_path / "a" / "b" / "c"
    proc = run_pti("generate", "--seeds", "0-1", "--outdir", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert files_under(out) == ["grid.png", "seed0000.png", "seed0001.png"]


@pytest.mark.skipif(
    not POSIX or not can_drop_dac(), reason="needs POSIX permissions that bind (root without CAP_SETPCAP)"
)
def test_read_only_output_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for args in (
            ["generate", "--seeds", "0", "--outdir", ro, "--device", "cpu"],
            ["generate", "--seeds", "0", "--outdir", ro / "sub", "--device", "cpu"],
            ["convert", "builtin:tiny", ro / "g.safetensors"],
        ):
            proc = run_pti(*args, preexec_fn=drop_dac)
            assert proc.returncode == 1, proc.stderr
            lines = error_lines(proc.stderr)
            assert len(lines) == 1 and "permission denied" in lines[0] and str(ro) in lines[0], proc.stderr
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def _small_tmpfs_available() -> bool:
    if not LINUX or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _small_tmpfs_available(), reason="needs `unshare --mount` and tmpfs mounts (root on Linux)")
def test_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (
        f'mount -t tmpfs -o size=48k tmpfs "{disk}" && "$0" "$@"; rc=$?; '
        f'ls -A "{disk}" > "{tmp_path}/left.txt"; exit $rc'
    )
    from clirun import pti_bin

    proc = subprocess.run(
        [
            "unshare",
            "--mount",
            "sh",
            "-c",
            script,
            pti_bin(),
            "generate",
            "--seeds",
            "0-100",
            "--outdir",
            str(disk),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env_with(),
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "no space left" in lines[0], proc.stderr
    left = (tmp_path / "left.txt").read_text().split()
    assert left and all(re.fullmatch(r"seed\d{4}\.png", name) for name in left), left  # complete files only


@pytest.mark.skipif(not POSIX, reason="RLIMIT_FSIZE is POSIX")
def test_file_size_limit_mid_write_is_one_line_and_leaves_no_partial_file(tmp_path):
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    out = tmp_path / "out"
    proc = run_pti("convert", "builtin:tiny", out / "tiny.safetensors", preexec_fn=limit)
    assert proc.returncode == 1, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "tiny.safetensors" in lines[0] and "larger than this system allows" in lines[0]
    assert files_under(out) == []


# ------------------------------------------------------------------------------------ interrupts


def _lists_kept(line: str, root: Path, kept: list[str]) -> bool:
    """The message names every kept file, or says how many there are in `root`."""
    return all(str(root / f) in line for f in kept) or f"{len(kept)} files in {root}/" in line


def _interrupted_line(err: str) -> str:
    lines = error_lines(err)
    assert lines and lines[-1].startswith("interrupted ("), err
    return lines[-1]


@pytest.mark.parametrize("sig,how", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_interrupting_generate_keeps_complete_files_and_says_so(sig, how, tmp_path):
    out = tmp_path / "gen"
    proc = start_pti("generate", "--seeds", "0-100000", "--outdir", out, "--device", "cpu")
    wait_until(lambda: len(list(out.glob("seed*.png"))) >= 5, proc, what="five seeds written")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    line = _interrupted_line(err)
    kept = files_under(out)
    assert temp_files_under(out) == [] and "grid.png" not in kept
    assert f"({how})" in line and f"{len(kept)} files in {out}/ (seed0000.png ... {kept[-1]})" in line, line
    for name in kept:
        Image.open(out / name).verify()  # every kept file is a whole PNG


def test_interrupting_align_over_a_folder(tmp_path, astronaut):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(40):
        shutil.copy(astronaut, photos / f"p{i:02d}.png")
    out = tmp_path / "aligned"
    proc = start_pti("align", photos, "-o", out, "--size", "64")
    wait_until(lambda: len(list(out.glob("p*.png"))) >= 2, proc, what="two photos aligned")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    line = _interrupted_line(err)
    kept = files_under(out)
    assert temp_files_under(out) == [] and 2 <= len(kept) < 40
    assert _lists_kept(line, out, kept), line


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupting_tune_mid_inversion(sig, tmp_path, astronaut):
    out = tmp_path / "out"
    proc = start_pti(
        "tune",
        astronaut,
        "-o",
        out,
        "--invert-steps",
        "100000",
        "--device",
        "cpu",
        env=env_with(PTI_HOME=str(tmp_path / "cache")),
    )
    wait_until(lambda: (out / "astronaut" / "aligned.png").exists(), proc, what="the aligned photo")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert str(out / "astronaut" / "aligned.png") in _interrupted_line(err)
    assert files_under(out) == ["astronaut/aligned.png"]  # complete files only; no .tmp, no .pti


# Commands that print nothing before they finish: the signal is sent from inside, at a known call.
SILENT = [
    ("info", ["info"], "pti.engine.checkpoint:summarize", None),
    ("convert", ["convert", "builtin:tiny", "{tmp}/out/g.safetensors"], "pti.engine.checkpoint:generator_hash", "out"),
    ("weights-list", ["weights", "list"], "pti.engine.weights:Registry.status", None),
    ("demo", ["demo", "-o", "{tmp}/demo", "--device", "cpu"], "pti.engine.invert:invert", "demo"),
]


@pytest.mark.parametrize("sig,how", [("SIGINT", "Ctrl-C"), ("SIGTERM", "SIGTERM")])
@pytest.mark.parametrize("name,args,where,outdir", SILENT, ids=[s[0] for s in SILENT])
def test_interrupt_inside_every_command(name, args, where, outdir, sig, how, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = start_pti(*args, wrapper=[where, sig, "--"], env=env_with(PTI_HOME=str(tmp_path / "cache")))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in out + err
    line = _interrupted_line(err)
    assert f"({how})" in line
    if outdir:
        root = tmp_path / outdir
        assert temp_files_under(root) == [] if root.exists() else True
        kept = files_under(root) if root.exists() else []
        assert _lists_kept(line, root, kept), (kept, line)
        if name == "demo":
            assert kept == ["astronaut.png", "astronaut/aligned.png"]
        if name == "convert":
            assert kept == [] and "Kept: nothing" in line


@pytest.mark.skipif(not LINUX, reason="reads /proc/PID/status to know when the handlers are installed")
def test_ctrl_c_while_still_importing(tmp_path):
    proc = start_pti("info", "builtin:tiny")
    wait_until(lambda: handlers_installed(proc.pid), proc, timeout=30, what="signal handlers")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and _interrupted_line(err).startswith("interrupted (Ctrl-C)")


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    """Sends the first 64 KiB of a 10 MB body, then stalls until the test ends."""

    release = threading.Event()

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Length", str(10_000_000))
        self.end_headers()
        self.wfile.write(b"\0" * 65536)
        self.wfile.flush()
        self.release.wait(60)

    def log_message(self, *args):
        pass


def test_interrupting_a_download_leaves_no_partial_file(tmp_path):
    """`pti weights fetch` from a loopback server that stalls mid-file, via an entry pointed at it."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cache = tmp_path / "cache"
    url = f"http://127.0.0.1:{server.server_address[1]}/lpips_v0.1_alex.pth"
    # The real fetch code, with the lpips-alex entry's URL pointed at the loopback server.
    code = (
        "import sys, dataclasses, pti.engine.weights as W; "
        f"W.DEFAULT_ENTRIES = tuple(dataclasses.replace(e, url={url!r}, size=None) if e.name == 'lpips-alex' else e "
        "for e in W.DEFAULT_ENTRIES); from pti.__main__ import main; main(['weights', 'fetch', 'lpips-alex'])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_with(PTI_HOME=str(cache)),
    )
    try:
        wait_until(
            lambda: cache.exists() and any(p.suffix == ".part" for p in cache.iterdir()),
            proc,
            what="a partial download",
        )
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        _SlowHandler.release.set()
        server.shutdown()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "Kept: nothing" in _interrupted_line(err)
    assert files_under(cache) == []
