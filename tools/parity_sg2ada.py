"""Side-by-side parity against a local checkout of NVIDIA's stylegan2-ada-pytorch, and its golden file.

Usage:
    python tools/parity_sg2ada.py CHECKOUT [--full]          # live side by side, this machine
    python tools/parity_sg2ada.py CHECKOUT --write-golden tests/data/sg2ada_golden.npz
    python tools/parity_sg2ada.py CHECKOUT --errors tests/data/sg2ada_golden.npz

Live mode builds NVIDIA's Generator and ours with the same kwargs, copies NVIDIA's state dict into
ours (strict), and reports max |diff| of mapping (with truncation) and synthesis (noise const, fp32
and the fp16 blocks as configured), plus gradients w.r.t. ws and every synthesis parameter. Both
run the same ops in the same order, so on one machine the differences are exactly 0.

The golden file (`tests/data/sg2ada_golden.npz`, read by `tests/test_generator.py`) makes that check
portable: float32 results differ between CPUs (SIMD width changes the order of the sums in every
matmul and convolution), so the test compares both implementations with a float64 truth instead of
with each other. Keys `format` (2) and `meta` (JSON: torch, numpy, Python, CPU, capability, threads,
checkout commit of the writer), then for each config in GOLDEN_CONFIGS (keys `<config>/...`):

    config                  JSON of the Generator kwargs
    state/<key>             every parameter and buffer (float32), NVIDIA's names; noise strengths,
                            biases and w_avg are made non-zero so every path shows in the output
    z                       [2, z_dim] float32 input of the mapping
    ws                      [2, num_ws, w_dim] float32 input of the synthesis (NVIDIA's fp32 mapping of z, psi 0.7)
    cotangent               [2, C, R, R] int8; the gradient check backpropagates sum(img * cotangent / 8)
    f64/ws, f64/ws_cutoff   float64 mapping of z: psi 0.7; psi 0.5 on the first 2 ws only
    f64/img                 float64 synthesis of ws, noise const (the truth of every image path)
    f64/grad_ws             float64 gradient of sum(img * cotangent / 8) w.r.t. ws (truth of both gradient paths)
    nvidia_error/<quantity> [rel_norm, rel_max] of NVIDIA's own float32 / fp16-block result against the
                            float64 truth, on the machine that wrote the file

with quantities ws, ws_cutoff, img_{fp32,fp16}_{fused,unfused} and grad_ws_{fp32,fp16} ("fp16" =
force_fp32=False, i.e. the config's fp16 resolutions in float16; gradients in training mode, which
picks the non-fused modulated conv), rel_norm = |x - ref|_2 / |ref|_2, rel_max = max|x - ref| / max|ref|.
About 1 MB in all.

The float64 truth is NVIDIA's own code run in float64: the module-level `torch.float32` of
`networks.py` (its casts of z, ws, activations and toRGB output) is redirected to float64 and every
parameter and buffer is upcast (the FIR filters stay float32, as `upfirdn2d` asserts; their taps k/64
are exact). Fused and non-fused modulated convolution compute the same function (checked, < 1e-13);
the fp16 path computes it too, except that its overflow guard rescales weights and styles before the
demodulation epsilon is added, a shift the writer measures (~1e-6 relative, guard in every block) and
checks to be far below one float16 rounding, so the fp16 path shares the truth. Our generator run in
float64 the same way gives identical results (0.0 here; the writer asserts < 1e-13). `--errors` prints
NVIDIA's errors on the current machine beside the stored ones: their ratio is the machine-to-machine
spread that K in the test covers.

How the current file was made: torch 2.13.0+cpu, numpy 2.4.6, Python 3.11.7, on an Intel Xeon
(AVX-512, ATEN_CPU_CAPABILITY unset = avx512), 2 threads, stylegan2-ada-pytorch d72cc7d; `meta` in the
file records the same; writing again on that machine and torch reproduces it array for array. To
regenerate (only when the configs or the format change; the test does not depend on the machine that
wrote it):

    git clone https://github.com/NVlabs/stylegan2-ada-pytorch /tmp/sg2ada
    .venv/bin/python tools/parity_sg2ada.py /tmp/sg2ada --write-golden tests/data/sg2ada_golden.npz

Nothing from the checkout is imported by `pti` itself; this script only runs both side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import json
import platform
import subprocess
import sys
import types

import numpy as np
import torch

FORMAT = 2
BATCH = 2
PSI, PSI_CUT, CUTOFF = 0.7, 0.5, 2
COTANGENT_DENOM = 8  # cotangent = int8 in [-8, 8] / 8: exact in every precision

GOLDEN_CONFIGS = {
    # fp32 everywhere, 8 mapping layers; 32 -> 16 channels at the last block.
    "fp32_32px": dict(
        z_dim=32,
        c_dim=0,
        w_dim=32,
        img_resolution=32,
        img_channels=3,
        mapping_kwargs=dict(num_layers=8),
        synthesis_kwargs=dict(channel_base=512, channel_max=32, num_fp16_res=0, conv_clamp=None),
    ),
    # 32 and 64 px blocks in fp16 (overflow guard on); 16 channels at 64 px. conv_clamp=2 clamps
    # 0.2-5 % of each conv layer's activations and up to 1 % of some toRGB outputs: exercised, not idle.
    "fp16_64px_clamp": dict(
        z_dim=32,
        c_dim=0,
        w_dim=32,
        img_resolution=64,
        img_channels=3,
        mapping_kwargs=dict(num_layers=2),
        synthesis_kwargs=dict(channel_base=1024, channel_max=32, num_fp16_res=2, conv_clamp=2),
    ),
}
QUANTITIES = (
    "ws",
    "ws_cutoff",
    "img_fp32_fused",
    "img_fp32_unfused",
    "img_fp16_fused",
    "img_fp16_unfused",
    "grad_ws_fp32",
    "grad_ws_fp16",
)
METRICS = ("rel_norm", "rel_max")


# ----------------------------------------------------------------------------- NVIDIA's code


def import_nvidia(checkout: str):
    """NVIDIA's `training.networks` from a checkout. `dnnlib.util` imports `requests` only to download
    files; when it is missing, an empty stand-in lets the networks import (nothing here downloads)."""
    sys.path.insert(0, str(checkout))
    try:
        importlib.import_module("requests")
    except ImportError:
        sys.modules["requests"] = types.ModuleType("requests")
    return importlib.import_module("training.networks")


class _Float64Torch(types.ModuleType):
    """`torch` whose float32 is float64, for modules that cast to float32 by name."""

    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


class _Float64GuardTorch(_Float64Torch):
    """... and whose float16 is float64 too: the fp16 overflow guard then runs, in float64, in every block."""

    float16 = torch.float64


@contextlib.contextmanager
def float64_casts(*modules, guard=False):
    """Within the block, `torch.float32` in these modules means float64 (and `torch.float16` too, if guard).

    Only float32 is redirected by default: NVIDIA's fp16 overflow guard (`if x.dtype == torch.float16`)
    rescales weights and styles before demodulation, which is exact except for the 1e-8 epsilon under
    the rsqrt, now added to a smaller sum: the guard changes the function by about 1e-7 relative. The
    fp32 path never runs it, so its float64 truth must not either.
    """
    saved = [m.torch for m in modules]
    try:
        for m in modules:
            m.torch = (_Float64GuardTorch if guard else _Float64Torch)("torch")
        yield
    finally:
        for m, t in zip(modules, saved):
            m.torch = t


def to_float64(G):
    """A float64 copy of a generator; FIR filters stay float32 (exact taps, asserted by NVIDIA's ops)."""
    G = copy.deepcopy(G)
    for name, t in list(G.named_parameters()) + list(G.named_buffers()):
        if not name.endswith("resample_filter"):
            t.data = t.data.to(torch.float64)
    return G


# ----------------------------------------------------------------------------- live side by side


def compare(nv_net, kwargs, batch=2, seed=0, fused=None, grads=True):
    from pti.engine.generator import Generator

    torch.manual_seed(seed)
    G_nv = nv_net.Generator(**kwargs).eval()
    G = Generator(**kwargs).eval()
    G.load_state_dict(G_nv.state_dict(), strict=True)
    G.impl = "ref"
    z = torch.randn([batch, G.z_dim])
    out = {}
    with torch.no_grad():
        G_nv.mapping.w_avg.copy_(torch.randn_like(G_nv.mapping.w_avg) * 0.1)
        G.mapping.w_avg.copy_(G_nv.mapping.w_avg)
        for psi, cutoff in ((1.0, None), (0.7, None), (0.5, 8)):
            a = G_nv.mapping(z, None, truncation_psi=psi, truncation_cutoff=cutoff)
            b = G.mapping(z, None, truncation_psi=psi, truncation_cutoff=cutoff)
            out[f"mapping psi={psi} cutoff={cutoff}"] = (a - b).abs().max().item()
        ws = G_nv.mapping(z, None, truncation_psi=0.7)
        for force_fp32 in (True, False):
            for fm in (True, False) if fused is None else (fused,):
                a = G_nv.synthesis(ws, noise_mode="const", force_fp32=force_fp32, fused_modconv=fm)
                b = G.synthesis(ws, noise_mode="const", force_fp32=force_fp32, fused_modconv=fm)
                out[f"synthesis fp32={force_fp32} fused={fm}"] = (a - b).abs().max().item()
            a = G_nv.synthesis(ws, noise_mode="none", force_fp32=force_fp32)
            b = G.synthesis(ws, noise_mode="none", force_fp32=force_fp32)
            out[f"synthesis none fp32={force_fp32}"] = (a - b).abs().max().item()
    if grads:
        G_nv.train(), G.train()
        ws1 = ws.clone().requires_grad_(True)
        ws2 = ws.clone().requires_grad_(True)
        img1 = G_nv.synthesis(ws1, noise_mode="const", force_fp32=True)
        img2 = G.synthesis(ws2, noise_mode="const", force_fp32=True)
        t = torch.randn_like(img1)
        (img1 * t).sum().backward()
        (img2 * t).sum().backward()
        out["grad ws"] = (ws1.grad - ws2.grad).abs().max().item()
        p_nv = dict(G_nv.synthesis.named_parameters())
        worst, missing = 0.0, []
        for name, p in G.synthesis.named_parameters():
            if p.grad is None:
                missing.append(name)
                continue
            rel = ((p.grad - p_nv[name].grad).abs().max() / (p_nv[name].grad.abs().max() + 1e-12)).item()
            worst = max(worst, rel)
        out["grad params max rel diff"] = worst
        out["params without grad"] = missing
    return out


# ----------------------------------------------------------------------------- golden file: shared recipe


def golden_outputs(G, inputs: dict, dtype=torch.float32, fp16=True) -> dict[str, torch.Tensor]:
    """Every golden quantity from generator G (ours or NVIDIA's: same call signature) on the stored inputs.

    fp16=False leaves out the force_fp32=False paths (for float64 runs, where only float32 is redirected).
    """
    z = torch.as_tensor(inputs["z"]).to(dtype)
    ws = torch.as_tensor(inputs["ws"]).to(dtype)
    t = torch.as_tensor(inputs["cotangent"]).to(dtype) / COTANGENT_DENOM
    precs = ("fp32", "fp16") if fp16 else ("fp32",)
    out = {}
    G.eval()
    with torch.no_grad():
        out["ws"] = G.mapping(z, None, truncation_psi=PSI)
        out["ws_cutoff"] = G.mapping(z, None, truncation_psi=PSI_CUT, truncation_cutoff=CUTOFF)
        for prec in precs:
            for fused in (True, False):
                out[f"img_{prec}_{'fused' if fused else 'unfused'}"] = G.synthesis(
                    ws, noise_mode="const", force_fp32=(prec == "fp32"), fused_modconv=fused
                )
    G.train()  # as in tuning: training mode picks the non-fused (shared-weight) modulated conv
    for prec in precs:
        w = ws.clone().requires_grad_(True)
        img = G.synthesis(w, noise_mode="const", force_fp32=(prec == "fp32"))
        (img * t).sum().backward()
        out[f"grad_ws_{prec}"] = w.grad
    G.eval()
    return out


def truth_key(quantity: str) -> str:
    """The float64 array a quantity is compared with."""
    if quantity.startswith("img_"):
        return "f64/img"
    if quantity.startswith("grad_ws_"):
        return "f64/grad_ws"
    return f"f64/{quantity}"


def precision(quantity: str, config: dict) -> str:
    """'fp16' when the quantity ran through float16 blocks, else 'fp32'."""
    return (
        "fp16"
        if quantity.endswith(("fp16_fused", "fp16_unfused", "_fp16"))
        and config["synthesis_kwargs"].get("num_fp16_res", 0) > 0
        else "fp32"
    )


def errors(x, ref) -> np.ndarray:
    """[rel_norm, rel_max] of x against ref, computed in float64."""
    x = np.asarray(x.detach() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    d = x - ref
    return np.array([np.linalg.norm(d) / np.linalg.norm(ref), np.abs(d).max() / np.abs(ref).max()])


def read_golden(path) -> dict[str, dict]:
    """{config name: {"config": kwargs, "state": {key: tensor}, "z", "ws", "cotangent", "f64/...": arrays,
    "nvidia_error": {quantity: [rel_norm, rel_max]}}} from a golden file."""
    data = np.load(path)
    if int(data["format"]) != FORMAT:
        raise ValueError(
            f"{path}: golden format {int(data['format'])}, expected {FORMAT}; "
            "regenerate it (see tools/parity_sg2ada.py)"
        )
    out: dict[str, dict] = {}
    for key in data.files:
        if "/" not in key:
            continue
        name, rest = key.split("/", 1)
        g = out.setdefault(name, {"state": {}, "nvidia_error": {}})
        if rest == "config":
            g["config"] = json.loads(str(data[key]))
        elif rest.startswith("state/"):
            g["state"][rest[len("state/") :]] = torch.from_numpy(data[key].copy())
        elif rest.startswith("nvidia_error/"):
            g["nvidia_error"][rest[len("nvidia_error/") :]] = data[key]
        else:
            g[rest] = data[key]
    return out


def golden_generator(golden: dict, name: str):
    """Our generator with a golden config's stored weights (strict load), reference ops."""
    from pti.engine.generator import Generator

    g = golden[name]
    G = Generator(**copy.deepcopy(g["config"]))
    G.load_state_dict(g["state"], strict=True)
    G.impl = "ref"
    return G.eval()


# ----------------------------------------------------------------------------- golden file: writing


def _golden_nvidia_generator(nv_net, kw, seed):
    """NVIDIA's generator with random weights; biases, noise strengths and w_avg made non-zero."""
    torch.manual_seed(seed)
    G = nv_net.Generator(**copy.deepcopy(kw)).eval()
    with torch.no_grad():
        for n, p in G.named_parameters():
            if n.endswith("noise_strength"):
                p.copy_(torch.randn(p.shape) * 0.1)
            elif n.endswith(".bias"):
                # Effective bias (stored * bias_gain) of about 0.1 around its init (1 for style affines).
                gain = 0.01 if n.startswith("mapping.") else 1.0
                p.copy_(p + torch.randn(p.shape) * 0.1 / gain)
        G.mapping.w_avg.copy_(torch.randn(G.w_dim) * 0.1)
    return G


def _meta(checkout) -> dict:
    try:
        commit = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(
        torch=torch.__version__,
        numpy=np.__version__,
        python=platform.python_version(),
        cpu=cpu,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        threads=torch.get_num_threads(),
        stylegan2_ada_pytorch=commit,
    )


def read_golden_arrays(arrays: dict) -> dict:
    """`read_golden` on arrays not yet written (used while writing)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    return read_golden(buf)


def write_golden(nv_net, path, checkout="."):
    """Weights, inputs, float64 truth and NVIDIA's own errors for the golden configs."""
    from pti.engine import generator as ours

    arrays: dict[str, np.ndarray] = {"format": np.array(FORMAT), "meta": np.array(json.dumps(_meta(checkout)))}
    for idx, (name, kw) in enumerate(GOLDEN_CONFIGS.items()):
        G_nv = _golden_nvidia_generator(nv_net, kw, seed=1234 + idx)
        gen = torch.Generator().manual_seed(7 + idx)
        z = torch.randn([BATCH, G_nv.z_dim], generator=gen)
        with torch.no_grad():
            ws = G_nv.mapping(z, None, truncation_psi=PSI)
        shape = [BATCH, G_nv.img_channels, G_nv.img_resolution, G_nv.img_resolution]
        cot = torch.randint(-COTANGENT_DENOM, COTANGENT_DENOM + 1, shape, generator=gen, dtype=torch.int8)
        inputs = dict(z=z.numpy(), ws=ws.numpy(), cotangent=cot.numpy())
        arrays[f"{name}/config"] = np.array(json.dumps(kw))
        for key, t in G_nv.state_dict().items():
            arrays[f"{name}/state/{key}"] = t.numpy()
        for key, a in inputs.items():
            arrays[f"{name}/{key}"] = a

        G64 = to_float64(G_nv)
        with float64_casts(nv_net):
            truth = golden_outputs(G64, inputs, dtype=torch.float64, fp16=False)
        assert errors(truth["img_fp32_unfused"], truth["img_fp32_fused"].numpy())[0] < 1e-13
        for q in ("ws", "ws_cutoff", "img_fp32_fused", "grad_ws_fp32"):
            arrays[f"{name}/{truth_key(q)}"] = truth[q].numpy()
        # The fp16 paths are compared with the same truth. They also run the overflow guard, whose only
        # effect in exact arithmetic is the moved demodulation epsilon: measure it (guard in every block,
        # an upper bound) and check it is far below a float16 rounding.
        with float64_casts(nv_net, guard=True):
            guarded = golden_outputs(G64, inputs, dtype=torch.float64, fp16=False)
        moved = max(errors(guarded[q], truth[q].numpy())[0] for q in ("img_fp32_fused", "grad_ws_fp32"))
        print(
            f"{name}: the fp16 guard moves the float64 result by rel_norm {moved:.1e} (float16 rounding {2**-11:.1e})"
        )
        assert moved < 2**-11 / 100, moved

        G = golden_generator(read_golden_arrays(arrays), name)
        with float64_casts(ours):
            ours64 = golden_outputs(to_float64(G), inputs, dtype=torch.float64, fp16=False)
        cross = max(errors(ours64[q], truth[q].numpy())[0] for q in ours64)
        print(f"{name}: our float64 run vs NVIDIA's float64 run, worst rel_norm {cross:.1e}")
        assert cross < 1e-13, cross

        nv = golden_outputs(G_nv, inputs)
        mine = golden_outputs(G, inputs)
        for q in QUANTITIES:
            ref = arrays[f"{name}/{truth_key(q)}"]
            e_nv, e_ours = errors(nv[q], ref), errors(mine[q], ref)
            arrays[f"{name}/nvidia_error/{q}"] = e_nv
            same = torch.equal(nv[q], mine[q])
            print(
                f"  {q:18s} {precision(q, kw)}  NVIDIA rel_norm {e_nv[0]:.3e} rel_max {e_nv[1]:.3e}"
                f"  | ours {e_ours[0]:.3e} {e_ours[1]:.3e}  {'identical' if same else 'DIFFERENT'}"
            )
    np.savez_compressed(path, **arrays)
    print(f"wrote {path}")


def print_errors(nv_net, path):
    """NVIDIA's errors against the stored float64 truth on this machine, beside the stored ones."""
    golden = read_golden(path)
    print(
        f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, threads "
        f"{torch.get_num_threads()}"
    )
    for name, g in golden.items():
        G_nv = nv_net.Generator(**copy.deepcopy(g["config"])).eval()
        G_nv.load_state_dict(g["state"], strict=True)
        nv = golden_outputs(G_nv, g)
        for q in QUANTITIES:
            e = errors(nv[q], g[truth_key(q)])
            s = g["nvidia_error"][q]
            print(
                f"{name:16s} {q:18s} rel_norm {e[0]:.3e} (file {s[0]:.3e}, x{e[0] / s[0]:.2f})"
                f"  rel_max {e[1]:.3e} (file {s[1]:.3e}, x{e[1] / s[1]:.2f})"
            )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("checkout", help="a stylegan2-ada-pytorch checkout (run side by side, never imported by pti)")
    ap.add_argument("--full", action="store_true", help="also run the 1024 px config-f (slow on CPU)")
    ap.add_argument("--write-golden", metavar="NPZ", help="write the golden file for tests/test_generator.py")
    ap.add_argument("--errors", metavar="NPZ", help="print NVIDIA's errors against a golden file's float64 truth, here")
    args = ap.parse_args()
    nv_net = import_nvidia(args.checkout)

    if args.write_golden:
        write_golden(nv_net, args.write_golden, args.checkout)
        return
    if args.errors:
        print_errors(nv_net, args.errors)
        return

    configs = dict(GOLDEN_CONFIGS)
    if args.full:
        configs["ffhq config-f 1024"] = dict(
            z_dim=512,
            c_dim=0,
            w_dim=512,
            img_resolution=1024,
            img_channels=3,
            mapping_kwargs=dict(num_layers=8),
            synthesis_kwargs=dict(channel_base=32768, channel_max=512, num_fp16_res=4, conv_clamp=256),
        )
    for name, kw in configs.items():
        big = kw["img_resolution"] >= 512
        report = compare(nv_net, kw, batch=1 if big else 2, grads=not big, fused=True if big else None)
        print(name, json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    main()
