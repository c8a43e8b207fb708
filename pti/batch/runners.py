"""Where the photos of a many-photo run are tuned: local worker processes, or Ray tasks.

Both run `pti.pipeline.Pipeline.attempt` on each photo and hand every result to the driver's
`on_result(job, result, worker)` as it comes (`pti.batch` writes the manifest from there).

- `run_processes`: N spawned processes, each building its pipeline once (the generator, the losses
  from the run's weights registry, and the encoder of `--init e4e|restyle`) and taking photos one at a
  time; on the CPU the cores are split between them. A worker that dies is replaced and its photos
  retried (`POOL_RESTARTS` times), then recorded as failed. Their progress reaches the driver's callback
  through a queue.
- `run_ray`: one Ray task per photo (a GPU each when the cluster has GPUs), the driver's generator,
  losses and encoder (`--init e4e|restyle`) put in the object store once, tasks that die retried by Ray
  (`max_retries`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import socket
import struct
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import torch

from pti.batch.manifest import Job
from pti.engine.device import resolve_device
from pti.errors import PTIError, first_line
from pti.export import quiet
from pti.pipeline import PhotoResult, Pipeline, RunConfig
from pti.signals import install

POOL_RESTARTS = 2  # how often a dead local worker's photos are retried


# ----------------------------------------------------------------------------- local worker processes

_WORKER: dict[str, Any] = {}


def _worker_init(config: RunConfig, out: Path, workers: int, events=None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the driver decides
    install([signal.SIGTERM])  # SIGTERM from the driver: atomic writes clean up on the way out
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _WORKER["pipeline"] = Pipeline.build(config, out, workers=workers)
    if events is not None:
        events.cancel_join_thread()  # a worker never waits at exit for progress the driver no longer reads
        _WORKER["pipeline"].progress = lambda phase, step, total, values: _send_progress(
            events, phase, step, total, values
        )


def _send_progress(events, phase: str, step: int, total: int, values: dict) -> None:
    """A worker's progress, to the driver: every tenth of a phase, its first and last step, and alignment."""
    if phase == "align" or step <= 1 or step == total or step % max(1, total // 10) == 0:
        try:
            events.put_nowait((_WORKER.get("photo", ""), phase, step, total, values))
        except Exception:  # noqa: BLE001  progress must never sink a photo
            pass


def _worker_task(job: Job):
    _WORKER["photo"] = job.name
    return _WORKER["pipeline"].attempt(job.photo, job.name)


def _relay(events, progress) -> None:
    """Pass the workers' progress events on to the driver's callback, each phase named after its photo."""
    while True:
        try:
            name, phase, step, total, values = events.get_nowait()
        except (queue.Empty, OSError, EOFError, ValueError):
            return
        progress(phase if phase == "align" else f"{name} {phase}", step, total, values)


def run_processes(todo: list[Job], config: RunConfig, out: Path, workers: int, on_result, progress=None) -> None:
    """Each photo of `todo` in one of `workers` spawned processes, the dead ones replaced
    (see the module's docstring)."""
    context = multiprocessing.get_context("spawn")
    events = context.Queue() if progress is not None else None  # the workers' progress, shown as it happens
    pending = list(todo)
    restarts = 0
    while pending:
        pool = ProcessPoolExecutor(
            min(workers, len(pending)),
            mp_context=context,
            initializer=_worker_init,
            initargs=(config, out, workers, events),
        )
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
                    except (
                        PTIError
                    ) as e:  # a worker could not start (no generator, no weights): every photo fails alike
                        res = PhotoResult.failed(job.photo, job.name, str(e))
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
                    why = f"its worker process died {restarts} times (out of memory?)"
                    on_result(job, PhotoResult.failed(job.photo, job.name, why), "process")
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


def _ray_task(shared, config: RunConfig, out: str, job: Job):
    """One photo in a Ray worker: the generator and losses come from the object store, resolved by Ray."""
    dev = resolve_device("cuda" if torch.cuda.is_available() and config.device != "cpu" else "cpu")
    parts = (shared["G"], shared["losses"], shared["base_hash"], shared["encoder"])
    pipeline = Pipeline.build(config, Path(out), device=dev, shared=parts)
    return pipeline.attempt(job.photo, job.name)


def run_ray(todo: list[Job], pipeline: Pipeline, address: str, on_result) -> None:
    """Each photo of `todo` as a Ray task on the cluster at `address` ("auto": the running one, else a local one)."""
    try:
        import ray  # noqa: PLC0415  optional extra (ray)
    except ImportError:
        raise PTIError("--ray needs Ray: pip install 'pti[ray]'") from None

    started = not ray.is_initialized()
    if started:
        _ray_connect(ray, address)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        encoder = pipeline.encoder.to("cpu") if pipeline.encoder is not None else None  # loaded once, by the driver
        shared = ray.put(
            {"G": pipeline.G.to("cpu"), "losses": pipeline.losses, "base_hash": pipeline.base_hash, "encoder": encoder}
        )  # once, not per task
        task = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=2)(_ray_task)
        refs = {task.remote(shared, pipeline.config, str(pipeline.out), job): job for job in todo}
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                job = refs.pop(ref)
                try:
                    res = ray.get(ref)
                except ray.exceptions.RayError as e:
                    res = PhotoResult.failed(job.photo, job.name, f"Ray task failed: {first_line(e, 200)}")
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
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, configure_logging=False)
    try:
        with quiet("ray"):  # its start-up notices; pti prints its own summary
            _ray_init(ray, address, kwargs)
    except PTIError:
        raise
    except Exception as e:  # noqa: BLE001
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
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise PTIError(f"--ray {address!r}: give 'auto' or an address HOST:PORT (or ray://HOST:PORT)")
    if address.startswith("ray://"):  # Ray Client's own protocol: a TCP connection is all this can check
        try:
            socket.create_connection((host, int(port)), timeout=timeout).close()
        except OSError as e:
            raise PTIError(
                f"cannot reach a Ray cluster at {address} ({e.strerror or e}); is `ray start --head` running there?"
            ) from None
        return

    def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
        return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload

    def literal(name: str, value: str) -> bytes:  # HPACK literal without indexing, no Huffman (short strings)
        return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()

    headers = b"".join(
        literal(k, v)
        for k, v in (
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/ray.rpc.NodeInfoGcsService/GetClusterId"),
            (":authority", f"{host}:{port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        )
    )
    request = (
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + frame(4, 0, 0)
        + frame(1, 4, 1, headers)
        + frame(0, 1, 1, b"\x00\x00\x00\x00\x00")
    )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(request)
            status = _http2_status(sock)
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or (
            "no answer" if isinstance(e, socket.timeout) else str(e) or type(e).__name__
        )
        raise PTIError(
            f"cannot reach a Ray cluster at {address} ({why}); is `ray start --head` running there?"
        ) from None
    if status != 200:
        raise PTIError(
            f"{address} answers, but not as a Ray cluster (HTTP/2 status {status or 'unknown'}); "
            "give the address `ray start --head` printed (its GCS port, 6379 by default)"
        )


def _http2_status(sock) -> int | None:
    """The HTTP status of the first response HEADERS frame on stream 1 (from HPACK's static table, which
    servers use for 200 and the other common codes); None when it is not one of those."""
    static = {0x88: 200, 0x89: 204, 0x8A: 206, 0x8B: 304, 0x8C: 400, 0x8D: 404, 0x8E: 500}
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
        payload, buf = buf[9 : 9 + length], buf[9 + length :]
        if kind == 7:  # GOAWAY: the server refused the connection
            return None
        if kind == 1 and stream == 1:
            if flags & 0x8:  # PADDED
                payload = payload[1:]
            if flags & 0x20:  # PRIORITY
                payload = payload[5:]
            return static.get(payload[0]) if payload else None
    return None
