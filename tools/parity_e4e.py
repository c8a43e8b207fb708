"""Side-by-side parity of pti's encoders (`pti.engine.encoders`) with the authors' e4e and ReStyle-e4e code,
and the golden file the tests read without that code.

Usage:
    python tools/parity_e4e.py --e4e E4E --restyle RESTYLE --rosinality ROSI [--torchvision DIR]
    python tools/parity_e4e.py ... --write-golden tests/data/encoders_golden.npz

E4E, RESTYLE and ROSI are checkouts of omertov/encoder4editing, yuval-alaluf/restyle-encoder and
rosinality/stylegan2-pytorch. The two encoder repositories compile StyleGAN2's CUDA ops at import and have
no CPU path; their `models.stylegan2.op` is replaced by rosinality's own `op` package, whose CPU branches
(native upfirdn2d, leaky ReLU of input + bias times sqrt 2) compute the same functions, with
`torch.utils.cpp_extension.load` stubbed while importing. torchvision (their inference transform) is
imported from DIR without its compiled ops (only `transforms` is used); matplotlib (imported by e4e's
psp.py for its training plots) is a stub.

What runs, per encoder, on the CPU:
- weights: `encoder_state` below, deterministic from a seed with numpy's legacy RandomState (the same
  numbers on every machine and numpy version), uniform with unit variance, scaled per tensor by
  gain/sqrt(fan_in) so activations stay O(1) through the 24 residual units (the residual branch's last
  BatchNorm scales by 0.1-0.3); BatchNorm running statistics and affines non-trivial. The decoder is pti's
  Generator at 32 px (rosinality's channel table) with weights from the same generator of numbers, written
  in rosinality's layout by pti.export.rosinality; both sides thus render with one set of weights.
- the checkpoint, as their training code saves it ({"state_dict": net.state_dict(), "opts": vars(opts),
  "latent_avg": net.latent_avg}, e4e training/coach.py and restyle training/coach_restyle_e4e.py; the
  latter's optimizer state is left out), loaded back by their own loaders (e4e utils/model_utils.setup_model;
  ReStyle models/e4e.py e4e(opts) with checkpoint_path).
- inputs: their transform (Resize((256, 256)), ToTensor, Normalize(0.5, 0.5)) on two faces: the astronaut
  from scikit-image, cropped to the face and resized to 288 px (downsampled to 256 by the transform), and a
  synthetic 96 px one (upsampled).
- e4e codes as PTI's coach gets them (pSp.forward(x, randomize_noise=False, return_latents=True,
  resize=False)); ReStyle codes per iteration from utils/inference_utils.run_on_batch with the average
  image of get_average_image (restated without its `.to('cuda')`).
- each in float32 and in float64 (their modules and inputs upcast: the truth the test compares with).

Golden file keys: `meta` (JSON: versions, commits, configs, seeds, per-tensor sha256 of the regenerated
weights, the sha256 of their transform's output per face, upstream float32 errors against the float64
truth), `faces/<name>` uint8 [3, H, W], `e4e/<face>` float64 [1, n, 512], `restyle/<face>` float64
[iters, 1, n, 512] (one row per iteration). No weights are stored: the test regenerates them and checks the
sha256s.

How the current file was made: see `meta`. Nothing here is imported by pti; the tests import the weight
and face makers below (which need only pti, numpy and scikit-image).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import math
import platform
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch

SIZE = 32  # decoder resolution: 8 W+ layers (coarse 0-2, middle 3-6, fine 7), 512 channels throughout
RESTYLE_ITERS = 3
SEEDS = {"e4e": 1, "restyle": 2, "decoder": 3}
E4E_OPTS = dict(  # the options their training scripts save that inference reads (plus their defaults)
    encoder_type="Encoder4Editing",
    stylegan_size=SIZE,
    start_from_latent_avg=True,
    dataset_type="ffhq_encode",
    progressive_steps=[0, 20000, 22000, 24000, 26000, 28000, 30000, 32000],
    checkpoint_path=None,
    device="cpu",
)
RESTYLE_OPTS = dict(
    encoder_type="ProgressiveBackboneEncoder",
    output_size=SIZE,
    input_nc=6,
    start_from_latent_avg=True,
    dataset_type="ffhq_encode",
    n_iters_per_batch=RESTYLE_ITERS,
    resize_outputs=False,
    checkpoint_path=None,
    device="cpu",
)
DECODER_CONFIG = dict(  # what pti.engine.rosinality infers for rosinality's Generator(32, 512, 8, channel_multiplier=2)
    z_dim=512,
    c_dim=0,
    w_dim=512,
    img_resolution=SIZE,
    img_channels=3,
    mapping_kwargs=dict(num_layers=8, lr_multiplier=0.01),
    synthesis_kwargs=dict(channel_base=32768, channel_max=512, num_fp16_res=0, conv_clamp=None),
)


# ---------------------------------------------------------------------------- deterministic weights and faces


def _uniform(rs: np.random.RandomState, shape, lo: float, hi: float) -> torch.Tensor:
    return torch.from_numpy(np.asarray(lo + (hi - lo) * rs.random_sample(shape), dtype=np.float32))


def _unit(rs: np.random.RandomState, shape, scale: float) -> torch.Tensor:
    """Uniform with standard deviation `scale` (U(-sqrt 3, sqrt 3) has unit variance)."""
    return _uniform(rs, shape, -math.sqrt(3) * scale, math.sqrt(3) * scale)


def encoder_state(kind: str, seed: int | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the encoder's state dict (upstream names), made from `seed` in state-dict order."""
    from torch import nn

    from pti.engine.encoders import Encoder, EqualLinear

    rs = np.random.RandomState(SEEDS[kind] if seed is None else seed)
    net = Encoder(kind, SIZE, None).net
    owner = dict(net.named_modules())
    out = {}
    for name, t in net.state_dict().items():
        mname, leaf = name.rsplit(".", 1)
        m, shape = owner[mname], tuple(t.shape)
        if isinstance(m, nn.Conv2d) and leaf == "weight":
            fan_in = shape[1] * shape[2] * shape[3]
            relu_after = name.startswith("styles") or mname.endswith("fc1")  # (leaky) ReLU follows: gain sqrt 2
            out[name] = _unit(rs, shape, (math.sqrt(2) if relu_after else 1.0) / math.sqrt(fan_in))
        elif isinstance(m, (nn.Conv2d, EqualLinear)) and leaf == "bias":
            out[name] = _unit(rs, shape, 0.05)
        elif isinstance(m, EqualLinear):  # stored unscaled: 1/sqrt(in) is applied at run time
            out[name] = _unit(rs, shape, 1.0)
        elif isinstance(m, nn.PReLU):
            out[name] = _uniform(rs, shape, 0.05, 0.35)
        elif isinstance(m, nn.BatchNorm2d):
            if leaf == "num_batches_tracked":
                out[name] = torch.tensor(1000, dtype=torch.int64)
            elif leaf == "running_var":
                out[name] = _uniform(rs, shape, 0.5, 1.5)
            elif leaf in ("running_mean", "bias"):
                out[name] = _unit(rs, shape, 0.1)
            elif mname.endswith("res_layer.4"):  # the residual branch's last scale: a small branch per unit
                out[name] = _uniform(rs, shape, 0.1, 0.3)
            else:
                out[name] = _uniform(rs, shape, 0.5, 1.5)
        else:
            raise AssertionError(f"no rule for {name} {shape}")
    return out


def decoder_generator(seed: int | None = None):
    """pti's Generator in rosinality's 32 px layout, every parameter and buffer (noise too) from `seed`."""
    from pti.engine.generator import Generator

    rs = np.random.RandomState(SEEDS["decoder"] if seed is None else seed)
    G = Generator(**DECODER_CONFIG).eval().requires_grad_(False)
    state = {}
    for name, t in G.state_dict().items():
        shape = tuple(t.shape)
        if name.endswith("resample_filter"):
            state[name] = t
        elif name.endswith("noise_strength"):
            state[name] = _uniform(rs, shape, 0.05, 0.2)
        elif name.endswith("bias"):
            state[name] = _unit(rs, shape, 0.1)
        else:  # weights (stored unscaled: gains at run time), const, noise_const, w_avg
            state[name] = _unit(rs, shape, 1.0)
    G.load_state_dict(state, strict=True)
    return G


def checksum(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def faces() -> dict[str, np.ndarray]:
    """uint8 [3, H, W]: the astronaut's face (skimage, public domain) at 288 px, and a synthetic 96 px face."""
    from PIL import Image
    from skimage import data

    crop = data.astronaut()[20:240, 130:350]  # 220 x 220 around her face
    astronaut = np.asarray(Image.fromarray(crop).resize((288, 288), Image.LANCZOS))
    yy, xx = np.mgrid[0:96, 0:96].astype(np.float64) / 95
    face = 0.5 + 0.35 * np.cos(3 * xx + 1) * np.sin(5 * yy) + 0.15 * ((xx - 0.5) ** 2 + (yy - 0.45) ** 2 < 0.1)
    synthetic = np.stack([face, face**1.3, 1 - 0.6 * face], -1)
    synthetic = np.clip(np.rint(synthetic * 255), 0, 255).astype(np.uint8)
    return {"astronaut": astronaut.transpose(2, 0, 1).copy(), "synthetic": synthetic.transpose(2, 0, 1).copy()}


def checkpoint(kind: str, enc_state: dict[str, torch.Tensor], G, opts: dict | None = None, latent_avg=True) -> dict:
    """The dict their training code saves: state_dict (encoder.* and the rosinality decoder.*), opts and
    latent_avg (G's w_avg repeated per W+ layer, as their from-scratch training sets it)."""
    from pti.export.rosinality import rosinality_checkpoint

    opts = dict(E4E_OPTS if kind == "e4e" else RESTYLE_OPTS, **(opts or {}))
    ros = rosinality_checkpoint(G)
    sd = {**{f"encoder.{k}": v for k, v in enc_state.items()}, **{f"decoder.{k}": v for k, v in ros["g_ema"].items()}}
    ckpt = {"state_dict": sd, "opts": opts}
    if latent_avg:
        ckpt["latent_avg"] = ros["latent_avg"].reshape(1, -1).repeat(2 * int(math.log2(SIZE)) - 2, 1)
    return ckpt


# ---------------------------------------------------------------------------- the authors' code


@contextlib.contextmanager
def _upstream(checkout: str, rosinality: str, torchvision_dir: str | None):
    """sys.path at `checkout`, its CUDA op package replaced by rosinality's CPU-capable one; restored after."""
    import torch.utils.cpp_extension as ext

    tops = ("models", "utils", "configs", "options", "criteria", "datasets", "training")
    saved_modules = dict(sys.modules)
    saved_load = ext.load
    ext.load = lambda name, *a, **k: types.SimpleNamespace(name=name)
    sys.path.insert(0, checkout)
    try:
        for name in list(sys.modules):
            if name.split(".")[0] in tops:
                del sys.modules[name]
        spec = importlib.util.spec_from_file_location(
            "models.stylegan2.op", Path(rosinality) / "op/__init__.py", submodule_search_locations=[f"{rosinality}/op"]
        )
        op = importlib.util.module_from_spec(spec)
        sys.modules["models.stylegan2.op"] = op
        spec.loader.exec_module(op)
        mpl = types.ModuleType("matplotlib")
        mpl.use = lambda *a, **k: None
        sys.modules.setdefault("matplotlib", mpl)
        if "torchvision" not in sys.modules and torchvision_dir:
            tv = types.ModuleType("torchvision")  # its package __init__ loads compiled ops this torch may lack
            tv.__path__ = [str(Path(torchvision_dir) / "torchvision")]
            sys.modules["torchvision"] = tv
        tvm = types.ModuleType("torchvision.models")
        tvm.resnet34 = None  # only ReStyle's ResNet34 variant uses it; not built here
        sys.modules["torchvision.models"] = tvm
        yield
    finally:
        ext.load = saved_load
        sys.path.remove(checkout)
        for name in list(sys.modules):
            if name not in saved_modules:
                del sys.modules[name]


def _transform():
    import torchvision.transforms as T

    return T.Compose([T.Resize((256, 256)), T.ToTensor(), T.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])])


def _inputs(face_arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    from PIL import Image

    t = _transform()
    return {k: t(Image.fromarray(v.transpose(1, 2, 0)))[None] for k, v in face_arrays.items()}


def run_e4e(checkout, rosinality, tv, ckpt_path, face_arrays, dtype=torch.float32) -> dict:
    with _upstream(checkout, rosinality, tv):
        from utils.model_utils import setup_model

        net, _ = setup_model(str(ckpt_path), device="cpu")
        net = net.to(dtype)
        net.latent_avg = net.latent_avg.to(dtype)
        out = {}
        with torch.no_grad():
            for name, x in _inputs(face_arrays).items():  # as PTI's coach calls it (get_e4e_inversion)
                _, w = net(x.to(dtype), randomize_noise=False, return_latents=True, resize=False, input_code=False)
                out[name] = w
        return out


def run_restyle(checkout, rosinality, tv, ckpt_path, face_arrays, dtype=torch.float32) -> dict:
    with _upstream(checkout, rosinality, tv):
        from argparse import Namespace

        from models.e4e import e4e
        from utils.inference_utils import run_on_batch

        ckpt = torch.load(str(ckpt_path), map_location="cpu")
        opts = Namespace(**dict(ckpt["opts"], checkpoint_path=str(ckpt_path)))
        net = e4e(opts).eval()
        # e4e.py loads the encoder non-strictly: make sure every tensor was there
        got = {k[len("encoder.") :] for k in ckpt["state_dict"] if k.startswith("encoder.")}
        assert got == set(net.encoder.state_dict()), "ReStyle encoder keys differ from pti's"
        net = net.to(dtype)
        net.latent_avg = net.latent_avg.to(dtype)
        out = {}
        with torch.no_grad():
            avg = net(net.latent_avg.unsqueeze(0), input_code=True, randomize_noise=False, average_code=True)[0]
            for name, x in _inputs(face_arrays).items():
                _, latents = run_on_batch(x.to(dtype), net, opts, avg.float().to(dtype))
                out[name] = torch.from_numpy(np.stack(latents[0]))[:, None]  # [iters, 1, n, 512]
        return out


def _commit(checkout: str) -> str:
    try:
        return subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True).stdout[:12]
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--e4e", required=True)
    ap.add_argument("--restyle", required=True)
    ap.add_argument("--rosinality", required=True)
    ap.add_argument("--torchvision", default=None, help="folder holding a torchvision package (transforms only)")
    ap.add_argument("--write-golden", default=None)
    ap.add_argument("--tmp", default="/tmp/parity_e4e")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    from pti.engine.encoders import encode, load_encoder

    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    face_arrays, G = faces(), decoder_generator()
    meta: dict = dict(
        format=1,
        size=SIZE,
        restyle_iters=RESTYLE_ITERS,
        seeds=SEEDS,
        torch=torch.__version__,
        numpy=np.__version__,
        python=platform.python_version(),
        machine=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
        commits=dict(e4e=_commit(args.e4e), restyle=_commit(args.restyle), rosinality=_commit(args.rosinality)),
        decoder_sha={k: checksum(v) for k, v in G.state_dict().items()},
        input_sha={k: checksum(v) for k, v in _inputs_sha(args, face_arrays).items()},
        upstream_fp32_error={},
        pti_fp32_error={},
    )
    arrays = {f"faces/{k}": v for k, v in face_arrays.items()}
    for kind, runner in (("e4e", run_e4e), ("restyle", run_restyle)):
        state = encoder_state(kind)
        meta[f"{kind}_sha"] = {k: checksum(v) for k, v in state.items()}
        meta[f"{kind}_opts"] = E4E_OPTS if kind == "e4e" else RESTYLE_OPTS
        path = tmp / f"{kind}.pt"
        torch.save(checkpoint(kind, state, G), path)
        checkout = args.e4e if kind == "e4e" else args.restyle
        f32 = runner(checkout, args.rosinality, args.torchvision, path, face_arrays)
        f64 = runner(checkout, args.rosinality, args.torchvision, path, face_arrays, torch.float64)
        enc = load_encoder(path)
        for name, img in face_arrays.items():
            ours = encode(enc, torch.from_numpy(img)[None], G=G, iterations=RESTYLE_ITERS)
            truth, theirs = f64[name], f32[name]
            last_truth, last_theirs = (truth, theirs) if kind == "e4e" else (truth[-1], theirs[-1])
            scale = float(last_truth.abs().max())
            meta["upstream_fp32_error"][f"{kind}/{name}"] = float((last_theirs.double() - last_truth).abs().max())
            meta["pti_fp32_error"][f"{kind}/{name}"] = float((ours.double() - last_truth).abs().max())
            key = f"{kind}/{name}"
            print(
                f"{kind:8s} {name:10s} |codes| {scale:8.3f}  upstream f32 vs f64 {meta['upstream_fp32_error'][key]:.3e}"
                f"  pti f32 vs f64 {meta['pti_fp32_error'][key]:.3e}"
                f"  pti vs upstream f32 {float((ours - last_theirs.float()).abs().max()):.3e}"
            )
            arrays[f"{kind}/{name}"] = truth.double().numpy()
    if args.write_golden:
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        np.savez_compressed(args.write_golden, **arrays)
        print(f"wrote {args.write_golden} ({Path(args.write_golden).stat().st_size} bytes)")
    return 0


def _inputs_sha(args, face_arrays):
    with _upstream(args.e4e, args.rosinality, args.torchvision):
        return _inputs(face_arrays)


if __name__ == "__main__":
    sys.exit(main())
