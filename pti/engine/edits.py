"""Latent edits: direction files, the named presets, the edit grammar, and GANSpace for any generator.

The arithmetic (REFERENCE §2, as the authors' editing code does it), on a pivot w of shape [L, C]:
- InterFaceGAN: w'[l] = w[l] + a * d[l] on the chosen layers, with d of shape [1, C] (the same on every
  layer) or [L, C] (one per layer).
- GANSpace: component i has a unit direction c_i, the mean m of the sampled w's and the standard
  deviation s_i of their coordinates along c_i. The pivot's coordinate, measured on its first layer,
  is k = <w[0] - m, c_i> / s_i; the edit moves it to a: delta = (a - k) * s_i * c_i, added to the
  chosen layers. So `a` is a target in standard deviations, not a step (eye_openness=5 opens the
  eyes to +5 sd whatever the photo).
- Several edits sum their deltas, each computed from the unedited pivot.

The grammar, parsed here for the CLI and the API alike (`parse_edits`):
    TARGET=VALUE[@LAYERS]      age=+3   age=-1.5   eye_openness=5   ./my_direction.npy=+2
    TARGET=START:STOP:N        a sweep: N frames from START to STOP (at most one per render)
    TARGET is a preset name, a direction file, or FILE:K for component K of a GANSpace file;
    LAYERS is "A-B" (inclusive) or "A". Without it, InterFaceGAN edits and GANSpace files apply to
    every layer and GANSpace presets to their own layers.

Nothing here prints; errors are `EditSyntaxError` (a usage error: exit 2 on the command line) and
`DirectionError` (a file that cannot serve as a direction: exit 1).
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pti.engine.config import ProgressFn
from pti.engine.safe_pickle import load_weights_only, pickle_refusal
from pti.engine.weights import default_registry
from pti.errors import PTIError, first_line
from pti.fsutil import atomic_path

MAX_SWEEP_FRAMES = 512  # a sweep longer than this is a typo, not an animation


class EditSyntaxError(PTIError):
    """An edit that cannot be understood or does not fit the generator's layers (a usage error)."""

    exit_code = 2


class DirectionError(PTIError):
    """A direction file that is missing, unreadable, or shaped for another generator."""


# ---------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    weights: str  # registry name of the file
    kind: str  # "interfacegan" or "ganspace"
    about: str  # what a positive value does
    component: int | None = None  # GANSpace component
    layers: tuple[int, int] | None = None  # GANSpace layers, first..last inclusive
    strength: float | None = None  # the authors' value for this GANSpace edit


# FFHQ directions used by the authors: InterFaceGAN boundaries, and GANSpace (component, layers,
# strength) as PTI's notebook sets them, i.e. (54, 7, 8, 5), (46, 4, 5, -6), (58, 7, 9, 7) with the
# end layer exclusive there and inclusive here.
PRESETS: dict[str, Preset] = {
    "age": Preset("interfacegan-age", "interfacegan", "older (+) or younger (-)"),
    "smile": Preset("interfacegan-smile", "interfacegan", "smile (+) or not (-)"),
    "pose": Preset("interfacegan-rotation", "interfacegan", "turns the head (yaw)"),
    "eye_openness": Preset(
        "ganspace-ffhq", "ganspace", "eyes open (+) or closed (-); the authors use 5", 54, (7, 7), 5.0
    ),
    "smile_ganspace": Preset("ganspace-ffhq", "ganspace", "smile; the authors use -6", 46, (4, 4), -6.0),
    "trimmed_beard": Preset("ganspace-ffhq", "ganspace", "beard trimmed; the authors use 7", 58, (7, 8), 7.0),
}
FFHQ_SHAPE = (18, 512)  # (num_ws, w_dim) of the 1024 px FFHQ generator the presets were made for


# ---------------------------------------------------------------------------- directions


@dataclass(frozen=True)
class Direction:
    """One edit direction, ready to apply to pivots of one generator."""

    name: str  # how outputs name it: "age", "dirs.pt:3"
    kind: str  # "interfacegan" or "ganspace"
    vector: torch.Tensor  # interfacegan: [1, C] or [L, C]; ganspace: unit component [C]
    mean: torch.Tensor | None = None  # ganspace: mean w [C]
    std: float | None = None  # ganspace: standard deviation along the component
    layers: tuple[int, int] | None = None  # default layers (first, last inclusive); None = all
    source: str = ""  # the file it came from

    def delta(self, pivot: torch.Tensor, value: float, layers: tuple[int, int] | None = None) -> torch.Tensor:
        """The change this edit makes to `pivot` [L, C], as an [L, C] tensor (zero outside the layers)."""
        first, last = layers or self.layers or (0, pivot.shape[0] - 1)
        out = torch.zeros_like(pivot)
        if self.kind == "interfacegan":
            d = self.vector.to(pivot)
            d = d.expand_as(pivot) if d.shape[0] == 1 else d
            out[first : last + 1] = value * d[first : last + 1]
        else:
            out[first : last + 1] = (value - self.coordinate(pivot)) * self.std * self.vector.to(pivot)
        return out

    def coordinate(self, pivot: torch.Tensor) -> torch.Tensor:
        """GANSpace: where `pivot` [L, C] sits along this component, in standard deviations (from its first w)."""
        return torch.dot(pivot[0] - self.mean.to(pivot), self.vector.to(pivot)) / self.std


def load_direction_file(path: str | Path, component: int | None = None, name: str | None = None) -> Direction:
    """An InterFaceGAN direction (.pt / .npy: [1,C], [C], [1,L,C] or [L,C]) or a GANSpace component
    (.pt dict with mean/comp/std as in `ffhq_pca.pt`, or GANSpace's .npz with lat_mean/lat_comp/lat_stdev)."""
    path = Path(path)
    label = name or (f"{path.name}:{component}" if component is not None else path.name)
    if not path.is_file():
        raise DirectionError(f"direction file not found: {path}")
    data = _read(path)
    _check_finite_values(data, path)
    if isinstance(data, dict):
        mean, comp, std = _pca_fields(data, path)
        if component is None:
            raise DirectionError(
                f"{path} holds {comp.shape[0]} GANSpace components; pick one as {path}:K (K = 0..{comp.shape[0] - 1})"
            )
        if not 0 <= component < comp.shape[0]:
            raise EditSyntaxError(f"{path} has components 0..{comp.shape[0] - 1}; there is no component {component}")
        c = comp[component].reshape(-1)
        if not (c.norm() > 0 and std[component] > 0):
            raise DirectionError(
                f"{path}: component {component} has zero length or zero sd; it cannot serve as a direction"
            )
        return Direction(label, "ganspace", c / c.norm(), mean.reshape(-1), float(std[component]), source=str(path))
    if component is not None:
        raise DirectionError(f"{path} is a single direction, not a GANSpace file; drop the ':{component}'")
    t = data
    if t.ndim == 1:
        t = t[None]
    elif t.ndim == 3 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2:
        raise DirectionError(
            f"{path}: a direction must be shaped [C], [1, C], [L, C] or [1, L, C], not {list(data.shape)}"
        )
    return Direction(label, "interfacegan", t, source=str(path))


def is_direction_file(path: str | Path) -> bool:
    """True for .npy / .npz files and torch files holding a tensor or a GANSpace dict (`pti info` asks this;
    a torch file is opened memory-mapped, so a large generator checkpoint costs little)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix in (".npy", ".npz"):
        return True
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # torch.save's zip; the legacy format cannot be memory-mapped
                return False
        obj = load_weights_only(path, mmap=True)
    except Exception:  # noqa: BLE001  unreadable or refused: not a direction file (the caller's next reader says why)
        return False
    keys = set(obj) if isinstance(obj, dict) else set()
    return (
        isinstance(obj, torch.Tensor)
        or {"mean", "comp", "std"} <= keys
        or {"lat_mean", "lat_comp", "lat_stdev"} <= keys
    )


def describe_direction_file(path: str | Path) -> dict:
    """What a direction file holds, for `pti info`: GANSpace components or an InterFaceGAN direction, with shapes."""
    path = Path(path)
    if not path.is_file():
        raise DirectionError(f"direction file not found: {path}")
    data = _read(path)
    _check_finite_values(data, path)
    out = {"path": str(path), "bytes": path.stat().st_size}
    if isinstance(data, dict):
        mean, comp, std = _pca_fields(data, path)
        layout = "ffhq_pca.pt" if "comp" in data else "GANSpace .npz"
        return {
            **out,
            "type": "ganspace",
            "layout": layout,
            "components": comp.shape[0],
            "w_dim": comp.shape[1],
            "std": std.tolist(),
        }
    t = data[None] if data.ndim == 1 else data[0] if data.ndim == 3 and data.shape[0] == 1 else data
    if t.ndim != 2:
        raise DirectionError(
            f"{path}: a direction must be shaped [C], [1, C], [L, C] or [1, L, C], not {list(data.shape)}"
        )
    return {
        **out,
        "type": "interfacegan",
        "shape": list(data.shape),
        "w_dim": t.shape[1],
        "layers": t.shape[0] if t.shape[0] > 1 else None,
        "norm": float(t.norm()),
    }


def _check_finite_values(data, path: Path) -> None:
    """DirectionError when a direction file holds NaN or infinity: every render it touched would be garbage."""
    for key, t in data.items() if isinstance(data, dict) else [("", data)]:
        if not bool(torch.isfinite(t).all()):
            where = f" ({key})" if key else ""
            raise DirectionError(
                f"{path}: its values{where} are not finite (NaN or infinity); it cannot serve as a direction"
            )


def _read(path: Path):
    """Tensors or a dict of tensors from .npy / .npz / torch files, never running code from them."""
    try:
        if path.suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False)).float()
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: torch.from_numpy(z[k]).float() for k in z.files}
        obj = load_weights_only(path)
    except Exception as e:  # noqa: BLE001  any failure to read means a bad file
        refusal = pickle_refusal(e)
        if refusal is not None:
            raise DirectionError(f"{path}: refused: {refusal}; it is not a direction file pti can read") from None
        raise DirectionError(f"cannot read direction file {path}: {first_line(e)}") from None
    if isinstance(obj, torch.Tensor):
        return obj.float()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj).float()
    if isinstance(obj, dict) and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in obj.values()):
        return {k: torch.as_tensor(v).float() for k, v in obj.items()}
    raise DirectionError(f"{path} holds a {type(obj).__name__}, not a direction tensor or a GANSpace dict")


def _pca_fields(data: dict, path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    for mean_key, comp_key, std_key in (("mean", "comp", "std"), ("lat_mean", "lat_comp", "lat_stdev")):
        if {mean_key, comp_key, std_key} <= set(data):
            mean, comp, std = data[mean_key], data[comp_key], data[std_key]
            comp = comp.reshape(comp.shape[0], -1)
            if mean.numel() != comp.shape[1] or std.numel() != comp.shape[0]:
                raise DirectionError(
                    f"{path}: GANSpace shapes disagree (mean {list(mean.shape)}, "
                    f"components {list(data[comp_key].shape)}, std {list(std.shape)})"
                )
            return mean.reshape(-1), comp, std.reshape(-1)
    raise DirectionError(
        f"{path}: a dict of {sorted(data)[:6]}, not a GANSpace file "
        "(expected mean/comp/std or lat_mean/lat_comp/lat_stdev)"
    )


def check_fits(direction: Direction, num_ws: int, w_dim: int) -> None:
    """DirectionError naming both shapes when `direction` was made for another generator."""
    v = direction.vector
    width = v.shape[-1]
    layers_ok = direction.kind == "ganspace" or v.shape[0] in (1, num_ws)
    if width == w_dim and layers_ok:
        return
    shape = list(v.shape) if direction.kind == "interfacegan" else [width]
    raise DirectionError(
        f"direction {direction.name} is shaped {shape}, but this generator's ws are "
        f"[{num_ws}, {w_dim}] (num_ws, w_dim): it was made for another generator"
    )


# ---------------------------------------------------------------------------- the grammar


@dataclass(frozen=True)
class EditSpec:
    """One parsed --edit."""

    text: str  # as written
    target: str  # preset name or file path
    component: int | None  # FILE:K
    values: tuple[float, ...]  # one value, or the frames of a sweep
    layers: tuple[int, int] | None  # first, last (inclusive)
    sweep: bool = False

    def label(self, value: float) -> str:
        """A file-name-safe name for this edit at `value`: age+3, dirs.pt_3-2@0-8."""
        target = self.target if self.target in PRESETS else Path(self.target).name
        if self.component is not None:
            target += f"_{self.component}"
        layers = "" if self.layers is None else f"@{self.layers[0]}-{self.layers[1]}"
        return re.sub(r"[^A-Za-z0-9+\-._@]", "_", f"{target}{value:+g}{layers}")


_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"


def _number(text: str, edit: str) -> float:
    if not re.fullmatch(_NUMBER, text.strip()):
        raise EditSyntaxError(f"--edit {edit}: {text!r} is not a number")
    value = float(text)
    if not math.isfinite(value):  # 1e309 parses as infinity
        raise EditSyntaxError(f"--edit {edit}: {text.strip()} is too large to be a finite number")
    return value


def parse_edit(text: str) -> EditSpec:
    """Parse one TARGET=VALUE[@LAYERS] or TARGET=START:STOP:N (see the module docstring)."""
    target, eq, rest = text.rpartition("=")
    if not eq or not target.strip() or not rest.strip():
        raise EditSyntaxError(f"--edit {text}: write NAME=VALUE, e.g. age=+3, age=-3:3:7 or age=+3@0-8")
    target = target.strip()
    value_text, at, layer_text = rest.partition("@")
    layers = _layers(layer_text, text) if at else None
    component = None
    m = re.fullmatch(r"(.+):(\d+)", target)
    if m and target not in PRESETS:
        target, component = m.group(1), int(m.group(2))
    parts = value_text.split(":")
    if len(parts) == 1:
        return EditSpec(text, target, component, (_number(parts[0], text),), layers)
    if len(parts) != 3:
        raise EditSyntaxError(f"--edit {text}: a sweep is START:STOP:N, e.g. age=-3:3:7")
    start, stop = _number(parts[0], text), _number(parts[1], text)
    if not re.fullmatch(r"\d+", parts[2].strip()) or not 2 <= int(parts[2]) <= MAX_SWEEP_FRAMES:
        raise EditSyntaxError(
            f"--edit {text}: a sweep needs a whole number of frames from 2 to {MAX_SWEEP_FRAMES}, not {parts[2]!r}"
        )
    n = int(parts[2])
    if not math.isfinite(stop - start):  # the frames would be NaN or infinite
        raise EditSyntaxError(f"--edit {text}: the sweep from {start:g} to {stop:g} spans more than a finite number")
    values = tuple(float(v) for v in np.linspace(start, stop, n))
    return EditSpec(text, target, component, values, layers, sweep=True)


def _layers(text: str, edit: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not m:
        raise EditSyntaxError(f"--edit {edit}: layers are written A-B or A (e.g. @0-8), not {text!r}")
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) is not None else first
    if last < first:
        raise EditSyntaxError(f"--edit {edit}: the layer range {first}-{last} is empty")
    return first, last


def parse_edits(texts: Sequence[str]) -> list[EditSpec]:
    """Parse every --edit; at most one may be a sweep."""
    specs = [parse_edit(t) for t in texts]
    sweeps = [s.text for s in specs if s.sweep]
    if len(sweeps) > 1:
        raise EditSyntaxError(f"only one sweep per render, got {len(sweeps)}: {', '.join(sweeps)}")
    return specs


def known_names() -> str:
    return ", ".join(PRESETS)


def looks_like_path(target: str) -> bool:
    return any(sep in target for sep in ("/", "\\")) or Path(target).suffix in (".pt", ".pth", ".npy", ".npz")


def resolve(spec: EditSpec, num_ws: int, w_dim: int, registry=None) -> Direction:
    """The direction `spec` names, checked against a generator with ws of shape [num_ws, w_dim]."""
    if spec.target in PRESETS:
        direction = _preset(spec, num_ws, w_dim, registry)
    elif looks_like_path(spec.target) or Path(spec.target).exists():
        direction = load_direction_file(
            spec.target, spec.component, name=spec.target + (f":{spec.component}" if spec.component is not None else "")
        )
        check_fits(direction, num_ws, w_dim)
    else:
        raise EditSyntaxError(
            f"--edit {spec.text}: unknown direction {spec.target!r}; known: {known_names()}, "
            "or a direction file (./dir.npy, ./dirs.pt:K)"
        )
    layers = spec.layers or direction.layers
    if layers is not None and layers[1] >= num_ws:
        raise EditSyntaxError(
            f"--edit {spec.text}: layers {layers[0]}-{layers[1]} are out of range; "
            f"this generator has layers 0-{num_ws - 1}"
        )
    return direction


def _preset(spec: EditSpec, num_ws: int, w_dim: int, registry) -> Direction:
    preset = PRESETS[spec.target]
    if spec.component is not None:
        raise EditSyntaxError(
            f"--edit {spec.text}: {spec.target} is a preset; ':K' picks a component of a GANSpace file"
        )
    if (num_ws, w_dim) != FFHQ_SHAPE:
        raise DirectionError(
            f"{spec.target} is a direction for the 1024 px FFHQ generator (ws [{FFHQ_SHAPE[0]}, {FFHQ_SHAPE[1]}]); "
            f"this identity's generator has ws [{num_ws}, {w_dim}]. Compute directions for it with "
            "`pti directions ganspace --network CKPT --out dirs.pt` and edit with --edit ./dirs.pt:K=VALUE"
        )
    path = (registry or default_registry()).resolve(preset.weights)  # WeightsError: how to get it
    direction = load_direction_file(path, preset.component, name=spec.target)
    check_fits(direction, num_ws, w_dim)
    return Direction(
        spec.target, direction.kind, direction.vector, direction.mean, direction.std, preset.layers, str(path)
    )


# ---------------------------------------------------------------------------- applying edits


@dataclass(frozen=True)
class Frame:
    label: str  # file-name-safe: "age+3_smile-1", "reconstruction"
    ws: torch.Tensor  # [L, C]
    values: dict[str, float]  # edit text -> value used in this frame


def frames(pivot: torch.Tensor, specs: Sequence[EditSpec], directions: Sequence[Direction]) -> list[Frame]:
    """The ws to render: one frame without edits or for a set of single edits, N frames for a sweep."""
    pivot = pivot.reshape(pivot.shape[-2:])
    if not specs:
        return [Frame("reconstruction", pivot.clone(), {})]
    fixed = [(s, d) for s, d in zip(specs, directions) if not s.sweep]
    sweep = [(s, d) for s, d in zip(specs, directions) if s.sweep]
    base = pivot + sum((d.delta(pivot, s.values[0], s.layers) for s, d in fixed), torch.zeros_like(pivot))
    fixed_label = "_".join(s.label(s.values[0]) for s, _ in fixed)
    if not sweep:
        return [Frame(fixed_label, base, {s.text: s.values[0] for s, _ in fixed})]
    s, d = sweep[0]
    out = []
    for v in s.values:
        label = "_".join(filter(None, [s.label(v), fixed_label]))
        out.append(
            Frame(label, base + d.delta(pivot, v, s.layers), {s.text: v, **{f.text: f.values[0] for f, _ in fixed}})
        )
    return out


# ---------------------------------------------------------------------------- GANSpace


@torch.no_grad()
def ganspace(
    G,
    components: int = 80,
    samples: int = 100_000,
    seed: int = 0,
    batch: int = 10_000,
    progress: ProgressFn | None = None,
) -> dict[str, torch.Tensor]:
    """PCA of mapped w's (first layer, no truncation), in the `ffhq_pca.pt` layout.

    Returns `mean` [1, C], `comp` [K, 1, C] (unit rows, sorted by explained variance, each with its
    largest entry positive so the signs are reproducible) and `std` [K], the standard deviation of the
    samples' coordinates along each component (the square root of its eigenvalue). z's come from
    numpy's RandomState(seed), the same on every machine; the covariance is accumulated in float64.
    """
    w_dim = G.w_dim
    if not 1 <= components <= w_dim:
        raise ValueError(f"components must be 1..{w_dim} (w_dim), got {components}")
    if samples < components + 1:
        raise ValueError(f"need more samples ({samples}) than components ({components})")
    device = next(G.parameters()).device
    rng = np.random.RandomState(seed)
    total = torch.zeros(w_dim, dtype=torch.float64)
    outer = torch.zeros(w_dim, w_dim, dtype=torch.float64)
    done = 0
    steps = math.ceil(samples / batch)
    for step in range(steps):
        n = min(batch, samples - done)
        z = torch.from_numpy(rng.randn(n, G.z_dim)).to(device, torch.float32)
        w = G.mapping(z, truncation_psi=1.0, skip_w_avg_update=True)[:, 0].double().cpu()
        total += w.sum(0)
        outer += w.T @ w
        done += n
        if progress is not None:
            progress("ganspace", step + 1, steps, {})
    mean = total / done
    cov = outer / done - torch.outer(mean, mean)
    eigval, eigvec = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(eigval, descending=True)[:components]
    comp = eigvec[:, order].T  # [K, C], unit rows
    signs = torch.sign(comp.gather(1, comp.abs().argmax(1, keepdim=True)))
    comp = comp * signs
    std = eigval[order].clamp(min=0).sqrt()
    return {"mean": mean.float()[None], "comp": comp.float()[:, None], "std": std.float()}


def save_ganspace(pca: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write the `ffhq_pca.pt` layout (a dict of tensors; loads with weights_only=True), atomically."""
    path = Path(path)
    buf = io.BytesIO()  # not the temp file's name: torch.save records it, and the same PCA must give the same bytes
    torch.save({k: v.contiguous() for k, v in pca.items()}, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return path
