"""The export contract: what every export format shares, below the format modules.

`contract.json` beside an exported graph says how to feed it (the full description is in `pti.export`'s
docstring): input and output names, dtypes and shapes, the dynamic batch axis and its profile, every
tuned weight by graph name, the base generator's hash, the versions and device it was built with, a
sample input with its expected (pooled) output, and the size and sha256 of every file.

Here: the module that is exported (`ExportSynthesis`), making, writing, loading and checking a contract,
the sample checksum, and the check of a new export against PyTorch. `pti.export.onnx`, `.aoti` and
`.tensorrt` build on it; `pti.export` dispatches to them.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import io
import json
import logging
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pti.engine.config import EXPORT_PRECISIONS
from pti.engine.identity import versions
from pti.errors import ExportError
from pti.fsutil import sha256_file, write_json
from pti.kernels.precision import flags, precision_scope

CONTRACT = "contract.json"
CONTRACT_FORMAT = "pti-export"
CONTRACT_VERSION = 1
INPUT, OUTPUT = "ws", "images"
DEFAULT_BATCH = (1, 8, 16)  # min, opt, max of the batch profile
POOL = 4  # the sample checksum: the output average-pooled to 4 x 4 per channel
# Largest difference from PyTorch fp32 an export may show, in image units (the image spans [-1, 1], range 2):
# fp32 1e-4 (float32 rounding through about 20 layers, measured ~1e-5); fp16 1e-2 of the range.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


class ExportSynthesis(nn.Module):
    """The synthesis network as exported: `ws -> images`, constant noise, non-fused modulated convolution,
    reference ops. It holds the network under `synthesis`, so every weight is named as in the identity file.

    fp16: the weights are stored in float16 and every block runs in float16 (the generator's own fp16 path,
    with its overflow guard and `conv_clamp`); the style and demodulation arithmetic, the skip image, the
    input and the output stay float32.
    """

    def __init__(self, G, precision: str = "fp32"):
        super().__init__()
        if precision not in EXPORT_PRECISIONS:
            raise ExportError(f"unknown precision {precision!r}; choose from {', '.join(EXPORT_PRECISIONS)}")
        self.precision = precision
        self.synthesis = copy.deepcopy(G.synthesis).eval().requires_grad_(False)
        if precision == "fp16":
            for res in self.synthesis.block_resolutions:
                getattr(self.synthesis, f"b{res}").use_fp16 = True
            self.synthesis.half()
        self.eval()

    def forward(self, ws: torch.Tensor) -> torch.Tensor:
        return self.synthesis(
            ws, noise_mode="const", force_fp32=self.precision == "fp32", fused_modconv=False, impl="ref"
        )


def graph_weights(G, contract: dict) -> dict[str, torch.Tensor]:
    """`G`'s tuned weights under the contract's graph names, in the graph's dtype; ExportError when they do not fit."""
    params = {f"synthesis.{n}": p for n, p in G.synthesis.named_parameters()}
    out = {}
    for entry in contract["weights"]:
        p = params.get(entry["tensor"])
        if p is None:
            raise ExportError(f"the export expects weight {entry['tensor']!r}, which this generator does not have")
        if list(p.shape) != list(entry["shape"]):
            raise ExportError(f"weight {entry['tensor']!r} is {list(p.shape)} here, {entry['shape']} in the export")
        out[entry["name"]] = p.detach().to("cpu", getattr(torch, entry["dtype"])).contiguous()
    return out


def sample_input(G, ident=None) -> torch.Tensor:
    """[1, num_ws, w_dim]: the identity's pivot, else the base generator's average w."""
    if ident is not None:
        return ident.pivot.float().reshape(1, *ident.pivot.shape).clone()
    return G.mapping.w_avg.float().reshape(1, 1, -1).repeat(1, G.num_ws, 1).cpu()


def checksum(images: torch.Tensor) -> list[float]:
    """The first image average-pooled to POOL x POOL per channel: a checksum that tolerates float rounding."""
    x = images[:1].float()
    return torch.nn.functional.adaptive_avg_pool2d(x, POOL).reshape(-1).tolist()


def encode_array(t: torch.Tensor) -> dict:
    a = t.detach().cpu().float().contiguous().numpy()
    return {"dtype": "float32", "shape": list(a.shape), "base64": base64.b64encode(a.tobytes()).decode()}


def decode_array(d: dict) -> torch.Tensor:
    a = np.frombuffer(base64.b64decode(d["base64"]), dtype=d["dtype"]).reshape(d["shape"])
    return torch.from_numpy(a.copy())


RUNTIMES = ("onnx", "onnxruntime", "tensorrt")  # the optional runtimes an export's `built_with` records


def environment(device: torch.device | None = None, packages: tuple[str, ...] = RUNTIMES) -> dict[str, Any]:
    """Versions (pti, torch, numpy, python, and those of `packages` that are installed), the machine and the
    device: what an export is bound to, and what a benchmark ran on."""
    env: dict[str, Any] = {**versions(), "machine": platform.machine()}
    for mod in packages:
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001  absent or broken: not part of this environment
            pass
    env["device"] = describe_device(device)
    return env


def describe_device(device: torch.device | None) -> str:
    """'cpu', or 'cuda: <GPU name> sm_<major><minor>' (what compiled code is bound to)."""
    if device is None or torch.device(device).type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"cuda: {torch.cuda.get_device_name(device)} sm_{major}{minor}"


@dataclass
class Source:
    """What is exported: the generator to trace (base, or base + identity), and where it came from."""

    generator: Any  # pti.engine.generator.Generator, identity applied when there is one
    base_hash: str
    base_hint: str
    identity: Any = None  # pti.engine.identity.Identity or None
    identity_path: str | None = None


def make_contract(
    kind: str,
    precision: str,
    src: Source,
    files: dict[str, str],
    batch: tuple[int, int, int],
    device: torch.device | None = None,
    **extra,
) -> dict[str, Any]:
    """The contract of an export of `src` (described in `pti.export`); `extra` adds kind-specific fields."""
    G = src.generator
    dtype = "float16" if precision == "fp16" else "float32"
    bmin, bopt, bmax = batch
    sample = sample_input(G, src.identity)
    return {
        "format": CONTRACT_FORMAT,
        "version": CONTRACT_VERSION,
        "kind": kind,
        "precision": precision,
        "files": files,
        "input": {"name": INPUT, "dtype": "float32", "shape": ["batch", G.num_ws, G.w_dim]},
        "output": {
            "name": OUTPUT,
            "dtype": "float32",
            "shape": ["batch", G.img_channels, G.img_resolution, G.img_resolution],
        },
        "dynamic_axes": {INPUT: {"0": "batch"}, OUTPUT: {"0": "batch"}},
        "batch": {"min": bmin, "opt": bopt, "max": bmax},
        "base_hash": src.base_hash,
        "base_hint": src.base_hint,
        "identity": src.identity_path,
        "generator_config": G.init_kwargs,
        "weights": [
            {"tensor": n, "name": n, "dtype": dtype, "shape": list(p.shape)}
            for n, p in ((f"synthesis.{k}", v) for k, v in G.synthesis.named_parameters())
        ],
        "sample": {
            "input": encode_array(sample),
            "pooled_output": None,
            "pool": POOL,
            "tolerance": TOLERANCE[precision],
        },
        "built_with": environment(device),
        **extra,
    }


def load_contract(folder: str | Path, kind: str | None = None) -> tuple[Path, dict]:
    """(folder, contract) of an export folder, or its `contract.json`; ExportError when it is not one."""
    folder = Path(folder)
    if folder.is_file():  # contract.json, model.onnx, model.pt2, model.engine: the contract sits beside it
        folder = folder.parent
    path = folder / CONTRACT
    if not path.is_file():
        raise ExportError(f"{folder}: no {CONTRACT} here; make an export with `pti export ... -o {folder}`")
    try:
        contract = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: unreadable contract ({e})") from None
    if not isinstance(contract, dict) or contract.get("format") != CONTRACT_FORMAT:
        raise ExportError(f"{path}: not a pti export contract")
    if int(contract.get("version", 0)) > CONTRACT_VERSION:
        raise ExportError(f"{path}: contract v{contract['version']} is newer than this pti; upgrade pti")
    if kind is not None and contract.get("kind") != kind:
        raise ExportError(f"{folder} holds a {contract.get('kind')} export, not {kind}")
    for name in contract.get("files", {}).values():
        if not (folder / name).is_file():
            raise ExportError(f"{folder}: the export is incomplete ({name} is missing)")
    sums = contract.get("checksums") or {}
    if not (
        isinstance(sums, dict)
        and all(
            isinstance(w, dict) and isinstance(w.get("bytes"), int) and (folder / n).is_file() for n, w in sums.items()
        )
    ):
        raise ExportError(f"{path}: unreadable contract (its file checksums are malformed); export again")
    for name, want in sums.items():  # cheap: sizes only; the hashes are verify_files'
        size = (folder / name).stat().st_size
        if size != want["bytes"]:
            raise ExportError(
                f"{folder / name} is {size:,} bytes, but the export's contract says {want['bytes']:,}: "
                "the file is truncated or was replaced; export again"
            )
    return folder, contract


def write_contract(contract: dict, folder: Path) -> Path:
    """Record the size and sha256 of every file the contract describes (`checksums`), then write it into `folder`."""
    contract["checksums"] = {
        name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
        for name in contract["files"].values()
    }
    return write_json(contract, folder / CONTRACT)


def verify_files(folder: Path, contract: dict) -> bool:
    """Hash every file the contract describes against its `checksums`; ExportError on a mismatch. False when the
    contract predates checksums (nothing could be checked)."""
    sums = contract.get("checksums")
    if not sums:
        return False
    for name, want in sums.items():
        if sha256_file(folder / name) != want.get("sha256"):
            raise ExportError(
                f"{folder / name} does not match the sha256 its export's contract records: the file changed "
                "after the export was written; export again"
            )
    return True


def check_base(contract: dict, base_hash: str, what: str = "this identity") -> None:
    """Refuse weights of another base generator: the graph's other weights and shapes belong to its base."""
    if contract["base_hash"] != base_hash:
        raise ExportError(
            f"the export was made from base generator {contract['base_hash'][:16]} "
            f"({contract.get('base_hint') or '?'}); "
            f"{what} belongs to {base_hash[:16]}: export that base, or pass the matching --engine"
        )


def check_batch(contract: dict, n: int) -> None:
    b = contract["batch"]
    if not b["min"] <= n <= b["max"]:
        raise ExportError(
            f"batch {n} is outside the export's batch profile {b['min']}-{b['max']}; "
            f"use --batch {b['max']} or less, or export with --max-batch {n}"
        )


def check_sample(contract: dict, images: torch.Tensor, where: str) -> float:
    """Compare a run of the sample input with the recorded checksum; ExportError past the tolerance."""
    expected = contract["sample"].get("pooled_output")
    if expected is None:
        return 0.0
    diff = float((torch.tensor(checksum(images)) - torch.tensor(expected)).abs().max())
    if diff > contract["sample"]["tolerance"]:
        raise ExportError(
            f"{where} does not reproduce its sample output (difference {diff:.3g} > "
            f"{contract['sample']['tolerance']}); "
            "it was built for another runtime or is damaged: export again"
        )
    return diff


def torch_reference(G, ws: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """What every export is checked against: PyTorch fp32 (TF32 off in cuBLAS and cuDNN, whatever the caller set:
    CUDA's cuDNN default would round every convolution to TF32, far past the fp32 tolerance) with constant
    noise and the reference ops, on CPU as float32; and the precision flags it ran under."""
    device = G.mapping.w_avg.device
    with torch.no_grad(), precision_scope("fp32", device):
        images = G.synthesis(ws.to(device), noise_mode="const", force_fp32=True, impl="ref").float().cpu()
        return images, flags()


def verify_export(contract: dict, G, runner, runtime: str, what: str) -> None:
    """Record the sample's checksum from PyTorch, run the new export (`runner(ws) -> images`) on the sample,
    and store the largest difference and the flags both ran under in `contract["verified"]`; ExportError
    (nothing is written) past the tolerance. Both run in fp32's scope (TF32 off): the tolerance assumes it."""
    sample = decode_array(contract["sample"]["input"])
    reference, reference_flags = torch_reference(G, sample)
    contract["sample"]["pooled_output"] = checksum(reference)
    with precision_scope("fp32", G.mapping.w_avg.device):
        diff = float((runner(sample) - reference).abs().max())
        runtime_flags = flags()
    if diff > contract["sample"]["tolerance"]:
        raise ExportError(
            f"the {what} differs from PyTorch by {diff:.3g} on the sample (tolerance "
            f"{contract['sample']['tolerance']}); nothing was written"
        )
    contract["verified"] = {
        "runtime": runtime,
        "max_abs_diff_vs_torch_fp32": diff,
        "reference": {"precision": "fp32", "flags": reference_flags},  # what the PyTorch side ran under
        "flags": runtime_flags,  # the export's run: AOTInductor's cuDNN calls read them; ORT and TensorRT do not
    }


@contextlib.contextmanager
def quiet(logger: str = "torch"):
    """Silence the exporters and compilers (progress prints, warnings, log lines): pti prints its own summary."""
    log = logging.getLogger(logger)
    level = log.level
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            log.setLevel(logging.ERROR)
            yield
    finally:
        log.setLevel(level)
