"""AOTInductor: the synthesis network compiled ahead of time into a `.pt2` package, weights kept outside.

`export_aoti(src, out)` traces the export module (`torch.export`, dynamic batch over the profile), compiles
it with AOTInductor for the device (C++ on the CPU, Triton on CUDA) with the weights left out of the
compiled library (`aot_inductor.package_constants_in_so=False`) and every tensor kept a named constant
(`always_keep_tensor_constants`, or small ones such as `noise_strength` are inlined and cannot be swapped).
It writes `model.pt2`, `weights.safetensors` (every constant by its name: the person's tuned weights plus
the filters and noise) and `contract.json`, through a staging folder.

`AotiBackend(folder, G)` loads the package once per process and swaps `G`'s weights in with the loader's
`load_constants` (no recompile). A package is native code for one torch build and device: loading one
made by another torch version or for another device is refused with one line.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pti.errors import ExportError, first_line
from pti.export.contract import (
    CONTRACT,
    DEFAULT_BATCH,
    ExportSynthesis,
    Source,
    check_base,
    check_batch,
    describe_device,
    graph_weights,
    load_contract,
    make_contract,
    quiet,
    sample_input,
    verify_export,
    write_contract,
)
from pti.fsutil import staged_folder

MODEL = "model.pt2"
WEIGHTS = "weights.safetensors"
INDUCTOR_CONFIG = {"aot_inductor.package_constants_in_so": False, "always_keep_tensor_constants": True}


def export_aoti(
    src: Source,
    out: str | Path,
    *,
    precision: str = "fp32",
    batch: tuple[int, int, int] = DEFAULT_BATCH,
    device: str | torch.device = "cpu",
) -> Path:
    """Compile `src`'s synthesis network into an AOTInductor package in the folder `out`; return the contract's path."""
    device = torch.device(device)
    module = ExportSynthesis(src.generator, precision).to(device)
    example = sample_input(src.generator, src.identity).repeat(2, 1, 1).to(device)
    out = Path(out)
    with staged_folder(out, last=[CONTRACT]) as stage:
        _compile(module, example, stage / MODEL, batch)
        constants = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(constants, str(stage / WEIGHTS))
        contract = make_contract("aoti", precision, src, {"package": MODEL, "weights": WEIGHTS}, batch, device)
        verify_export(
            contract,
            src.generator,
            AotiBackend(stage, contract=contract, device=device).render,
            f"AOTInductor (torch {torch.__version__}, {describe_device(device)})",
            "compiled package",
        )
        write_contract(contract, stage)
    return out / CONTRACT


def _compile(module, example, path: Path, batch) -> None:
    dim = torch.export.Dim("batch", min=1, max=max(batch[2], 2))
    try:
        with quiet("torch"):
            program = torch.export.export(module, (example,), dynamic_shapes={"ws": {0: dim}})
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(path), inductor_configs=dict(INDUCTOR_CONFIG)
            )
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001  compiler failures (no C++ compiler, ...): one line, --debug for more
        raise ExportError(f"AOTInductor could not compile the generator: {first_line(e)}") from e


_PACKAGES: dict[tuple, object] = {}  # loaded packages, one per (path, mtime, device) in this process
_OWNER: dict[tuple, int] = {}  # which backend's weights a cached package holds now


class AotiBackend:
    """A loaded AOTInductor package with `G`'s tuned weights (or the package's own weights file) swapped in."""

    name = "aoti"

    def __init__(
        self,
        folder: str | Path,
        G=None,
        *,
        base_hash: str | None = None,
        contract: dict | None = None,
        device: str | torch.device | None = None,
    ):
        if contract is None:
            folder, contract = load_contract(folder, "aoti")
        self.folder, self.contract = Path(folder), contract
        built = contract["built_with"]
        if built.get("torch") != torch.__version__:
            raise ExportError(
                f"{self.folder}: the package was compiled by torch {built.get('torch')}, this is torch "
                f"{torch.__version__}; export it again here"
            )
        self.device = (
            torch.device(device)
            if device is not None
            else (torch.device("cuda") if built["device"] != "cpu" else torch.device("cpu"))
        )
        if describe_device(self.device) != built["device"]:
            raise ExportError(
                f"{self.folder}: the package was compiled for {built['device']}, not {describe_device(self.device)}; "
                "export it again for this device"
            )
        if base_hash is not None:
            check_base(contract, base_hash)
        try:
            constants = load_file(str(self.folder / contract["files"]["weights"]))
        except Exception as e:  # noqa: BLE001
            raise ExportError(
                f"{self.folder / contract['files']['weights']}: unreadable weights ({type(e).__name__})"
            ) from None
        if G is not None:
            constants.update(graph_weights(G, contract))
        self.constants = {k: v.to(self.device) for k, v in constants.items()}
        path = self.folder / contract["files"]["package"]
        self.key = (str(path.resolve()), path.stat().st_mtime_ns, str(self.device))
        if self.key not in _PACKAGES:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _PACKAGES[self.key] = torch._inductor.aoti_load_package(str(path))
            except Exception as e:  # noqa: BLE001
                raise ExportError(f"{path}: cannot load the package ({first_line(e, 200)})") from None
        self.model = _PACKAGES[self.key]
        need = set(self.model.get_constant_fqns())
        lacking = sorted(need - set(self.constants))
        if lacking:
            raise ExportError(
                f"{self.folder}: no weights for {len(lacking)} of the package's constants (e.g. {lacking[0]})"
            )
        self.constants = {k: self.constants[k] for k in need}
        _OWNER.pop(self.key, None)
        self._swap()

    def _swap(self) -> None:
        if _OWNER.get(self.key) != id(self):
            self.model.load_constants(self.constants, check_full_update=True)
            _OWNER[self.key] = id(self)

    @torch.no_grad()
    def render(self, ws: torch.Tensor) -> torch.Tensor:
        check_batch(self.contract, ws.shape[0])
        self._swap()
        return self.model(ws.detach().float().to(self.device).contiguous()).float().cpu()
