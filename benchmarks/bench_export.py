"""Render ms per image through each backend: torch eager vs ONNX Runtime vs AOTInductor
(vs TensorRT, CUDA graphs on a GPU).

    python -m benchmarks.bench_export [--repeats 7] [--configs tiny,paper256] [--batches 1,8] [--device auto]

Every backend renders the same ws with the same weights; they are timed round-robin within one run (one
call of each per round, `--repeats` rounds after a warm-up), so a slow moment of the machine hits all of
them alike. Reported: median ms per image, min and max, and the ratio of each backend's median to torch
eager's from the same run (< 1 is faster). Exports are made into a temporary folder first; their time
(export + compile) is reported too. Each backend is also checked against torch on the timed input.

Generators: the built-in tiny one (64 px) and "paper256" (256 px config-f, random weights), as in
bench_render. On the CPU all backends get the same thread count (pti's policy). On a GPU it adds torch
under a CUDA graph and TensorRT (fp16) when `tensorrt` imports. Writes benchmarks/results/export_<device>.json.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_render import build, render_args
from pti.engine.checkpoint import generator_hash
from pti.engine.device import apply_cpu_threads, resolve_device
from pti.export import Source
from pti.rendering import TorchBackend


class CudaGraphTorch:
    """torch eager's forward captured once per batch size as a CUDA graph and replayed."""

    name = "torch+cudagraph"

    def __init__(self, G):
        self.G, self.graphs = G, {}

    @torch.no_grad()
    def render(self, ws):
        n = ws.shape[0]
        if n not in self.graphs:
            x = ws.detach().cuda().clone()
            s = torch.cuda.Stream()
            with torch.cuda.stream(s):
                for _ in range(2):
                    self.G.synthesis(x, noise_mode="const", force_fp32=True)
                s.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, stream=s):
                    y = self.G.synthesis(x, noise_mode="const", force_fp32=True)
            self.graphs[n] = (g, x, y)
        g, x, y = self.graphs[n]
        x.copy_(ws)
        g.replay()
        return y.float().cpu()


def backends(G, dev, threads, batch_max, tmp: Path):
    """(name, backend, seconds to export and load) for every backend this machine has."""
    src = Source(G, generator_hash(G), "bench")
    out = [("torch", TorchBackend(G, dev, batch=batch_max), 0.0)]
    if dev.type == "cuda":
        out.append(("torch+cudagraph", CudaGraphTorch(G), 0.0))
    from pti.export import export
    from pti.export.onnx import OnnxBackend

    t0 = time.perf_counter()
    export("onnx", src, tmp / "onnx", batch=(1, batch_max, batch_max))
    out.append(
        (
            "onnxruntime",
            OnnxBackend(tmp / "onnx", threads=threads if dev.type == "cpu" else None),
            time.perf_counter() - t0,
        )
    )
    from pti.export.aoti import AotiBackend

    t0 = time.perf_counter()
    export("aoti", src, tmp / "aoti", batch=(1, batch_max, batch_max), device=dev)
    out.append(("aoti", AotiBackend(tmp / "aoti", device=dev), time.perf_counter() - t0))
    if dev.type == "cuda":
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            print("tensorrt is not installed: no TensorRT row")
        else:
            from pti.export.tensorrt import TensorRTBackend

            t0 = time.perf_counter()
            export("tensorrt", src, tmp / "trt", batch=(1, batch_max, batch_max), precision="fp16")
            out.append(("tensorrt-fp16", TensorRTBackend(tmp / "trt"), time.perf_counter() - t0))
            out.append(("tensorrt-fp16+cudagraph", TensorRTBackend(tmp / "trt", cuda_graph=True), 0.0))
    return out


def main() -> None:
    args = render_args(__doc__)
    dev = resolve_device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for name in args.configs.split(","):
        G = build(name).to(dev)
        threads = apply_cpu_threads(G, dev, "auto")
        with tempfile.TemporaryDirectory() as tmp:
            runners = backends(G, dev, threads, max(batches), Path(tmp))
            for batch in batches:
                with torch.no_grad():
                    ws = G.mapping(
                        torch.randn([batch, G.z_dim], generator=torch.Generator().manual_seed(0)).to(dev),
                        truncation_psi=0.7,
                    ).cpu()
                    want = G.synthesis(ws.to(dev), noise_mode="const", force_fp32=True).float().cpu()
                times = {n: [] for n, _, _ in runners}
                diffs = {n: float((b.render(ws) - want).abs().max()) for n, b, _ in runners}  # warm-up and check
                for _ in range(args.repeats):
                    for n, b, _ in runners:
                        if dev.type == "cuda":
                            torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        b.render(ws)
                        if dev.type == "cuda":
                            torch.cuda.synchronize()
                        times[n].append(1000 * (time.perf_counter() - t0) / batch)
                base = statistics.median(times["torch"])
                for n, _, setup in runners:
                    med = statistics.median(times[n])
                    row = dict(
                        config=name,
                        resolution=G.img_resolution,
                        batch=batch,
                        backend=n,
                        ms_per_image_median=round(med, 3),
                        ms_min=round(min(times[n]), 3),
                        ms_max=round(max(times[n]), 3),
                        ratio_to_torch=round(med / base, 3),
                        max_abs_diff_vs_torch=diffs[n],
                        export_seconds=round(setup, 1),
                        threads=threads if dev.type == "cpu" else None,
                    )
                    rows.append(row)
                    print(
                        f"{name:9s} batch {batch:2d} {n:24s} {med:9.2f} ms/image  x{row['ratio_to_torch']:.2f} of torch"
                        f"  (diff {diffs[n]:.1e}; export {setup:.0f} s)",
                        flush=True,
                    )
    result = {
        "what": (
            "ms per rendered image by backend, same ws and weights, timed round-robin in one run; ratio = median / "
            "torch eager's median"
        ),
        "device": str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})",
        "machine": platform.machine(),
        "precision": "fp32 (tensorrt rows: fp16)",
        "implementation": (
            "torch: reference PyTorch ops (fused modulated conv at inference); onnx/aoti: the export graph "
            "(non-fused modulated conv)"
        ),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "repeats": args.repeats,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    try:
        import onnxruntime

        result["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    out = Path(__file__).parent / "results" / f"export_{dev.type}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
