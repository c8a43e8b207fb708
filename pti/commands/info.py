"""`pti info [FILE]`: what a generator checkpoint or a `.pti` identity file holds, without rendering."""

from __future__ import annotations

from typing import Annotated, Optional

import typer


def info(
    checkpoint: Annotated[
        Optional[str],
        typer.Argument(
            metavar="[FILE]",
            help=(
                "A .pti identity file, an export folder (pti export) or a file in one, a direction file "
                "(pti directions, .npy/.npz/.pt), or a generator: stylegan2-ada .pkl, rosinality .pt or "
                "pti .safetensors; none (or builtin:tiny) = the built-in tiny generator."
            ),
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Show what a checkpoint, identity file, direction file or export holds: sizes, settings, hashes,
    and for identities the tuning results."""
    import json
    from pathlib import Path

    from pti.engine.edits import is_direction_file
    from pti.engine.identity import is_identity_file

    if checkpoint and Path(checkpoint).is_dir() and not (Path(checkpoint) / "contract.json").is_file():
        from pti.errors import PTIError

        raise PTIError(
            f"{checkpoint} is a folder: give a checkpoint or identity file, or an export folder (with contract.json)"
        )
    if checkpoint and (Path(checkpoint).is_dir() or _in_export(Path(checkpoint))):
        record, rows = _export(checkpoint)
    elif checkpoint and is_identity_file(checkpoint):
        record, rows = _identity(checkpoint)
    elif checkpoint and is_direction_file(checkpoint):
        record, rows = _direction(checkpoint)
    else:
        record, rows = _generator(checkpoint)
    if as_json:
        typer.echo(json.dumps(record, indent=2))
        return
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


def _in_export(path) -> bool:
    """True for contract.json and the files its contract lists (model.onnx, model.pt2, ...)."""
    import json

    contract = path.parent / "contract.json"
    if path.name == "contract.json":
        return True
    if not (path.is_file() and contract.is_file()):
        return False
    try:
        return path.name in json.loads(contract.read_text()).get("files", {}).values()
    except (OSError, ValueError, AttributeError):
        return False


def _export(folder: str) -> tuple[dict, list[tuple[str, str]]]:
    """An export folder, from its contract.json (nothing is loaded into a runtime); the files it lists are
    checked against the sizes and sha256 it records."""
    import math

    from pti.export.contract import load_contract, verify_files

    path, c = load_contract(folder)  # sizes
    hashed = verify_files(path, c)
    b, built, verified = c["batch"], c.get("built_with", {}), c.get("verified", {})
    size = sum((path / n).stat().st_size for n in c["files"].values())
    rows = [
        ("export", str(path)),
        ("kind", f"{c['kind']} ({c['precision']})" + (f", opset {c['opset']}" if "opset" in c else "")),
        ("files", ", ".join(c["files"].values()) + f" ({size / 1e6:.1f} MB)"),
        (
            "input",
            f"{c['input']['name']} [batch {b['min']}-{b['max']} (opt {b['opt']}), {c['input']['shape'][1]}, "
            f"{c['input']['shape'][2]}] {c['input']['dtype']}",
        ),
        ("output", f"{c['output']['name']} [{', '.join(map(str, c['output']['shape']))}] {c['output']['dtype']}"),
        (
            "weights",
            f"{len(c['weights'])} tuned tensors swappable by name, "
            f"{_millions(sum(math.prod(w['shape']) for w in c['weights']))} values",
        ),
        ("base generator", f"{c['base_hash'][:16]} ({c.get('base_hint') or '?'})"),
        ("identity", c.get("identity") or "none (the base generator's own weights)"),
        (
            "built with",
            ", ".join(f"{k} {v}" for k, v in built.items() if k in ("torch", "onnxruntime", "tensorrt", "pti"))
            + f"; {built.get('device', '?')}",
        ),
    ]
    if verified:
        diff = verified.get("max_abs_diff_vs_torch_fp32", verified.get("pooled_diff"))
        rows.append(
            ("checked", f"{verified.get('runtime')}: {diff:.2g} from PyTorch (tolerance {c['sample']['tolerance']})")
        )
    rows.append(
        (
            "file check",
            "sizes and sha256 match the contract"
            if hashed
            else "not checked (this contract, from an older pti, records no sizes or hashes)",
        )
    )
    return {"kind": "export", "path": str(path), **c, "bytes": size, "files_verified": hashed}, rows


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M ({n:,})"


def _direction(path: str) -> tuple[dict, list[tuple[str, str]]]:
    from pti.engine.edits import describe_direction_file

    d = describe_direction_file(path)
    record = {"kind": "direction", **d}
    if d["type"] == "ganspace":
        sds = ", ".join(f"{s:.3g}" for s in d["std"][:5]) + (" ..." if d["components"] > 5 else "")
        rows = [
            ("direction file", d["path"]),
            ("kind", f"GANSpace ({d['layout']} layout): {d['components']} components of w_dim {d['w_dim']}"),
            ("sd", f"{sds} (of the first components, in w units)"),
            (
                "edit with",
                f"--edit {d['path']}:K=VALUE (K = 0..{d['components'] - 1}; VALUE in sd), on every layer unless @A-B",
            ),
        ]
    else:
        layers = f"one per layer, {d['layers']} layers" if d["layers"] else "the same on every layer"
        rows = [
            ("direction file", d["path"]),
            ("kind", f"InterFaceGAN direction of w_dim {d['w_dim']}, shaped {d['shape']} ({layers})"),
            ("norm", f"{d['norm']:.4g}"),
            ("edit with", f"--edit {d['path']}=VALUE (a step of VALUE times the direction)"),
        ]
    rows.append(("size", f"{d['bytes']:,} bytes"))
    return record, rows


def _generator(checkpoint: str | None) -> tuple[dict, list[tuple[str, str]]]:
    import dataclasses

    from pti.engine.checkpoint import load_checkpoint, summarize

    loaded = load_checkpoint(checkpoint, device="cpu")
    summary = summarize(loaded.generator)
    record = {
        "kind": "generator",
        "source": loaded.source,
        "format": loaded.format,
        "label": loaded.label,
        "notes": loaded.notes,
        **dataclasses.asdict(summary),
    }
    rows = [
        ("checkpoint", loaded.source),
        ("format", f"{loaded.format}: {loaded.label}"),
        ("resolution", f"{summary.resolution} x {summary.resolution}"),
        ("num_ws", str(summary.num_ws)),
        ("z_dim / w_dim", f"{summary.z_dim} / {summary.w_dim}"),
        ("parameters", _millions(summary.params_total)),
        ("  mapping", _millions(summary.params_mapping)),
        ("  synthesis", _millions(summary.params_synthesis)),
        ("fp16 layers", ", ".join(f"{r}px" for r in summary.fp16_resolutions) or "none"),
        ("conv_clamp", "none" if summary.conv_clamp is None else f"{summary.conv_clamp:g}"),
        ("content hash", summary.content_hash),
    ]
    rows += [("note", note) for note in loaded.notes]
    return record, rows


def _identity(path: str) -> tuple[dict, list[tuple[str, str]]]:
    from pathlib import Path

    from pti.engine.identity import describe

    d = describe(path)
    record = {"kind": "identity", **d}
    hint = d["base_hint"] or "unknown"
    found = hint == "builtin:tiny" or Path(hint).is_file()
    encoding = {
        "delta-fp16": "fp16 deltas from the base generator's synthesis weights",
        "weight-fp32": "exact fp32 synthesis weights",
    }.get(d["encoding"], d["encoding"])
    rows = [
        ("identity", d["path"]),
        ("format", d["format"]),
        ("photo", d.get("photo") or "-"),
        ("base generator", f"{hint} ({'found' if found else 'not found here: pass it with --network'})"),
        ("base hash", d["base_hash"]),
        ("pivot", f"{d['pivot_shape']} {d['pivot_dtype']}"),
        ("storage", f"{encoding}: {d['tensors']} tensors, {_millions(d['parameters'])} values"),
        ("size", f"{d['bytes'] / 1e6:.2f} MB ({d['bytes']:,} bytes)"),
        (
            "checksum",
            "sha256 verified (weights and metadata are as pti wrote them)" if d["checksum"] else "none (see the note)",
        ),
    ]
    rows += _cut_rows(d)
    rows += _imported_rows(d)
    rows += _pivot_rows(d.get("init") or _meta_value(path, "init"))
    rows += _tuning_rows(d)
    rows += [("note", note) for note in d["notes"]]
    versions = d.get("versions") or {}
    rows.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or "-"))
    return record, rows


def _cut_rows(d: dict) -> list[tuple[str, str]]:
    """How the face was cut (format v3): what `pti render --paste` needs; a clip's frames."""
    cut, video = d.get("alignment"), d.get("video")
    if isinstance(video, dict):
        lost = video.get("lost") or []
        return [
            (
                "clip",
                f"{d.get('frames')} frames tuned of {video.get('selected')} chosen ({video.get('frames_in_clip')} in "
                f"the clip, {video.get('fps'):g} fps, every {video.get('every')}, smoothing sigma "
                f"{video.get('smooth_sigma'):g})" + (f"; face lost in {len(lost)}" if lost else ""),
            ),
            ("paste-back", "yes: pti render --paste pastes every frame into the clip"),
        ]
    if not isinstance(cut, dict):
        return [("paste-back", "no: no record of how the face was cut (an older or imported identity)")]
    if not cut.get("aligned", True):
        return [("paste-back", "no: tuned with --no-align (the photo was already a crop)")]
    w, h = cut.get("photo_size") or ("?", "?")
    return [("paste-back", f"yes: face {cut.get('face')} cut from the {w}x{h} photo (pti render --paste)")]


def _imported_rows(d: dict) -> list[tuple[str, str]]:
    """Where an imported identity came from (`pti import`): the tuned checkpoint and the pivot it read."""
    imported = d.get("imported")
    if not isinstance(imported, dict):
        return []
    tool = str(imported.get("format") or "?").removesuffix(" checkpoint")
    return [
        ("origin", f"imported from {imported.get('checkpoint')} ({tool})"),
        ("  pivot", f"{imported.get('pivot')} {imported.get('pivot_shape')}"),
    ]


def _meta_value(path: str, key: str):
    """One value of an identity's metadata (None when absent); the file was verified by `describe` before."""
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("meta", "{}")).get(key)
    except Exception:  # noqa: BLE001  an older or odd header: nothing to show
        return None


def _pivot_rows(init) -> list[tuple[str, str]]:
    """How the pivot was made: "e4e (e4e_ffhq_encode.pt) + 0 projector steps", "projector, 450 steps", ..."""
    if not isinstance(init, dict) or not init.get("init"):
        return []
    from pathlib import Path

    kind, steps = init["init"], init.get("refine_steps")
    if kind == "projector":
        return [("pivot from", f"the projector, {steps} steps from the average w")]
    name = Path(str(init.get("path") or "?")).name
    label = {"e4e": "e4e", "restyle": "ReStyle-e4e", "file": "pivot file"}.get(kind, kind)
    if kind == "restyle":
        label += f", {init.get('restyle_iterations')} iterations"
    sha = str(init.get("sha256") or "")[:16]
    line = f"{label} ({name}{', sha256 ' + sha if sha else ''}) + {steps} projector steps"
    seconds = init.get("seconds")
    return [("pivot from", line + (f", {seconds * 1e3:.0f} ms" if isinstance(seconds, (int, float)) else ""))]


def _tuning_rows(d: dict) -> list[tuple[str, str]]:
    """The run's settings and before/after metrics, as far as the file records them."""
    rows = []
    inv, tun, steps = d.get("invert_config") or {}, d.get("tune_config") or {}, d.get("steps") or {}
    if inv:
        rows.append(
            (
                "inversion",
                f"{steps.get('invert', inv.get('steps'))} steps in {inv.get('space')}, "
                f"lr {inv.get('initial_lr')}, seed {inv.get('seed')}",
            )
        )
    if tun:
        stop = " (early stop)" if d.get("early_stopped") else ""
        locality = (
            f"locality on (alpha {tun.get('locality_alpha')}, psi {tun.get('locality_psi')}, "
            f"{tun.get('locality_samples')} sample(s) every {tun.get('locality_interval')} step(s))"
            if tun.get("locality")
            else "locality off"
        )
        rows.append(
            (
                "tuning",
                f"{steps.get('tune', '?')} of {tun.get('max_steps')} steps{stop}, lr {tun.get('lr')}, "
                f"stop at perceptual <= {tun.get('lpips_threshold')}, {locality}, seed {tun.get('seed')}",
            )
        )
    tuned_with = d.get("tuned_with")
    if tuned_with:
        rows.append(
            (
                "tuned with",
                f"{tuned_with.get('impl')}, {tuned_with.get('precision')}"
                + ("" if tuned_with.get("recorded") else " (not recorded: the reference ops)"),
            )
        )
    if d.get("joint_with"):
        rows.append(("tuned jointly with", ", ".join(d["joint_with"])))
    losses = d.get("losses") or {}
    if losses:
        official = "the paper's" if d.get("official_losses") else "WEIGHT-FREE stand-ins, not the paper's"
        rows.append(("losses", f"{losses.get('projector')} / {losses.get('perceptual')} ({official})"))
    before, after = d.get("before_tuning") or {}, d.get("after_tuning") or {}
    for key in after:
        if key in before:
            rows.append((f"{key}", f"{before[key]:.4f} -> {after[key]:.4f} (pivot before tuning -> after)"))
    if d.get("identity_similarity") is not None:
        rows.append(("ID similarity", f"{d['identity_similarity']:.3f} (dlib, reconstruction vs aligned photo)"))
    seconds = d.get("seconds") or {}
    if seconds:
        rows.append(
            (
                "seconds",
                ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
                + (f" on {d['device']}, {d.get('precision')}" if d.get("device") else ""),
            )
        )
    return rows


def register(app: typer.Typer) -> None:
    app.command("info")(info)
