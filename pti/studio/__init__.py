"""`pti studio`: edit tuned people in the browser, sliders and a live render (FastAPI + one static page).

Everything the page can name comes from the server's own lists: the identities it was started with (or
the `.pti` files in the folder it was started in) and, per identity, its directions: the presets whose
files are cached and fit the generator, and the GANSpace components of the identity's base generator
(computed once and kept beside the identity as `<name>/ganspace.pt`). The page sends indexes and
numbers, never paths, so it can read nothing else.

A render turns the sliders into `--edit` strings first and renders those through the same code as
`pti render` (`pti.rendering.edit_batch` and a render backend), so the edit string the page shows,
pasted into `pti render`, gives the same pixels. Errors come back as one-line messages for the page;
the server keeps running.
"""


import base64
import io
import shlex
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pti.errors import PTIError

GANSPACE_FILE = "ganspace.pt"
GANSPACE_COMPONENTS = 20          # computed and cached; the page shows `components` of them
GANSPACE_SAMPLES = 20_000
PAGE = Path(__file__).with_name("page.html")


def need_server():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise PTIError("pti studio needs FastAPI and uvicorn: pip install 'pti[studio]'") from None


def find_identities(paths: list[Path]) -> list[Path]:
    """The identity files given (folders: their .pti files), else the .pti files in the current folder."""
    from pti.engine.identity import is_identity_file

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
    return [p.resolve() for p in found]


@dataclass
class Slider:
    id: str
    label: str
    kind: str                       # preset | ganspace
    target: str                     # preset name or the GANSpace file path
    component: int | None
    neutral: float                  # the value that leaves the pivot as it is
    low: float
    high: float
    layers: tuple[int, int]
    default_layers: tuple[int, int] | None   # preset's own layers (None: all)

    def edit(self, value: float | str, layers: tuple[int, int]) -> str:
        """The `--edit` string for this slider at `value` (a number, or a sweep's START:STOP:N) over `layers`."""
        value = f"{value:+.2f}" if isinstance(value, (int, float)) else value
        text = f"{self.target}" + (f":{self.component}" if self.component is not None else "") + f"={value}"
        if self.kind == "ganspace" or layers != (self.default_layers or self.layers):
            text += f"@{layers[0]}-{layers[1]}"
        return text


@dataclass
class Person:
    path: Path
    ident: Any
    backend: Any
    sliders: list[Slider]
    lock: threading.Lock = field(default_factory=threading.Lock)


class Studio:
    """The state behind the page: people loaded on first use, one render at a time per person."""

    def __init__(self, identities: list[Path], network: str | None = None, backend: str = "auto", device: str = "auto",
                 components: int = 10, registry=None):
        self.paths, self.network, self.backend_name = identities, network, backend
        self.device, self.components, self.registry = device, components, registry
        self.people: dict[int, Person] = {}
        self.load_lock = threading.Lock()

    # ------------------------------------------------------------------ people and directions

    def person(self, index: int) -> Person:
        if not 0 <= index < len(self.paths):
            raise PTIError(f"no identity number {index}")
        with self.load_lock:
            if index not in self.people:
                self.people[index] = self._load(self.paths[index])
            return self.people[index]

    def _load(self, path: Path) -> Person:
        from pti.engine.checkpoint import generator_hash
        from pti.engine.device import apply_cpu_threads, resolve_device
        from pti.engine.identity import Identity, load_base
        from pti.rendering import make_backend

        ident = Identity.load(path)
        dev = resolve_device(self.device)
        base = load_base(ident, self.network, dev)
        base_hash = generator_hash(base)
        G = ident.apply(base, base_hash)
        apply_cpu_threads(G, dev, "auto")
        backend = make_backend(self._backend(), G, base, base_hash, dev, 8, base_hint=str(self.network or ident.base_hint))
        return Person(path, ident, backend, self._sliders(path, ident, base))

    def _backend(self) -> str:
        if self.backend_name != "auto":
            return self.backend_name
        try:
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            return "torch"
        return "onnx"

    def _sliders(self, path: Path, ident, base) -> list[Slider]:
        from pti.engine import edits as E
        from pti.engine.weights import default_registry

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
                    sliders.append(Slider(name, name, "preset", name, None, round(neutral, 2), -10, 10, layers, layers))
                else:
                    sliders.append(Slider(name, name, "preset", name, None, 0.0, -5, 5, layers, None))
        pca_path = path.parent / path.stem / GANSPACE_FILE
        if not pca_path.is_file():
            E.save_ganspace(E.ganspace(base, components=GANSPACE_COMPONENTS, samples=GANSPACE_SAMPLES, seed=0), pca_path)
        for k in range(self.components):
            try:
                d = E.load_direction_file(pca_path, k)
            except PTIError:
                break
            neutral = float(d.coordinate(ident.pivot))
            sliders.append(Slider(f"pc{k}", f"GANSpace {k}", "ganspace", str(pca_path), k, round(neutral, 2),
                                  round(neutral - 5, 2), round(neutral + 5, 2), all_layers, None))
        return sliders

    # ------------------------------------------------------------------ what the page asks for

    def identities(self) -> list[dict]:
        return [{"index": i, "name": p.stem, "path": str(p)} for i, p in enumerate(self.paths)]

    def describe(self, index: int) -> dict:
        person = self.person(index)
        num_ws = person.ident.pivot.shape[0]
        return {"index": index, "name": person.path.stem, "num_ws": num_ws, "backend": person.backend.name,
                "has_input": self._input_photo(person) is not None,
                "sliders": [{"id": s.id, "label": s.label, "kind": s.kind, "neutral": s.neutral, "low": s.low, "high": s.high,
                             "layers": list(s.layers)} for s in person.sliders]}

    def edits(self, person: Person, moves: list[dict]) -> list[str]:
        """`--edit` strings from the page's slider moves [{id, value, layers}]; unmoved sliders add nothing."""
        by_id = {s.id: s for s in person.sliders}
        out = []
        num_ws = person.ident.pivot.shape[0]
        for m in moves:
            s = by_id.get(str(m.get("id")))
            if s is None:
                raise PTIError(f"no direction {m.get('id')!r} for {person.path.stem}")
            value = float(m["value"])
            a, b = (int(x) for x in m.get("layers", s.layers))
            if not 0 <= a <= b < num_ws:
                raise PTIError(f"{s.label}: layers {a}-{b} are outside 0-{num_ws - 1}")
            if abs(value - s.neutral) < 1e-9 and (a, b) == s.layers:
                continue
            out.append(s.edit(value, (a, b)))
        return out

    def _images(self, person: Person, texts: list[str]):
        """(specs, uint8 images, ms): `texts` parsed with the CLI's grammar and rendered as `pti render` renders
        them (the same batch: the reconstruction first when there are edits) on the person's backend."""
        from pti.engine import edits as E
        from pti.engine.images import to_uint8
        from pti.rendering import edit_batch

        specs = E.parse_edits(texts)
        _, ws = edit_batch(person.ident, specs, self.registry)
        with person.lock:
            t0 = time.perf_counter()
            images = person.backend.render(ws)
            ms = 1000 * (time.perf_counter() - t0)
        return specs, list(to_uint8(images)), ms

    def render(self, index: int, moves: list[dict]) -> dict:
        """The edited image for the page, the edit strings, the command that reproduces it, ms and ID similarity."""
        from pti.rendering import _id_similarity

        person = self.person(index)
        texts = self.edits(person, moves)
        _, rendered, ms = self._images(person, texts)
        recon, img = rendered[0], rendered[-1]
        return {"image": _png_data_url(img), "edits": texts, "command": self.command(person, texts), "ms": round(ms, 1),
                "identity_similarity": _id_similarity(recon, img) if texts else 1.0, "backend": person.backend.name}

    def command(self, person: Person, texts: list[str]) -> str:
        parts = ["pti", "render", str(person.path)] + [x for t in texts for x in ("--edit", t)]
        if self.network:
            parts += ["--network", self.network]
        return " ".join(shlex.quote(p) for p in parts)

    def image(self, index: int, which: str) -> bytes:
        person = self.person(index)
        if which == "input":
            photo = self._input_photo(person)
            if photo is None:
                raise PTIError("no input photo beside this identity")
            return _png_bytes(photo)
        return _png_bytes(self._images(person, [])[1][0])

    def save(self, index: int, moves: list[dict]) -> dict:
        """Write the current image and its edit strings into `<identity folder>/<name>/studio/`."""
        from pti.engine.images import save_png
        from pti.fsutil import atomic_path

        person = self.person(index)
        texts = self.edits(person, moves)
        specs, rendered, _ = self._images(person, texts)
        label = "_".join(s.label(s.values[0]) for s in specs) or "reconstruction"
        folder = person.path.parent / person.path.stem / "studio"
        png = save_png(rendered[-1], folder / f"{label}.png")
        txt = folder / f"{label}.txt"
        command = self.command(person, texts)
        with atomic_path(txt) as tmp:
            tmp.write_text(" ".join(texts) + "\n" + command + "\n")
        return {"image": str(png), "edits": str(txt), "command": command}

    def sweep(self, index: int, moves: list[dict], slider: str, frames: int = 9) -> bytes:
        """A GIF of one slider from its low to its high end, the other sliders as they are."""
        import tempfile

        from pti.engine.images import save_gif

        person = self.person(index)
        s = next((x for x in person.sliders if x.id == slider), None)
        if s is None:
            raise PTIError(f"no direction {slider!r} for {person.path.stem}")
        others = [m for m in moves if m.get("id") != slider]
        layers = next((tuple(m.get("layers", s.layers)) for m in moves if m.get("id") == slider), s.layers)
        sweep = s.edit(f"{s.low:+.2f}:{s.high:+.2f}:{frames}", tuple(layers))
        _, rendered, _ = self._images(person, self.edits(person, others) + [sweep])
        with tempfile.TemporaryDirectory() as tmp:
            return save_gif(rendered[1:], Path(tmp) / "sweep.gif", fps=8).read_bytes()

    @staticmethod
    def _input_photo(person: Person):
        from PIL import Image

        aligned = person.path.parent / person.path.stem / "aligned.png"
        return Image.open(aligned).convert("RGB") if aligned.is_file() else None


def _png_bytes(img) -> bytes:
    import numpy as np
    from PIL import Image

    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _png_data_url(img) -> str:
    return "data:image/png;base64," + base64.b64encode(_png_bytes(img)).decode()


# ----------------------------------------------------------------------------- the web app


def create_app(studio: Studio):
    """The FastAPI app: the page, and JSON endpoints that answer errors as {"error": "one line"}."""
    need_server()
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="pti studio", docs_url=None, redoc_url=None, openapi_url=None)

    def guarded(fn):
        try:
            return fn()
        except PTIError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except Exception as e:  # noqa: BLE001  a bad file or edit must never take the server down
            from pti.errors import first_line

            return JSONResponse({"error": first_line(e)}, status_code=500)

    async def body(request: Request) -> dict | None:
        try:
            data = await request.json()
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    not_json = JSONResponse({"error": "send a JSON object: {\"identity\": N, \"moves\": [...]}"}, status_code=400)

    async def posted(request: Request, action):
        """A POST {"identity": N, "moves": [...], ...}: `action(index, moves, data)` in the thread pool, guarded."""
        data = await body(request)
        if data is None:
            return not_json
        return await run_in_threadpool(guarded, lambda: action(int(data.get("identity", 0)), list(data.get("moves", [])), data))

    html = PAGE.read_text()

    @app.get("/", response_class=HTMLResponse)
    def page():
        return html

    @app.get("/api/identities")
    def identities():
        return guarded(lambda: {"identities": studio.identities()})

    @app.get("/api/identity/{index}")
    def identity(index: int):
        return guarded(lambda: studio.describe(index))

    @app.get("/api/identity/{index}/{which}.png")
    def image(index: int, which: str):
        if which not in ("input", "reconstruction"):
            return JSONResponse({"error": f"no image {which!r}"}, status_code=404)
        out = guarded(lambda: studio.image(index, which))
        return out if isinstance(out, JSONResponse) else Response(out, media_type="image/png")

    @app.post("/api/render")
    async def render(request: Request):
        return await posted(request, lambda i, moves, _: studio.render(i, moves))

    @app.post("/api/save")
    async def save(request: Request):
        return await posted(request, lambda i, moves, _: studio.save(i, moves))

    @app.post("/api/sweep")
    async def sweep(request: Request):
        out = await posted(request, lambda i, moves, data: studio.sweep(i, moves, str(data.get("slider", ""))))
        if isinstance(out, JSONResponse):
            return out
        return Response(out, media_type="image/gif", headers={"Content-Disposition": 'attachment; filename="sweep.gif"'})

    return app
