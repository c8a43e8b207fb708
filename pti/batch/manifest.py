"""The record of a many-photo run: `<out>/manifest.jsonl` (one line per photo and run) and `<out>/summary.csv`.

- A manifest line holds the photo and its sha256, status `done|failed|skipped`, the identity file and
  its sha256, seconds, metrics, the error line of a failure, and the run's settings (`fingerprint`).
  Lines are appended with one `write` on an O_APPEND file (a reader never sees half a line from a live
  writer; a line torn by a crash is ignored). Only the driver writes it.
- `plan` decides what a re-run skips: a photo whose latest line is `done`, whose content is unchanged
  and whose identity file is there with the recorded hash. A photo done with other settings is refused,
  naming the first setting that differs, unless forced.
- `summary.csv`: one row per photo, spreadsheet-ready.
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

from pti.engine.identity import source_photo
from pti.engine.layout import Layout
from pti.errors import PTIError
from pti.fsutil import atomic_path, note_written, output_error, plain, sha256_file
from pti.pipeline import RunConfig, perceptual_key_in

MANIFEST = "manifest.jsonl"
SUMMARY = "summary.csv"


@dataclass
class Job:
    photo: Path
    name: str
    sha256: str
    attempts: int = 0
    result: Any = field(default=None, repr=False)


# Settings of the step configs that say how a step runs, not what it computes: left out of the fingerprint.
HOW_IT_RUNS = ("impl",)


def fingerprint(config: RunConfig, base_hash: str, losses: dict[str, str]) -> dict:
    """The settings that change an identity file (not the device, threads, worker count or implementation):
    what decides whether a photo done before can be reused.

    The precision is in (fp32, tf32 and bf16 round differently enough to move the early stop and the
    losses). The implementation (`impl`) is not: ref, compile and triton compute the same recipe, equal at
    float32 parity (the engine's parity tests), as a photo tuned on another device is; a re-run with
    another `--impl` reuses what is done, and each line records what ran (`impl`).

    A start other than the projector (`--init e4e|restyle|FILE`) adds `init`: its kind, its file's sha256 (the
    content, not the path: a moved checkpoint is the same setting), ReStyle's iterations and the refine steps,
    so another start is another setting and its photos are redone. The projector's fingerprint has no `init`,
    as before starts existed, so manifests written then still resume."""
    settings = {
        "base_hash": base_hash,
        "align": config.align,
        "face": config.face,
        "exact": config.exact,
        "losses": dict(losses),
        "invert": _recipe(config.invert_cfg),
        "tune": _recipe(config.tune_cfg),
    }
    if config.init != "projector":
        settings["init"] = {
            "init": config.init,
            "sha256": config.init_sha256,
            "restyle_iterations": config.restyle_iterations if config.init == "restyle" else None,
            "refine_steps": config.invert_cfg.steps,
        }
    return settings


def _recipe(cfg) -> dict:
    return {k: v for k, v in plain(asdict(cfg)).items() if k not in HOW_IT_RUNS}


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


def key(photo: Path) -> str:
    """A photo's key in the manifest: its resolved path."""
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


def plan(
    jobs: list[Job], manifest: Manifest, fingerprint: dict, out: Path, force: bool
) -> tuple[list[Job], list[dict]]:
    """(photos to run, `skipped` lines for photos already done). Refuses other settings unless `force`."""
    todo, skipped = [], []
    for job in jobs:
        rec = manifest.latest.get(key(job.photo))
        if force or rec is None or rec.get("status") not in ("done", "skipped"):
            todo.append(job)
            continue
        diff = _first_difference(rec.get("settings", {}), fingerprint)
        if diff:
            raise PTIError(
                f"{job.photo} was tuned into {out} with other settings ({diff}); pass --force to redo it, "
                "or choose another --out"
            )
        ident = Path(rec.get("identity") or "")
        if (
            rec.get("photo_sha256") != job.sha256
            or not ident.is_file()
            or sha256_file(ident) != rec.get("identity_sha256")
        ):
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
    by_identity = {
        rec.get("identity"): rec
        for rec in manifest.latest.values()
        if rec.get("status") in ("done", "skipped") and rec.get("identity")
    }
    for photo, name, sha in jobs:
        ident = Layout(out, name).identity
        if not ident.is_file():
            continue
        rec = by_identity.get(str(ident.resolve()))
        owner, owner_sha = (rec["photo"], rec.get("photo_sha256")) if rec else source_photo(ident)
        if owner_sha == sha or (owner is not None and Path(owner) == photo.resolve()):
            continue
        made = f"from {owner}" if owner else "from a photo it does not record"
        raise PTIError(
            f"{ident} was tuned {made}, a different photo than {photo}; pass --force to replace it, "
            "or choose another --out (or rename the photo)"
        )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def record(job: Job, res, fingerprint: dict, worker: str) -> dict:
    """The manifest line of one finished or failed photo (`res`: its `pti.pipeline.PhotoResult`)."""
    rec = {
        "photo": key(job.photo),
        "name": job.name,
        "photo_sha256": job.sha256,
        "status": res.status,
        "seconds": round(res.seconds, 3),
        "error": res.error,
        "settings": fingerprint,
        "time": _now(),
        "worker": worker,
        "identity": None,
        "identity_sha256": None,
        "metrics": None,
        "impl": None,
        "init": None,
    }
    if res.status == "done" and res.identity is not None:
        rep = res.report
        rec.update(
            identity=str(res.identity.resolve()),
            identity_sha256=sha256_file(res.identity),
            metrics={
                "before_tuning": rep.get("before_tuning"),
                "after_tuning": rep.get("after_tuning"),
                "identity_similarity": rep.get("identity_similarity"),
                "steps": rep.get("steps"),
                "early_stopped": rep.get("early_stopped"),
            },
            init=rep.get("init"),  # how the pivot was made (and, for an encoder, which load of it)
            impl={step: (r or {}).get("impl") for step, r in (rep.get("impl") or {}).items()},  # what ran
        )
    return rec


SUMMARY_COLUMNS = [
    "photo",
    "name",
    "status",
    "error",
    "identity",
    "seconds",
    "mse_before",
    "mse_after",
    "perceptual_before",
    "perceptual_after",
    "perceptual_metric",
    "identity_similarity",
    "tune_steps",
    "early_stopped",
]


def write_summary(path: Path, records: list[dict]) -> Path:
    """One CSV row per photo, spreadsheet-ready (written atomically)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for rec in records:
        m = rec.get("metrics") or {}
        b, a = m.get("before_tuning") or {}, m.get("after_tuning") or {}
        pkey = perceptual_key_in(a)
        w.writerow(
            {
                "photo": rec["photo"],
                "name": rec.get("name"),
                "status": rec["status"],
                "error": rec.get("error") or "",
                "identity": rec.get("identity") or "",
                "seconds": rec.get("seconds"),
                "mse_before": b.get("mse", ""),
                "mse_after": a.get("mse", ""),
                "perceptual_before": b.get(pkey, ""),
                "perceptual_after": a.get(pkey, ""),
                "perceptual_metric": pkey,
                "identity_similarity": "" if m.get("identity_similarity") is None else m["identity_similarity"],
                "tune_steps": (m.get("steps") or {}).get("tune", ""),
                "early_stopped": m.get("early_stopped", ""),
            }
        )
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())
    return path
