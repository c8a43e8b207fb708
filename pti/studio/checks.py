"""What the studio accepts in a request body: one small JSON object of known fields, each of its type.

Everything here runs on the event loop before any work is queued, so a malformed request costs
microseconds and gets a 400 with one line naming the field, never a 500. What needs the person
(does the slider exist, is the value within its range, do the layers exist) is checked by
`Studio.edits` in the person's worker, with the same kind of message.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from pti.errors import PTIError

MAX_BODY = 64 * 1024  # bytes; the page's largest request, every slider moved, is about 2 KB
MAX_MOVES = 64  # moves per request; a person has at most 20 GANSpace sliders plus the presets
MAX_DEPTH = 4  # {"moves": [{"layers": [a, b]}]}: object, list, object, list
SWEEP_FRAMES = 9  # a sweep's frames unless the request says
MAX_SWEEP_FRAMES = 30  # a sweep renders frames + 1 images in one request; this bounds its time
MAX_ID = 64  # characters of a slider id (theirs are a few)

FIELDS = {
    "render": ("identity", "moves", "pasted"),
    "save": ("identity", "moves"),
    "sweep": ("identity", "moves", "slider", "frames"),
}
REQUIRED = {"render": ("identity", "moves"), "save": ("identity", "moves"), "sweep": ("identity", "moves", "slider")}
MOVE_FIELDS = ("id", "value", "layers")


class RequestError(PTIError):
    """A request the studio will not serve; `status` is the HTTP status of the one-line answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Move:
    id: str  # the slider's id, e.g. "pc3" or "age"
    value: float  # finite; its range is checked against the slider later
    layers: tuple[int, int] | None  # first and last layer; None: the slider's own


@dataclass(frozen=True)
class Ask:
    identity: int  # index into the studio's identities (checked later)
    moves: tuple[Move, ...]
    slider: str | None = None  # sweep only: which slider runs from end to end
    frames: int = SWEEP_FRAMES  # sweep only
    pasted: bool = False  # render only: also the edit pasted back into the original photo


def parse(raw: bytes, kind: str) -> Ask:
    """The body of a POST to /api/<kind>, checked field by field."""
    data = _json(raw)
    if not isinstance(data, dict):
        raise RequestError(f'send a JSON object such as {{"identity": 0, "moves": []}}, not {_kind(data)}')
    unknown = [k for k in data if k not in FIELDS[kind]]
    if unknown:
        raise RequestError(f"unknown field {_show(unknown[0])}; a {kind} request has {', '.join(FIELDS[kind])}")
    missing = [k for k in REQUIRED[kind] if k not in data]
    if missing:
        raise RequestError(f"missing field {missing[0]!r}; a {kind} request has {', '.join(FIELDS[kind])}")
    ask = Ask(whole(data["identity"], "identity"), moves(data["moves"]))
    if kind == "render":
        pasted = data.get("pasted", False)
        if not isinstance(pasted, bool):
            raise RequestError(f"pasted must be true or false, not {_kind(pasted)}")
        return Ask(ask.identity, ask.moves, pasted=pasted)
    if kind != "sweep":
        return ask
    slider = data["slider"]
    if not isinstance(slider, str) or not 0 < len(slider) <= MAX_ID:
        raise RequestError(f"slider must be the id of a slider (a short string), not {_kind(slider)}")
    frames = whole(data.get("frames", SWEEP_FRAMES), "frames")
    if not 2 <= frames <= MAX_SWEEP_FRAMES:
        raise RequestError(f"frames must be from 2 to {MAX_SWEEP_FRAMES}, not {frames}")
    return Ask(ask.identity, ask.moves, slider, frames)


def moves(value) -> tuple[Move, ...]:
    if not isinstance(value, list):
        raise RequestError(f'moves must be a list of {{"id", "value", "layers"}} objects, not {_kind(value)}')
    if len(value) > MAX_MOVES:
        raise RequestError(f"too many moves ({len(value)}); at most {MAX_MOVES}, one per slider")
    out: list[Move] = []
    for k, m in enumerate(value, 1):
        if not isinstance(m, dict):
            raise RequestError(f'move {k} must be an object {{"id", "value", "layers"}}, not {_kind(m)}')
        unknown = [f for f in m if f not in MOVE_FIELDS]
        if unknown:
            raise RequestError(f"move {k}: unknown field {_show(unknown[0])}; a move has id, value and layers")
        if not isinstance(m.get("id"), str) or not 0 < len(m["id"]) <= MAX_ID:
            raise RequestError(
                f"move {k}: id must be a slider's id (a short string), not {_kind(m.get('id', _MISSING))}"
            )
        what = f"move {k} ({_show(m['id'])})"
        layers = m.get("layers")
        if "layers" in m:
            if not (isinstance(layers, list) and len(layers) == 2 and all(type(x) is int for x in layers)):
                raise RequestError(f"{what}: layers must be [first, last], two whole numbers, not {_kind(layers)}")
            layers = (layers[0], layers[1])
        out.append(Move(m["id"], number(m.get("value", _MISSING), f"{what}: value"), layers))
        if any(o.id == m["id"] for o in out[:-1]):
            raise RequestError(f"{what} is moved twice; send each slider once")
    return tuple(out)


def whole(value, what: str) -> int:
    """An int (JSON's whole numbers; true, 1.0 and "1" are not)."""
    if type(value) is not int:
        raise RequestError(f"{what} must be a whole number, not {_kind(value)}")
    return value


def number(value, what: str) -> float:
    """A finite int or float (true, "1" and null are not; 1e309 overflows to infinity and is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{what} must be a number, not {_kind(value)}")
    try:
        out = float(value)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        raise RequestError(f"{what} must be a finite number (this one overflows a float)")
    return out


def index(text: str, what: str = "identity number") -> int:
    """A path's number: /api/identity/<N>."""
    sign, digits = (text[0], text[1:]) if text[:1] == "-" else ("", text)
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 9:
        raise RequestError(f"{what} must be a whole number, not {_show(text)}")
    return int(sign + digits)


def _json(raw: bytes):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError("the body is not JSON: it is not UTF-8 text") from None
    try:
        data = json.loads(text, parse_constant=_constant)
    except RecursionError:
        raise RequestError(f"JSON nested deeper than {MAX_DEPTH} levels is not accepted") from None
    except ValueError as e:
        raise RequestError(f"the body is not JSON ({e})") from None
    if _depth(data) > MAX_DEPTH:
        raise RequestError(f"JSON nested deeper than {MAX_DEPTH} levels is not accepted")
    return data


def _constant(name: str):
    raise RequestError(f"{name} is not a number JSON allows; send finite numbers")


def _depth(data) -> int:
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                return deepest
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


_MISSING = object()


def _kind(value) -> str:
    """How a wrong value reads in a message: 'a string', 'true', 'null', 'a list', 'nothing'."""
    if value is _MISSING:
        return "nothing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {value:g}" if abs(value) < 1e300 else "a huge number"
    if isinstance(value, str):
        return f"the string {_show(value)}"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _show(text: str, limit: int = 40) -> str:
    """A value from the request, quoted and cut short: what the sender sent, never a page of it."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
