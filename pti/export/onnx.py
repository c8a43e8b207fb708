"""ONNX export of the synthesis network, and ONNX Runtime as a render backend with per-identity weights.

`export_onnx(src, out)` writes `model.onnx` (+ `model.onnx.data` when the weights pass 2 GB or on
request) and `contract.json` through a staging folder, so an error or Ctrl-C leaves nothing half-written.
The graph comes from `torch.onnx.export(dynamo=True)` without its graph optimizer, which would fold
`weight * gain` into anonymous constants; ONNX Runtime folds those itself at load, after it has taken the
session's per-identity initializers. Every tuned weight is an initializer named as in the identity file;
the export checks that, the default domain only, opset >= 17, `onnx.checker`, and the runtime's output on
the sample input against PyTorch.

`OnnxBackend(folder, G)` runs the graph with `G`'s tuned weights given to the session by name
(`SessionOptions.add_initializer`), the identity swap without a rebuild that TensorRT's refit also uses.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pti.errors import ExportError, first_line
from pti.export.contract import (
    CONTRACT,
    DEFAULT_BATCH,
    INPUT,
    OUTPUT,
    ExportSynthesis,
    Source,
    check_base,
    check_batch,
    graph_weights,
    load_contract,
    make_contract,
    quiet,
    sample_input,
    verify_export,
    write_contract,
)
from pti.fsutil import staged_folder

MODEL = "model.onnx"
OPSET = 18
EXTERNAL_OVER = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB limit, less room for the graph itself


def _need(module: str, extra: str = "export"):
    try:
        return __import__(module)
    except ImportError:
        raise ExportError(f"this needs {module}: pip install 'pti[{extra}]'") from None


def export_onnx(
    src: Source,
    out: str | Path,
    *,
    precision: str = "fp32",
    batch: tuple[int, int, int] = DEFAULT_BATCH,
    opset: int = OPSET,
    external_data: bool | None = None,
) -> Path:
    """Write `src`'s synthesis network as ONNX into the folder `out`; return the contract's path."""
    onnx = _need("onnx")
    if opset < 17:
        raise ExportError(f"opset {opset} is too old; the export needs opset 17 or newer")
    module = ExportSynthesis(src.generator, precision).cpu()
    nbytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    external = nbytes > EXTERNAL_OVER if external_data is None else external_data
    example = sample_input(src.generator, src.identity).repeat(2, 1, 1)
    out = Path(out)
    with staged_folder(out, last=[CONTRACT]) as stage:
        _torch_export(module, example, stage / MODEL, opset, external, batch)
        _make_overridable(onnx, stage / MODEL, [n for n, _ in module.named_parameters()])
        _check_graph(onnx, stage / MODEL, module, opset)
        files = {"graph": MODEL, **({"external_data": MODEL + ".data"} if external else {})}
        contract = make_contract("onnx", precision, src, files, batch, opset=opset, external_data=external)
        verify_export(
            contract,
            src.generator,
            OnnxBackend(stage, contract=contract).render,
            f"onnxruntime {_need('onnxruntime').__version__} CPU",
            "exported graph",
        )
        write_contract(contract, stage)
    return out / CONTRACT


def _torch_export(module, example, path: Path, opset: int, external: bool, batch) -> None:
    dim = torch.export.Dim("batch", min=1, max=max(batch[2], 2))
    try:
        with quiet("torch.onnx"):  # "torchvision is not installed. Skipping ..." and the like
            torch.onnx.export(
                module,
                (example,),
                str(path),
                dynamo=True,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_shapes={"ws": {0: dim}},
                opset_version=opset,
                optimize=False,
                external_data=external,
                verbose=False,
            )
    except (KeyboardInterrupt, ExportError):
        raise
    except ImportError as e:
        raise ExportError(f"the ONNX exporter needs {e.name or 'onnxscript'}: pip install 'pti[export]'") from None
    except Exception as e:  # noqa: BLE001  the exporter's failures are many and long; one line, --debug for more
        raise ExportError(f"torch.onnx.export failed: {first_line(e)}") from e


def _make_overridable(onnx, path: Path, names: list[str]) -> None:
    """List the tuned initializers as graph inputs too: ONNX's overridable initializers. A runtime must not
    fold them into constants at load (ONNX Runtime does fold plain initializers, before it applies the
    session's `add_initializer` values, so a swap would be lost), and a caller may feed them per run."""
    model = onnx.load(str(path), load_external_data=False)  # external data stays where it is, by reference
    inits = {i.name: i for i in model.graph.initializer}
    present = {i.name for i in model.graph.input}
    for name in names:
        if name in inits and name not in present:
            t = inits[name]
            model.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    onnx.save(model, str(path))


def _check_graph(onnx, path: Path, module, opset: int) -> None:
    """The promises of the contract, checked on the file: named weights, default domain, opset, checker."""
    onnx.checker.check_model(str(path))  # by path: works past 2 GB with external data
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    missing = [n for n, _ in module.named_parameters() if n not in inits]
    if missing:
        raise ExportError(
            f"the exporter folded {len(missing)} tuned weights into anonymous constants "
            f"(for example {missing[0]}); identities could not be swapped in"
        )
    inputs = {i.name for i in model.graph.input}
    fixed = [n for n, _ in module.named_parameters() if n not in inputs]
    if fixed:
        raise ExportError(
            f"{len(fixed)} tuned weights (for example {fixed[0]}) are not overridable; a runtime could fold them"
        )
    domains = {n.domain for n in model.graph.node} - {"", "ai.onnx"}
    if domains:
        raise ExportError(f"the graph uses ops outside the default ONNX domain: {sorted(domains)}")
    got = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if got < 17 or got != opset:
        raise ExportError(f"the graph has opset {got}, not {opset}")


# ----------------------------------------------------------------------------- runtime

_MODELS: dict[tuple, bytes] = {}  # exported graphs read once per process (path, mtime): sessions are per identity


def providers() -> list[str]:
    """ONNX Runtime providers to use: TensorRT, then CUDA, when this build has them; always the CPU last."""
    ort = _need("onnxruntime")
    have = ort.get_available_providers()
    return [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in have] + ["CPUExecutionProvider"]


class OnnxBackend:
    """ONNX Runtime on an exported graph. `G` (a tuned generator) supplies the weights by name; without it
    the graph's own initializers run (the person or base it was exported from)."""

    name = "onnx"

    def __init__(
        self,
        folder: str | Path,
        G=None,
        *,
        base_hash: str | None = None,
        contract: dict | None = None,
        provider_list: list[str] | None = None,
        threads: int | None = None,
    ):
        ort = _need("onnxruntime")
        if contract is None:
            folder, contract = load_contract(folder, "onnx")
        self.folder, self.contract = Path(folder), contract
        if base_hash is not None:
            check_base(contract, base_hash)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self._keep = []  # OrtValues must outlive the session
        if G is not None:
            for name, t in graph_weights(G, contract).items():
                value = ort.OrtValue.ortvalue_from_numpy(t.numpy())
                self._keep.append(value)
                options.add_initializer(name, value)
        path = self.folder / contract["files"]["graph"]
        try:
            if contract.get("external_data"):  # the data file is found beside the graph by its recorded name
                self.session = ort.InferenceSession(str(path), options, providers=provider_list or providers())
            else:
                key = (str(path.resolve()), path.stat().st_mtime_ns)
                if key not in _MODELS:
                    _MODELS.clear()
                    _MODELS[key] = path.read_bytes()
                self.session = ort.InferenceSession(_MODELS[key], options, providers=provider_list or providers())
        except Exception as e:  # noqa: BLE001  ORT raises its own types; one line
            raise ExportError(f"{path}: ONNX Runtime cannot load it ({first_line(e, 200)})") from None
        self.provider = self.session.get_providers()[0]

    def render(self, ws: torch.Tensor) -> torch.Tensor:
        check_batch(self.contract, ws.shape[0])
        out = self.session.run([OUTPUT], {INPUT: ws.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out).float()
