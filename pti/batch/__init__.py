"""Many photos: a resumable manifest, one failure never stops the rest, N local workers, or Ray.

`tune_many` runs single-ID PTI over a list of photos for `pti.api.tune`, each photo through a
`pti.pipeline.Pipeline`:

- `<out>/manifest.jsonl` records every photo of every run (`pti.batch.manifest`): its status
  `done|failed|skipped`, its identity file and hashes, metrics, and the settings that made it.
- Resume: a photo done before, unchanged, whose identity file is intact, is skipped (a `skipped`
  line). A photo done with other settings is refused before any work, naming the first setting that
  differs, unless `force`.
- A photo that fails (no face, corrupt, too small, ...) gets a `failed` line with its one-line reason,
  and the run goes on.
- `<out>/summary.csv`: one row per photo of this run, at the end.
- `workers=N` (N local processes) or `ray="auto"|ADDRESS` (one Ray task per photo): `pti.batch.runners`.

Results equal the sequential run for the same seeds and thread count: each photo's work depends only on
the photo, the generator, the settings and the seed. Workers and tasks write each photo's files
atomically; after a run the driver removes temporary files a killed worker could not.
"""

from __future__ import annotations

import time
from pathlib import Path

from pti.batch.manifest import (
    SUMMARY,
    Job,
    Manifest,
    check_identity_slots,
    fingerprint,
    key,
    plan,
    record,
    write_summary,
)
from pti.batch.runners import run_processes, run_ray
from pti.engine.layout import Layout
from pti.fsutil import note_written, sha256_file
from pti.pipeline import PhotoResult, Pipeline


def tune_many(
    pipeline: Pipeline,
    paths: list[Path],
    names: list[str],
    *,
    workers: int = 1,
    ray: str | None = None,
    force: bool = False,
) -> list[PhotoResult]:
    """Single-ID PTI for every photo, resumable; one result per photo (failures included), in the given order.

    `pipeline` is the driver's: its generator hash and losses are what the manifest records, and it
    tunes the photos itself when there are no workers; workers build their own from `pipeline.config`."""
    out, progress = pipeline.out, pipeline.progress
    settings = fingerprint(pipeline.config, pipeline.base_hash, pipeline.losses.names)
    manifest = Manifest(out)
    jobs = [Job(p, n, sha256_file(p)) for p, n in zip(paths, names)]
    if not force:
        check_identity_slots(out, [(j.photo, j.name, j.sha256) for j in jobs], manifest)
    todo, skipped = plan(jobs, manifest, settings, out, force)
    done_before = {key(Path(r["photo"])): r for r in skipped}
    for rec in skipped:
        manifest.append(rec)
    counts = {"finished": 0, "failed": 0}

    def on_result(job: Job, res: PhotoResult, worker: str) -> None:
        job.result = res
        manifest.append(record(job, res, settings, worker))
        counts["finished"] += 1
        counts["failed"] += res.status == "failed"
        if progress is not None and (workers > 1 or ray):
            progress("photos", counts["finished"], len(todo), {"failed": counts["failed"]})

    began = time.time()
    try:
        if ray:
            run_ray(todo, pipeline, ray, on_result)
        elif workers > 1 and len(todo) > 1:
            run_processes(todo, pipeline.config, out, workers, on_result, progress)
        else:
            for job in todo:
                on_result(job, pipeline.attempt(job.photo, job.name), "main")
    finally:
        _sweep_temporaries(out, [j.name for j in todo])
        if ray or workers > 1:  # other processes wrote these: put them in this process's ledger of kept files
            _note_files(out, [j.name for j in todo], began)
    results = []
    for job in jobs:
        if job.result is not None:
            results.append(job.result)
        else:
            rec = done_before[key(job.photo)]
            results.append(
                PhotoResult(
                    photo=job.photo,
                    name=job.name,
                    identity=Path(rec["identity"]),
                    status="skipped",
                    report={"manifest": rec},
                )
            )
    write_summary(out / SUMMARY, [manifest.latest[key(j.photo)] for j in jobs])
    return results


def _note_files(out: Path, names: list[str], since: float) -> None:
    for name in names:
        layout = Layout(out, name)
        for p in [layout.identity, *sorted(layout.folder.glob("*"))]:
            if p.is_file() and not p.name.startswith(".") and p.stat().st_mtime >= since - 1:
                note_written(p)


def _sweep_temporaries(out: Path, names: list[str]) -> None:
    """Remove the temporary files of atomic writes that a killed worker could not clean up."""
    layouts = [Layout(out, n) for n in names]
    for folder, prefixes in ((out, [f".{x.identity.name}." for x in layouts]), *((x.folder, ["."]) for x in layouts)):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.is_file() and p.name.endswith(".tmp") and any(p.name.startswith(x) for x in prefixes):
                p.unlink(missing_ok=True)
