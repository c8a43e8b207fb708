"""`pti studio`: edit tuned people in the browser, sliders and a live render (FastAPI + one static page).

Everything the page can name comes from the server's own lists: the identities it was started with (or
the `.pti` files in the folder it was started in) and, per identity, its directions: the presets whose
files are cached and fit the generator, and the GANSpace components of the identity's base generator
(computed once and kept beside the identity as `<name>/ganspace.pt`). The page sends indexes and
numbers, never paths, so it can read nothing else, and the answers name files relative to the
identity's folder (`person/studio/x.png`), never by absolute path.

A render turns the sliders into `--edit` strings first and renders those through the same code as
`pti render` (`pti.rendering.edit_batch` and a render backend), so the edit string the page shows,
pasted into `pti render` in the identity's folder, gives the same pixels. Renders run in one worker
thread per person (`pti.studio.worker`), apart from the requests; what reaches them at all is decided
by `pti.studio.guard` (Host, Origin, token, body size) and `pti.studio.checks` (the body's fields).
Errors come back as one-line messages for the page; the server keeps running.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from pti.engine import edits as E
from pti.engine.device import apply_cpu_threads, resolve_device
from pti.engine.identity import is_identity_file, open_identity
from pti.engine.images import save_gif, save_png, to_uint8
from pti.engine.layout import Layout
from pti.engine.weights import default_registry
from pti.errors import PTIError
from pti.fsutil import atomic_path
from pti.rendering import _id_similarity, edit_batch, make_backend, paste_source, save_pasted
from pti.studio.checks import Move, RequestError
from pti.studio.worker import QUEUE, Worker

GANSPACE_FILE = "ganspace.pt"
GANSPACE_COMPONENTS = 20  # computed and cached; the page shows `components` of them
GANSPACE_SAMPLES = 20_000
PAGE = Path(__file__).with_name("page.html")
TIMEOUT = 30.0  # seconds a request may wait for its render (queue included)
SAVE_NAME_BYTES = 100  # longer readable names give way to a short hash
VALUE_SLACK = 1e-6  # a slider's value may pass its end by this much (the page's float steps)
PASTED_VIEW = 1024  # the pasted view's long side on the page, at most (Save writes the photo's own size)


def need_server():
    try:
        import fastapi  # noqa: F401, PLC0415  optional extra (studio)
        import uvicorn  # noqa: F401, PLC0415  optional extra (studio)
    except ImportError:
        raise PTIError("pti studio needs FastAPI and uvicorn: pip install 'pti[studio]'") from None


def find_identities(paths: list[Path]) -> list[Path]:
    """The identity files given (folders: their .pti files), else the .pti files in the current folder."""
    found: list[Path] = []
    for p in paths or [Path(".")]:
        if p.is_dir():
            found += sorted(q for q in p.glob("*.pti") if is_identity_file(q))
        elif not p.is_file():
            raise PTIError(f"{p}: no such identity file")
        elif not is_identity_file(p):
            raise PTIError(f"{p} is not a pti identity file (make one with `pti tune`)")
        else:
            found.append(p)
    if not found:
        raise PTIError("no identity files: give some (pti studio photo.pti) or start it in a folder with .pti files")
    return list(dict.fromkeys(p.resolve() for p in found))


@dataclass
class Slider:
    id: str
    label: str
    kind: str  # preset | ganspace
    target: str  # preset name or the GANSpace file's absolute path (what renders)
    shown: str  # the same as the page shows it: the name, or the path from the identity's folder
    component: int | None
    neutral: float  # the value that leaves the pivot as it is
    low: float
    high: float
    layers: tuple[int, int]
    default_layers: tuple[int, int] | None  # preset's own layers (None: all)

    def edit(self, value: float | str, layers: tuple[int, int], shown: bool = False) -> str:
        """The `--edit` string for this slider at `value` (a number, or a sweep's START:STOP:N) over `layers`."""
        value = f"{value:+.2f}" if isinstance(value, (int, float)) else value
        text = (
            (self.shown if shown else self.target)
            + (f":{self.component}" if self.component is not None else "")
            + f"={value}"
        )
        if self.kind == "ganspace" or layers != (self.default_layers or self.layers):
            text += f"@{layers[0]}-{layers[1]}"
        return text


@dataclass
class Person:
    path: Path
    name: str
    ident: Any
    backend: Any
    sliders: list[Slider]
    reconstruction: bytes | None = None  # PNG, made once
    paste: Any = None  # pti.rendering.PasteSource: the photo to paste into, when there is one
    paste_note: str | None = None  # why there is none (a clip, --no-align, the photo not found, ...)


@dataclass
class Slot:
    """One identity the studio serves: its render worker, and what is loaded or read once."""

    path: Path
    name: str
    worker: Worker
    person: Person | None = None  # set by the worker once loaded
    input: bytes | None = field(default=None, repr=False)  # the aligned photo as PNG


class Studio:
    """The state behind the page: people loaded on first use by their own worker, one job at a time each."""

    def __init__(
        self,
        identities: list[Path],
        network: str | None = None,
        backend: str = "auto",
        device: str = "auto",
        components: int = 10,
        registry=None,
        timeout: float = TIMEOUT,
        queue: int = QUEUE,
    ):
        self.network, self.backend_name, self.timeout = network, backend, timeout
        self.device, self.components, self.registry = device, components, registry
        self.slots = [Slot(p, n, Worker(n, queue)) for p, n in zip(identities, _names(identities))]
        folders = {p.parent for p in identities} | {Path.cwd()}
        # absolute folders a message for the page must not show (longest first; never the root itself)
        self._hide = sorted((str(f) for f in folders if len(f.parts) > 1), key=len, reverse=True)

    # ------------------------------------------------------------------ people and directions

    def slot(self, index: int, status: int = 400) -> Slot:
        if not 0 <= index < len(self.slots):
            raise RequestError(
                f"no identity number {index}; there are {len(self.slots)} (0-{len(self.slots) - 1})", status
            )
        return self.slots[index]

    def submit(self, index: int, work: Callable[[Person], Any], sweep: bool = False, status: int = 400):
        """`work(person)` on the person's worker (loading them first if needed); its future."""
        slot = self.slot(index, status)
        return slot.worker.submit(lambda: work(self._person(slot)), sweep=sweep)

    def stop(self) -> None:
        for slot in self.slots:
            slot.worker.close()

    def join(self, timeout: float) -> None:
        """Wait, `timeout` seconds in all, for the renders in progress (a save completes its files)."""
        deadline = time.monotonic() + timeout
        for slot in self.slots:
            slot.worker.join(max(0.0, deadline - time.monotonic()))

    def busy(self) -> bool:
        """Whether any person's worker is inside a render now."""
        return any(slot.worker.busy() for slot in self.slots)

    def scrub(self, text: str) -> str:
        """`text` without the absolute folders of the identities and of the studio (a message for the page)."""
        for folder in self._hide:
            text = text.replace(folder + os.sep, "")
            text = re.sub(
                re.escape(folder) + r"(?=$|[^\w.\-]|\.(?:$|\s))", ".", text
            )  # the folder itself, not /tmp/a in /tmp/ab
        return text

    def _person(self, slot: Slot) -> Person:
        if slot.person is None:
            slot.person = self._load(slot.path, slot.name)
        return slot.person

    def _load(self, path: Path, name: str) -> Person:
        dev = resolve_device(self.device)
        ident, base, base_hash, G = open_identity(path, self.network, dev)
        apply_cpu_threads(G, dev, "auto")
        backend = make_backend(
            self._backend(), G, base, base_hash, dev, 8, base_hint=str(self.network or ident.base_hint)
        )
        person = Person(path, name, ident, backend, self._sliders(path, ident, base))
        if ident.is_clip:
            person.paste_note = "a clip: pti render --paste pastes every frame into it"
        else:
            try:
                person.paste = paste_source(ident, path)
            except PTIError as e:
                person.paste_note = str(e)
        return person

    def _backend(self) -> str:
        if self.backend_name != "auto":
            return self.backend_name
        try:
            import onnxruntime  # noqa: F401, PLC0415  optional extra (export): is it installed?
            import onnxscript  # noqa: F401, PLC0415  optional extra (export): is it installed?
        except ImportError:
            return "torch"
        return "onnx"

    def _sliders(self, path: Path, ident, base) -> list[Slider]:
        num_ws, w_dim = ident.pivot.shape
        all_layers = (0, num_ws - 1)
        sliders = []
        registry = self.registry or default_registry()
        if (num_ws, w_dim) == E.FFHQ_SHAPE:
            for name, preset in E.PRESETS.items():
                if not registry.status(preset.weights).startswith("cached"):
                    continue  # not cached: `pti weights fetch` gets it
                layers = tuple(preset.layers) if preset.layers else all_layers
                if preset.kind == "ganspace":
                    d = E.resolve(E.parse_edit(f"{name}=0"), num_ws, w_dim, registry)
                    neutral = float(d.coordinate(ident.pivot))
                    sliders.append(
                        Slider(name, name, "preset", name, name, None, round(neutral, 2), -10, 10, layers, layers)
                    )
                else:
                    sliders.append(Slider(name, name, "preset", name, name, None, 0.0, -5, 5, layers, None))
        pca_path = Layout.of(path).folder / GANSPACE_FILE
        if not pca_path.is_file():
            components = min(GANSPACE_COMPONENTS, w_dim)  # a PCA of w has at most w_dim components
            E.save_ganspace(E.ganspace(base, components=components, samples=GANSPACE_SAMPLES, seed=0), pca_path)
        shown = f"{path.stem}/{GANSPACE_FILE}"
        for k in range(self.components):
            try:
                d = E.load_direction_file(pca_path, k)
            except PTIError:
                break
            neutral = float(d.coordinate(ident.pivot))
            sliders.append(
                Slider(
                    f"pc{k}",
                    f"GANSpace {k}",
                    "ganspace",
                    str(pca_path),
                    shown,
                    k,
                    round(neutral, 2),
                    round(neutral - 5, 2),
                    round(neutral + 5, 2),
                    all_layers,
                    None,
                )
            )
        return sliders

    # ------------------------------------------------------------------ what the page asks for (on the worker)

    def identities(self) -> list[dict]:
        return [{"index": i, "name": s.name} for i, s in enumerate(self.slots)]

    def describe(self, index: int, person: Person) -> dict:
        num_ws = person.ident.pivot.shape[0]
        return {
            "index": index,
            "name": person.name,
            "num_ws": num_ws,
            "backend": person.backend.name,
            "has_input": _aligned(person.path).is_file(),
            "can_paste": person.paste is not None,
            "paste_note": self.scrub(person.paste_note) if person.paste_note else None,
            "sliders": [
                {
                    "id": s.id,
                    "label": s.label,
                    "kind": s.kind,
                    "neutral": s.neutral,
                    "low": s.low,
                    "high": s.high,
                    "layers": list(s.layers),
                }
                for s in person.sliders
            ],
        }

    def edits(self, person: Person, moves: tuple[Move, ...]) -> tuple[list[str], list[str]]:
        """The `--edit` strings of the page's slider moves, as rendered and as shown; unmoved sliders add nothing.
        Each move names one of the person's sliders, at a value within its range, over layers that exist."""
        out, shown = [], []
        for m in moves:
            s, layers = self._move(person, m)
            if abs(m.value - s.neutral) < 1e-9 and layers == s.layers:
                continue
            out.append(s.edit(m.value, layers))
            shown.append(s.edit(m.value, layers, shown=True))
        return out, shown

    def _move(self, person: Person, m: Move) -> tuple[Slider, tuple[int, int]]:
        """The slider `m` moves and its layers, once the value is within the slider's range and the layers exist."""
        s = self._slider(person, m.id)
        lo, hi = min(s.low, s.neutral), max(s.high, s.neutral)
        if not lo - VALUE_SLACK <= m.value <= hi + VALUE_SLACK:
            raise RequestError(f"{s.label}: value {m.value:g} is outside its range {s.low:g} to {s.high:g}")
        if m.layers is None:
            return s, s.layers
        a, b = m.layers
        num_ws = person.ident.pivot.shape[0]
        if not (0 <= a < num_ws and 0 <= b < num_ws):
            raise RequestError(f"{s.label}: layers {a}-{b} are outside 0-{num_ws - 1}")
        if a > b:
            raise RequestError(f"{s.label}: layers {a}-{b} run backwards; the first is at most the last")
        return s, (a, b)

    def _slider(self, person: Person, slider_id: str) -> Slider:
        s = next((x for x in person.sliders if x.id == slider_id), None)
        if s is None:
            shown = slider_id if len(slider_id) <= 40 else slider_id[:40] + "..."
            raise RequestError(f"no direction {shown!r} for {person.name}")
        return s

    def _images(self, person: Person, texts: list[str]):
        """(specs, uint8 images, ms): `texts` parsed with the CLI's grammar and rendered as `pti render` renders
        them (the same batch: the reconstruction first when there are edits) on the person's backend."""
        specs = E.parse_edits(texts)
        _, ws = edit_batch(person.ident, specs, self.registry)
        t0 = time.perf_counter()
        images = person.backend.render(ws)
        ms = 1000 * (time.perf_counter() - t0)
        if not bool(torch.isfinite(images).all()):
            raise PTIError("the rendered image is not finite (NaN or infinite pixels); move the sliders back")
        return specs, list(to_uint8(images)), ms

    def render(self, person: Person, moves: tuple[Move, ...], pasted: bool = False) -> dict:
        """The edited image for the page, the edit strings, the command that reproduces it, ms and ID similarity;
        with `pasted`, also the edit pasted into the original photo (at most PASTED_VIEW px on its long side:
        Save writes the full photo)."""
        if pasted and person.paste is None:
            raise RequestError(f"no pasted view for {person.name}: {self.scrub(person.paste_note or 'no photo')}")
        texts, shown = self.edits(person, moves)
        _, rendered, ms = self._images(person, texts)
        recon, img = rendered[0], rendered[-1]
        view = {}
        if pasted:
            photo = Image.fromarray(self._pasted(person, img))
            photo.thumbnail((PASTED_VIEW, PASTED_VIEW), Image.Resampling.LANCZOS)
            view["pasted"] = _png_data_url(photo)
        return {
            **view,
            "image": _png_data_url(img),
            "edits": shown,
            "command": self.command(person, shown),
            "ms": round(ms, 1),
            "identity_similarity": _id_similarity(recon, img) if texts else 1.0,
            "backend": person.backend.name,
        }

    def command(self, person: Person, shown: list[str]) -> str:
        """The `pti render` command, to run in the identity's folder, that gives the same pixels."""
        parts = ["pti", "render", person.path.name] + [x for t in shown for x in ("--edit", t)]
        if self.network:
            network = Path(self.network)
            parts += [
                "--network",
                os.path.relpath(network.resolve(), person.path.parent) if network.is_file() else self.network,
            ]
        return " ".join(shlex.quote(p) for p in parts)

    def input_png(self, slot: Slot) -> bytes:
        """The aligned photo beside the identity, as PNG (read once)."""
        if slot.input is None:
            aligned = _aligned(slot.path)
            if not aligned.is_file():
                raise RequestError(f"no input photo beside {slot.name} ({slot.name}/aligned.png)", 404)
            data = aligned.read_bytes()
            if not data.startswith(b"\x89PNG\r\n\x1a\n"):
                data = _png_bytes(Image.open(io.BytesIO(data)).convert("RGB"))
            slot.input = data
        return slot.input

    def reconstruction_png(self, person: Person) -> bytes:
        if person.reconstruction is None:
            person.reconstruction = _png_bytes(self._images(person, [])[1][0])
        return person.reconstruction

    def save(self, person: Person, moves: tuple[Move, ...]) -> dict:
        """Write the current image and its edit strings into `<identity folder>/<name>/studio/`: a readable name
        (a short hash where it would be long), never one that holds another edit already."""
        texts, shown = self.edits(person, moves)
        specs, rendered, _ = self._images(person, texts)
        line = " ".join(shown)
        folder = Layout.of(person.path).studio
        name = _save_name(folder, [s.label(s.values[0]) for s in specs], line)
        command = self.command(person, shown)
        txt = folder / f"{name}.txt"
        with atomic_path(txt) as tmp:
            tmp.write_text(line + "\n" + command + "\n")
        png = save_png(rendered[-1], folder / f"{name}.png")
        top = person.path.parent
        saved = {"image": png.relative_to(top).as_posix(), "edits": txt.relative_to(top).as_posix(), "command": command}
        if person.paste is not None:  # the photo with the edit pasted in, at its resolution and in its format
            pasted = save_pasted(
                self._pasted(person, rendered[-1]), folder / person.paste.output(name), person.paste.icc_profile
            )
            saved["pasted"] = pasted.relative_to(top).as_posix()
        return saved

    def _pasted(self, person: Person, img: np.ndarray) -> np.ndarray:
        """`img` (a render of `person`) pasted into their original photo (pti.engine.paste)."""
        from pti.engine.paste import paste  # noqa: PLC0415

        source = person.paste
        return paste(source.photo, img, source.quad, source.landmarks).image

    def sweep(self, person: Person, moves: tuple[Move, ...], slider: str, frames: int) -> bytes:
        """A GIF of one slider from its low to its high end over its layers, the other sliders as they are."""
        s = self._slider(person, slider)
        mine = next((m for m in moves if m.id == slider), None)
        layers = self._move(person, mine)[1] if mine else s.layers  # checked like any other move
        texts, _ = self.edits(person, tuple(m for m in moves if m.id != slider))
        sweep = s.edit(f"{s.low:+.2f}:{s.high:+.2f}:{frames}", layers)
        _, rendered, _ = self._images(person, texts + [sweep])
        with tempfile.TemporaryDirectory() as tmp:
            return save_gif(rendered[1:], Path(tmp) / "sweep.gif", fps=8).read_bytes()


def _names(paths: list[Path]) -> list[str]:
    """What the page calls each identity: its file's stem, with its folder's name where two stems are alike."""
    stems = [p.stem for p in paths]
    return [f"{p.parent.name}/{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]


def _aligned(path: Path) -> Path:
    return Layout.of(path).aligned


def _save_name(folder: Path, labels: list[str], line: str) -> str:
    """A name for `<name>.png` + `<name>.txt` in `folder`: the edits' labels joined (a hash when that is over
    SAVE_NAME_BYTES), unless those files exist with other edits in them; then the label and a hash."""
    digest = hashlib.sha256(line.encode()).hexdigest()[:10]
    label = "_".join(labels) or "reconstruction"
    if len(label.encode()) > SAVE_NAME_BYTES:
        label = f"{len(labels)}-edits_{digest}"
    candidates = (
        [label]
        + ([f"{label}_{digest}"] if digest not in label else [])
        + [f"{label}_{digest}-{k}" for k in range(2, 100)]
    )
    for name in candidates:
        png, txt = folder / f"{name}.png", folder / f"{name}.txt"
        if not png.exists() and not txt.exists():
            return name
        if txt.is_file() and not png.is_dir():
            try:
                if txt.read_text(errors="replace").split("\n", 1)[0] == line:
                    return name  # the same edit saved again: the same files
            except OSError:
                continue
    raise PTIError(f"{folder.name}: no free name for this save (tried {len(candidates)}); move some files away")


def _png_bytes(img) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _png_data_url(img) -> str:
    return "data:image/png;base64," + base64.b64encode(_png_bytes(img)).decode()
