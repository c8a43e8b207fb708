"""TensorRT: an engine built from the ONNX export, refit per identity by initializer name, run on torch CUDA tensors.

Written against TensorRT 10's Python API (`tensorrt`); nothing here is importable without it, and no
machine this project runs CI on can install it, so its tests skip with that reason. Everything it consumes
is tested through ONNX Runtime: the graph (`pti.export.onnx`) and the weight names (the contract's
`weights`, which are the ONNX initializer names and the identity file's names).

- `build_engine`: parse the fp32 ONNX graph, optimization profile over the batch (min / opt / max), fp16
  kernels allowed (`BuilderFlag.FP16`), refittable weights (`BuilderFlag.REFIT`), and a timing cache kept
  in the user cache so later builds skip kernel timing.
- `refit`: a built engine with another identity's weights (`trt.Refitter.set_named_weights`), no rebuild.
- `TensorRTBackend`: enqueue on torch's current CUDA stream with torch tensors as input and output (no
  pycuda), optionally replayed as a CUDA graph per batch size.
An engine is bound to the TensorRT version and GPU it was built on; any other is refused with one line.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from pti.errors import ExportError
from pti.export.contract import (
    CONTRACT,
    DEFAULT_BATCH,
    INPUT,
    OUTPUT,
    Source,
    check_base,
    check_batch,
    check_sample,
    checksum,
    decode_array,
    describe_device,
    graph_weights,
    load_contract,
    make_contract,
    torch_reference,
    write_contract,
)
from pti.export.onnx import export_onnx
from pti.fsutil import atomic_path, default_cache_dir, staged_folder

ENGINE = "model.engine"
WORKSPACE = 4 << 30


def _trt():
    try:
        import tensorrt as trt  # noqa: PLC0415  optional (TensorRT: NVIDIA's index, GPU machines only)
    except ImportError:
        raise ExportError(
            "TensorRT is not installed (pip install tensorrt, on a machine with an NVIDIA GPU and "
            "NVIDIA's package index); use --format onnx or aoti"
        ) from None
    if not torch.cuda.is_available():
        raise ExportError("TensorRT needs a CUDA GPU, and torch sees none")
    return trt


def _logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def timing_cache_path() -> Path:
    return default_cache_dir() / "tensorrt" / "timing.cache"


def export_tensorrt(
    src: Source, out: str | Path, *, batch: tuple[int, int, int] = DEFAULT_BATCH, fp16: bool = True
) -> Path:
    """Export ONNX (fp32) to a private folder, build a refittable engine from it,
    write `model.engine` and the contract."""
    trt = _trt()
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp, staged_folder(out, last=[CONTRACT]) as stage:
        _, onnx_contract = load_contract(export_onnx(src, tmp, precision="fp32", batch=batch).parent, "onnx")
        engine_bytes, cache_bytes = build_engine(trt, Path(tmp) / onnx_contract["files"]["graph"], batch, fp16)
        (stage / ENGINE).write_bytes(engine_bytes)
        cache = timing_cache_path()
        with atomic_path(cache) as t:
            t.write_bytes(cache_bytes)
        contract = make_contract(
            "tensorrt",
            "fp16" if fp16 else "fp32",
            src,
            {"engine": ENGINE},
            batch,
            torch.device("cuda"),
            onnx_opset=onnx_contract["opset"],
        )
        for entry in contract["weights"]:  # refit takes the fp32 values; TensorRT converts
            entry["dtype"] = "float32"
        contract["sample"]["pooled_output"] = onnx_contract["sample"]["pooled_output"]
        backend = TensorRTBackend(stage, contract=contract)
        contract["verified"] = {
            "runtime": f"TensorRT {trt.__version__}",
            "pooled_diff": check_sample(contract, backend.render(backend.sample()), "the engine"),
            "reference": onnx_contract["verified"]["reference"],  # the ONNX export's, whose checksum it reuses
        }
        write_contract(contract, stage)
    return out / CONTRACT


def build_engine(trt, onnx_path: Path, batch: tuple[int, int, int], fp16: bool) -> tuple[bytes, bytes]:
    """(serialized engine, serialized timing cache) from an ONNX file."""
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE)
    config.set_flag(trt.BuilderFlag.REFIT)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    shape = tuple(network.get_input(0).shape)[1:]
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT, (batch[0], *shape), (batch[1], *shape), (batch[2], *shape))
    config.add_optimization_profile(profile)
    cache_file = timing_cache_path()
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=True)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ExportError("TensorRT could not build the engine (see its log above)")
    return bytes(engine), bytes(config.get_timing_cache().serialize())


def refit(base: str | Path, src: Source, out: str | Path) -> Path:
    """A copy of the engine in `base` holding `src`'s weights (same base generator), without a rebuild."""
    folder, contract = load_contract(base, "tensorrt")
    check_base(contract, src.base_hash, "this identity")
    out = Path(out)
    with staged_folder(out, last=[CONTRACT]) as stage:
        shutil.copyfile(folder / contract["files"]["engine"], stage / ENGINE)
        new = dict(contract, identity=src.identity_path)
        backend = TensorRTBackend(stage, src.generator, contract=new)
        reference, reference_flags = torch_reference(src.generator, backend.sample())
        new["sample"] = dict(contract["sample"], pooled_output=checksum(reference))
        (stage / ENGINE).write_bytes(bytes(backend.engine.serialize()))
        new["verified"] = {
            "runtime": "TensorRT refit",
            "pooled_diff": check_sample(new, backend.render(backend.sample()), "the refit engine"),
            "reference": {"precision": "fp32", "flags": reference_flags},
        }
        write_contract(new, stage)
    return out / CONTRACT


_ENGINES: dict[tuple, object] = {}
_OWNER: dict[tuple, int] = {}


class TensorRTBackend:
    """A TensorRT engine from an export folder; `G` supplies a person's weights by refit."""

    name = "tensorrt"

    def __init__(
        self,
        folder: str | Path,
        G=None,
        *,
        base_hash: str | None = None,
        contract: dict | None = None,
        cuda_graph: bool = False,
    ):
        trt = _trt()
        if contract is None:
            folder, contract = load_contract(folder, "tensorrt")
        self.folder, self.contract, self.cuda_graph = Path(folder), contract, cuda_graph
        built = contract["built_with"]
        here = describe_device(torch.device("cuda"))
        if built.get("tensorrt") != trt.__version__ or built.get("device") != here:
            raise ExportError(
                f"{self.folder}: the engine was built with TensorRT {built.get('tensorrt')} on {built.get('device')}; "
                f"this is TensorRT {trt.__version__} on {here}: export it again here"
            )
        if base_hash is not None:
            check_base(contract, base_hash)
        path = self.folder / contract["files"]["engine"]
        self.key = (str(path.resolve()), path.stat().st_mtime_ns)
        if self.key not in _ENGINES:
            engine = trt.Runtime(_logger(trt)).deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise ExportError(f"{path}: TensorRT cannot load this engine")
            _ENGINES[self.key] = engine
        self.engine = _ENGINES[self.key]
        self.weights = graph_weights(G, contract) if G is not None else None
        self.context = self.engine.create_execution_context()
        self.graphs: dict[int, tuple] = {}
        _OWNER.pop(self.key, None)
        self._refit(trt)

    def _refit(self, trt=None) -> None:
        if self.weights is None or _OWNER.get(self.key) == id(self):
            return
        trt = trt or _trt()
        refitter = trt.Refitter(self.engine, _logger(trt))
        refittable = set(refitter.get_all_weights())
        keep = []  # the arrays must live until refit_cuda_engine returns
        for name, t in self.weights.items():
            if name not in refittable:
                raise ExportError(
                    f"{self.folder}: weight {name!r} is not refittable in this engine (built without REFIT?)"
                )
            arr = t.float().numpy()
            keep.append(arr)
            refitter.set_named_weights(name, trt.Weights(arr))
        missing = refitter.get_missing_weights()
        if missing or not refitter.refit_cuda_engine():
            raise ExportError(f"{self.folder}: TensorRT refit failed (missing weights: {list(missing)[:3]})")
        self.graphs.clear()
        _OWNER[self.key] = id(self)

    def sample(self) -> torch.Tensor:
        return decode_array(self.contract["sample"]["input"])

    @torch.no_grad()
    def render(self, ws: torch.Tensor) -> torch.Tensor:
        check_batch(self.contract, ws.shape[0])
        self._refit()
        n = ws.shape[0]
        shape = [n, *self.contract["output"]["shape"][1:]]
        if self.cuda_graph:
            if n not in self.graphs:
                self.graphs[n] = self._capture(n, shape)
            graph, x, y = self.graphs[n]
            x.copy_(ws.float())
            graph.replay()
            return y.float().cpu()
        x = ws.detach().float().cuda().contiguous()
        y = torch.empty(shape, device="cuda", dtype=torch.float32)
        self._enqueue(x, y)
        torch.cuda.current_stream().synchronize()
        return y.cpu()

    def _enqueue(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.context.set_input_shape(INPUT, tuple(x.shape))
        self.context.set_tensor_address(INPUT, x.data_ptr())
        self.context.set_tensor_address(OUTPUT, y.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise ExportError("TensorRT failed to run the engine")

    def _capture(self, n: int, shape: list[int]):
        x = torch.zeros([n, *self.contract["input"]["shape"][1:]], device="cuda")
        y = torch.empty(shape, device="cuda")
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            self._enqueue(x, y)  # one plain run first: TensorRT allocates lazily, which a graph cannot hold
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                self._enqueue(x, y)
        return graph, x, y
