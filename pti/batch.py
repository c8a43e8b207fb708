"""Many photos: a resumable manifest, one failure never stops the rest, N local workers, or Ray.

`tune_many` runs single-ID PTI over a list of photos for `pti.api.tune`:

- `<out>/manifest.jsonl`: one JSON line per photo and run, appended with one `write` on an O_APPEND
  file (a reader never sees half a line from a live writer; a line torn by a crash is ignored): the
  photo and its sha256, status `done|failed|skipped`, the identity file and its sha256, seconds,
  metrics, the error line of a failure, and the run's settings. Only the driver writes it.
- Resume: a photo whose latest line is `done`, whose content is unchanged and whose identity file is
  there with the recorded hash is skipped (a `skipped` line). A photo done with other settings is
  refused before any work, naming the first setting that differs, unless `force`.
- A photo that fails (no face, corrupt, too small, ...) gets a `failed` line with its one-line reason,
  and the run goes on.
- `<out>/summary.csv`: one row per photo of this run, at the end.
- `workers=N`: N spawned processes, each loading the generator and losses once and taking photos one
  at a time (on the CPU the cores are split between them). A worker that dies is replaced and its
  photos retried (twice), then recorded as failed.
- `ray="auto"|ADDRESS`: one Ray task per photo (a GPU each when the cluster has GPUs), the generator
  and the losses put in the object store once, tasks that die retried by Ray (`max_retries`).

Results equal the sequential run for the same seeds and thread count: each photo's work depends only on
the photo, the generator, the settings and the seed. Workers and tasks write each photo's files
atomically; after a run the driver removes temporary files a killed worker could not.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pti.errors import PTIError

MANIFEST = "manifest.jsonl"
SUMMARY = "summary.csv"
POOL_RESTARTS = 2  # how often a dead local worker's photos are retried


@dataclass
class Settings:
    """What a worker needs to rebuild the run, and what decides whether a done photo can be reused."""

    network: str | None
    device: str
    align: bool
    face: int | None
    invert_cfg: Any
    tune_cfg: Any
    exact: bool
    allow_fallback: bool
    threads: str | int | None = None

    def fingerprint(self, base_hash: str, losses: dict[str, str]) -> dict:
        """The settings that change an identity file (not the device, threads or worker count)."""
        return {"base_hash": base_hash, "align": self.align, "face": self.face, "exact": self.exact, "losses": dict(losses),
                "invert": _plain(asdict(self.invert_cfg)), "tune": _plain(asdict(self.tune_cfg))}


@dataclass
class Job:
    photo: Path
    name: str
    sha256: str
    attempts: int = 0
    result: Any = field(default=None, repr=False)


def _plain(obj):
    return json.loads(json.dumps(obj, default=str))


# ----------------------------------------------------------------------------- the manifest


class Manifest:
    """`<out>/manifest.jsonl`: the latest line per photo (by resolved path) and an atomic append."""

    def __init__(self, out: Path):
        self.path = out / MANIFEST
        self.latest: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line torn by a crash
                if isinstance(rec, dict) and "photo" in rec:
                    self.latest[rec["photo"]] = rec

    def append(self, rec: dict) -> None:
        from pti.fsutil import note_written, output_error

        data = (json.dumps(rec, sort_keys=True, default=str) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, data)  # one write on O_APPEND: the line lands whole, after every other
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise output_error(self.path, e) from None
        note_written(self.path)
        self.latest[rec["photo"]] = rec


def _key(photo: Path) -> str:
    return str(photo.resolve())


def _first_difference(old: dict, new: dict, prefix: str = "") -> str | None:
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{k}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{k} was {json.dumps(a)}, now {json.dumps(b)}"
    return None


def plan(jobs: list[Job], manifest: Manifest, fingerprint: dict, out: Path, force: bool) -> tuple[list[Job], list[dict]]:
    """(photos to run, `skipped` lines for photos already done). Refuses other settings unless `force`."""
    from pti.engine.weights import sha256_file

    todo, skipped = [], []
    for job in jobs:
        rec = manifest.latest.get(_key(job.photo))
        if force or rec is None or rec.get("status") not in ("done", "skipped"):
            todo.append(job)
            continue
        diff = _first_difference(rec.get("settings", {}), fingerprint)
        if diff:
            raise PTIError(f"{job.photo} was tuned into {out} with other settings ({diff}); pass --force to redo it, "
                           "or choose another --out")
        ident = Path(rec.get("identity") or "")
        if rec.get("photo_sha256") != job.sha256 or not ident.is_file() or sha256_file(ident) != rec.get("identity_sha256"):
            todo.append(job)  # the photo changed, or its identity file is gone or altered: redo it
            continue
        skipped.append({**rec, "status": "skipped", "seconds": 0.0, "time": _now(), "worker": "resume"})
    return todo, skipped


def check_identity_slots(out: Path, jobs: list[tuple[Path, str, str]], manifest: Manifest) -> None:
    """Refuse, before any work, to replace an identity in `out` that was made from a different photo.

    `jobs` are (photo, output name, photo sha256). `<out>/<name>.pti` may be replaced only by its own
    photo: the same content (sha256), or the same file (a photo edited since is redone, as on resume).
    Who made an identity comes from the manifest, else from the identity's own metadata; an identity
    whose photo cannot be told is not replaced either. `--force` (the caller skips this) replaces."""
    from pti.engine.identity import source_photo

    by_identity = {rec.get("identity"): rec for rec in manifest.latest.values()
                   if rec.get("status") in ("done", "skipped") and rec.get("identity")}
    for photo, name, sha in jobs:
        ident = out / f"{name}.pti"
        if not ident.is_file():
            continue
        rec = by_identity.get(str(ident.resolve()))
        owner, owner_sha = (rec["photo"], rec.get("photo_sha256")) if rec else source_photo(ident)
        if owner_sha == sha or (owner is not None and Path(owner) == photo.resolve()):
            continue
        made = f"from {owner}" if owner else "from a photo it does not record"
        raise PTIError(f"{ident} was tuned {made}, a different photo than {photo}; pass --force to replace it, "
                       "or choose another --out (or rename the photo)")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def record(job: Job, res, fingerprint: dict, worker: str) -> dict:
    """The manifest line of one finished or failed photo."""
    from pti.engine.weights import sha256_file

    rec = {"photo": _key(job.photo), "name": job.name, "photo_sha256": job.sha256, "status": res.status,
           "seconds": round(res.seconds, 3), "error": res.error, "settings": fingerprint, "time": _now(), "worker": worker,
           "identity": None, "identity_sha256": None, "metrics": None}
    if res.status == "done" and res.identity is not None:
        rep = res.report
        rec.update(identity=str(res.identity.resolve()), identity_sha256=sha256_file(res.identity),
                   metrics={"before_tuning": rep.get("before_tuning"), "after_tuning": rep.get("after_tuning"),
                            "identity_similarity": rep.get("identity_similarity"), "steps": rep.get("steps"),
                            "early_stopped": rep.get("early_stopped")})
    return rec


# ----------------------------------------------------------------------------- one photo, anywhere


def tune_one(run, job: Job, settings: Settings):
    """Run one photo through `run` (a `pti.api._Run`); a PTIError becomes a `failed` result, not an exception."""
    from pti.api import PhotoResult
    from pti.errors import first_line

    t0 = time.perf_counter()
    try:
        res = run.one(job.photo, job.name, settings.align, settings.face)
    except PTIError as e:
        res = PhotoResult(photo=job.photo, name=job.name, status="failed", error=str(e))
    except (MemoryError, RuntimeError) as e:  # out of memory and kin: this photo fails, the run goes on
        res = PhotoResult(photo=job.photo, name=job.name, status="failed", error=first_line(e))
    res.seconds = time.perf_counter() - t0
    res.target = res.pivot = res.aligned = None  # tensors and images stay where they were made
    return res


def _build_run(settings: Settings, out: Path, G=None, losses=None, device=None, workers: int = 1, base_hash: str | None = None):
    """A `_Run` for a worker: the generator, losses and hash given (Ray) or loaded from the settings (processes)."""
    from pti.api import _Run
    from pti.engine.checkpoint import generator_hash, load_generator
    from pti.engine.device import apply_cpu_threads, resolve_device
    from pti.engine.losses import load_losses

    dev = device or resolve_device(settings.device)
    G = load_generator(settings.network, dev) if G is None else G.to(dev)
    n = apply_cpu_threads(G, dev, settings.threads)
    if dev.type == "cpu" and workers > 1:
        import torch

        torch.set_num_threads(max(1, min(n, (os.cpu_count() or 1) // workers)))  # split the cores
    losses = load_losses(dev, allow_fallback=settings.allow_fallback) if losses is None else losses.to(dev)
    return _Run(G, losses, out, dev, base_hash or generator_hash(G), settings.network or "builtin:tiny",
                settings.invert_cfg, settings.tune_cfg, settings.exact, None)


# ----------------------------------------------------------------------------- the driver


def tune_many(run, paths: list[Path], names: list[str], settings: Settings, *, workers: int = 1, ray: str | None = None,
              force: bool = False):
    """Single-ID PTI for every photo, resumable; one result per photo (failures included), in the given order."""
    from pti.engine.weights import sha256_file

    fingerprint = settings.fingerprint(run.base_hash, run.losses.names)
    manifest = Manifest(run.out)
    jobs = [Job(p, n, sha256_file(p)) for p, n in zip(paths, names)]
    if not force:
        check_identity_slots(run.out, [(j.photo, j.name, j.sha256) for j in jobs], manifest)
    todo, skipped = plan(jobs, manifest, fingerprint, run.out, force)
    from pti.api import PhotoResult

    done_before = {_key(Path(r["photo"])): r for r in skipped}
    for rec in skipped:
        manifest.append(rec)
    counts = {"finished": 0, "failed": 0}

    def on_result(job: Job, res, worker: str) -> None:
        job.result = res
        manifest.append(record(job, res, fingerprint, worker))
        counts["finished"] += 1
        counts["failed"] += res.status == "failed"
        if run.progress is not None and (workers > 1 or ray):
            run.progress("photos", counts["finished"], len(todo), {"failed": counts["failed"]})

    began = time.time()
    try:
        if ray:
            _run_ray(todo, settings, run, ray, on_result)
        elif workers > 1 and len(todo) > 1:
            _run_processes(todo, settings, run.out, workers, on_result, run.progress)
        else:
            for job in todo:
                on_result(job, tune_one(run, job, settings), "main")
    finally:
        _sweep_temporaries(run.out, [j.name for j in todo])
        if ray or workers > 1:  # other processes wrote these: put them in this process's ledger of kept files
            _note_files(run.out, [j.name for j in todo], began)
    results = []
    for job in jobs:
        if job.result is not None:
            results.append(job.result)
        else:
            rec = done_before[_key(job.photo)]
            results.append(PhotoResult(photo=job.photo, name=job.name, identity=Path(rec["identity"]), status="skipped",
                                       report={"manifest": rec}))
    write_summary(run.out / SUMMARY, [manifest.latest[_key(j.photo)] for j in jobs])
    return results


def _note_files(out: Path, names: list[str], since: float) -> None:
    from pti.fsutil import note_written

    for name in names:
        for p in [out / f"{name}.pti", *sorted((out / name).glob("*"))]:
            if p.is_file() and not p.name.startswith(".") and p.stat().st_mtime >= since - 1:
                note_written(p)


def _sweep_temporaries(out: Path, names: list[str]) -> None:
    """Remove the temporary files of atomic writes that a killed worker could not clean up."""
    for folder, prefixes in ((out, [f".{n}.pti." for n in names]), *((out / n, ["."]) for n in names)):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.is_file() and p.name.endswith(".tmp") and any(p.name.startswith(x) for x in prefixes):
                p.unlink(missing_ok=True)


SUMMARY_COLUMNS = ["photo", "name", "status", "error", "identity", "seconds", "mse_before", "mse_after",
                   "perceptual_before", "perceptual_after", "perceptual_metric", "identity_similarity", "tune_steps", "early_stopped"]


def write_summary(path: Path, records: list[dict]) -> Path:
    """One CSV row per photo, spreadsheet-ready (written atomically)."""
    from pti.fsutil import atomic_path

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for rec in records:
        m = rec.get("metrics") or {}
        b, a = m.get("before_tuning") or {}, m.get("after_tuning") or {}
        pkey = next((k for k in ("lpips_alex", "perceptual_weight_free") if k in a), "")
        w.writerow({"photo": rec["photo"], "name": rec.get("name"), "status": rec["status"], "error": rec.get("error") or "",
                    "identity": rec.get("identity") or "", "seconds": rec.get("seconds"),
                    "mse_before": b.get("mse", ""), "mse_after": a.get("mse", ""),
                    "perceptual_before": b.get(pkey, ""), "perceptual_after": a.get(pkey, ""), "perceptual_metric": pkey,
                    "identity_similarity": "" if m.get("identity_similarity") is None else m["identity_similarity"],
                    "tune_steps": (m.get("steps") or {}).get("tune", ""), "early_stopped": m.get("early_stopped", "")})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())
    return path


# ----------------------------------------------------------------------------- local worker processes

_WORKER: dict[str, Any] = {}


def _worker_init(settings: Settings, out: Path, workers: int, events=None) -> None:
    import signal

    from pti.signals import install

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the driver decides
    install([signal.SIGTERM])  # SIGTERM from the driver: atomic writes clean up on the way out
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _WORKER["run"] = _build_run(settings, out, workers=workers)
    _WORKER["settings"] = settings
    if events is not None:
        events.cancel_join_thread()  # a worker never waits at exit for progress the driver no longer reads
        _WORKER["run"].progress = lambda phase, step, total, values: _send_progress(events, phase, step, total, values)


def _send_progress(events, phase: str, step: int, total: int, values: dict) -> None:
    """A worker's progress, to the driver: every tenth of a phase, its first and last step, and alignment."""
    if phase == "align" or step <= 1 or step == total or step % max(1, total // 10) == 0:
        try:
            events.put_nowait((_WORKER.get("photo", ""), phase, step, total, values))
        except Exception:  # noqa: BLE001  progress must never sink a photo
            pass


def _worker_task(job: Job):
    _WORKER["photo"] = job.name
    return tune_one(_WORKER["run"], job, _WORKER["settings"])


def _relay(events, progress) -> None:
    """Pass the workers' progress events on to the driver's callback, each phase named after its photo."""
    import queue

    while True:
        try:
            name, phase, step, total, values = events.get_nowait()
        except (queue.Empty, OSError, EOFError, ValueError):
            return
        progress(phase if phase == "align" else f"{name} {phase}", step, total, values)


def _run_processes(todo: list[Job], settings: Settings, out: Path, workers: int, on_result, progress=None) -> None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    from pti.api import PhotoResult

    context = multiprocessing.get_context("spawn")
    events = context.Queue() if progress is not None else None  # the workers' progress, shown as it happens
    pending = list(todo)
    restarts = 0
    while pending:
        pool = ProcessPoolExecutor(min(workers, len(pending)), mp_context=context,
                                   initializer=_worker_init, initargs=(settings, out, workers, events))
        futures = {pool.submit(_worker_task, job): job for job in pending}
        broken = False
        try:
            while futures:
                done, _ = wait(futures, timeout=0.2 if events is not None else None, return_when=FIRST_COMPLETED)
                if events is not None:
                    _relay(events, progress)
                for f in done:
                    job = futures.pop(f)
                    try:
                        res = f.result()
                    except BrokenProcessPool:
                        broken = True
                        futures[f] = job  # retried below with the others
                        break
                    except PTIError as e:  # a worker could not start (no generator, no weights): every photo fails alike
                        res = PhotoResult(photo=job.photo, name=job.name, status="failed", error=str(e))
                    pending.remove(job)
                    on_result(job, res, f"process {workers}")
                if broken:
                    break
        except BaseException:
            _stop_pool(pool)
            raise
        if broken:
            _stop_pool(pool)
            restarts += 1
            if restarts > POOL_RESTARTS:
                for job in list(pending):
                    pending.remove(job)
                    on_result(job, PhotoResult(photo=job.photo, name=job.name, status="failed",
                                               error=f"its worker process died {restarts} times (out of memory?)"), "process")
        else:
            pool.shutdown(wait=True)


def _stop_pool(pool) -> None:
    """Stop the workers now: SIGTERM (they clean up their temporary files), then wait for them."""
    processes = list(getattr(pool, "_processes", {}).values())  # no public API lists them
    for p in processes:
        if p.is_alive():
            p.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- Ray


def _ray_task(shared, settings: Settings, out: str, job: Job):
    """One photo in a Ray worker: the generator and losses come from the object store, resolved by Ray."""
    import torch

    from pti.engine.device import resolve_device

    dev = resolve_device("cuda" if torch.cuda.is_available() and settings.device != "cpu" else "cpu")
    run = _build_run(settings, Path(out), G=shared["G"], losses=shared["losses"], device=dev, base_hash=shared["base_hash"])
    return tune_one(run, job, settings)


def _run_ray(todo: list[Job], settings: Settings, run, address: str, on_result) -> None:
    try:
        import ray
    except ImportError:
        raise PTIError("--ray needs Ray: pip install 'pti[ray]'") from None
    from pti.api import PhotoResult
    from pti.errors import first_line

    started = not ray.is_initialized()
    if started:
        _ray_connect(ray, address)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        shared = ray.put({"G": run.G.to("cpu"), "losses": run.losses, "base_hash": run.base_hash})  # once, not per task
        task = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=2)(_ray_task)
        refs = {task.remote(shared, settings, str(run.out), job): job for job in todo}
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                job = refs.pop(ref)
                try:
                    res = ray.get(ref)
                except ray.exceptions.RayError as e:
                    res = PhotoResult(photo=job.photo, name=job.name, status="failed", error=f"Ray task failed: {first_line(e, 200)}")
                on_result(job, res, "ray")
    except BaseException:
        if started:
            for ref in list(locals().get("refs", {})):
                ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()


def _ray_connect(ray, address: str) -> None:
    """`auto`: the cluster in RAY_ADDRESS or on this machine, else a local one started now; or an address."""
    import logging

    from pti.export import quiet

    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, configure_logging=False)
    try:
        with quiet("ray"):  # its start-up notices; pti prints its own summary
            _ray_init(ray, address, kwargs)
    except PTIError:
        raise
    except Exception as e:  # noqa: BLE001
        from pti.errors import first_line

        raise PTIError(f"cannot start or reach a Ray cluster at {address!r}: {first_line(e, 200)}") from None


def _ray_init(ray, address: str, kwargs: dict) -> None:
    if address == "auto":
        try:
            ray.init(address="auto", **kwargs)
        except ConnectionError:
            ray.init(**kwargs)
    else:
        _probe(address)
        ray.init(address=address, **kwargs)


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail fast on an address where no Ray cluster answers: Ray itself retries for about 20 s, logging
    a line a second. A Ray head's GCS is a gRPC server, so one gRPC call (GetClusterId, an empty request)
    over HTTP/2 must come back with HTTP status 200; nothing listening, silence, or another server (a
    proxy that answers 404) is one line within `timeout` seconds."""
    import socket
    import struct

    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise PTIError(f"--ray {address!r}: give 'auto' or an address HOST:PORT (or ray://HOST:PORT)")
    if address.startswith("ray://"):  # Ray Client's own protocol: a TCP connection is all this can check
        try:
            socket.create_connection((host, int(port)), timeout=timeout).close()
        except OSError as e:
            raise PTIError(f"cannot reach a Ray cluster at {address} ({e.strerror or e}); is `ray start --head` running there?") from None
        return

    def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
        return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload

    def literal(name: str, value: str) -> bytes:  # HPACK literal without indexing, no Huffman (short strings)
        return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()

    headers = b"".join(literal(k, v) for k, v in ((":method", "POST"), (":scheme", "http"),
                                                     (":path", "/ray.rpc.NodeInfoGcsService/GetClusterId"),
                                                     (":authority", f"{host}:{port}"), ("content-type", "application/grpc"),
                                                     ("te", "trailers")))
    request = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0) + frame(1, 4, 1, headers)
               + frame(0, 1, 1, b"\x00\x00\x00\x00\x00"))
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(request)
            status = _http2_status(sock)
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or ("no answer" if isinstance(e, socket.timeout) else str(e) or type(e).__name__)
        raise PTIError(f"cannot reach a Ray cluster at {address} ({why}); is `ray start --head` running there?") from None
    if status != 200:
        raise PTIError(f"{address} answers, but not as a Ray cluster (HTTP/2 status {status or 'unknown'}); "
                       "give the address `ray start --head` printed (its GCS port, 6379 by default)")


def _http2_status(sock) -> int | None:
    """The HTTP status of the first response HEADERS frame on stream 1 (from HPACK's static table, which
    servers use for 200 and the other common codes); None when it is not one of those."""
    import struct

    static = {0x88: 200, 0x89: 204, 0x8a: 206, 0x8b: 304, 0x8c: 400, 0x8d: 404, 0x8e: 500}
    buf = b""
    for _ in range(64):  # frames before the response: SETTINGS, WINDOW_UPDATE, PING, ...
        while len(buf) < 9:
            chunk = sock.recv(65536)
            if not chunk:
                raise ValueError("the connection was closed")
            buf += chunk
        length = int.from_bytes(buf[:3], "big")
        kind, flags, stream = buf[3], buf[4], struct.unpack(">I", buf[5:9])[0] & 0x7FFFFFFF
        while len(buf) < 9 + length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ValueError("the connection was closed")
            buf += chunk
        payload, buf = buf[9:9 + length], buf[9 + length:]
        if kind == 7:  # GOAWAY: the server refused the connection
            return None
        if kind == 1 and stream == 1:
            if flags & 0x8:  # PADDED
                payload = payload[1:]
            if flags & 0x20:  # PRIORITY
                payload = payload[5:]
            return static.get(payload[0]) if payload else None
    return None
