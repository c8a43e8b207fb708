"""Side-by-side parity against a local checkout of NVIDIA's stylegan2-ada-pytorch.

Usage: python tools/parity_sg2ada.py /path/to/stylegan2-ada-pytorch [--full]

Builds NVIDIA's Generator and ours with the same kwargs, copies NVIDIA's state dict into ours
(strict), and reports max |diff| of mapping (with truncation) and synthesis (noise const, fp32 and
the fp16 blocks as configured), plus gradients w.r.t. ws and every synthesis parameter.
Nothing from the checkout is imported by `pti` itself; this script only runs both side by side.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def compare(nv_net, kwargs, batch=2, seed=0, fused=None, grads=True, dtype_fp32=False):
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkout")
    ap.add_argument("--full", action="store_true", help="also run the 1024 px config-f (slow on CPU)")
    ap.add_argument("--write-golden", metavar="NPZ", help="save NVIDIA's outputs for the CI golden test")
    args = ap.parse_args()
    sys.path.insert(0, args.checkout)
    from training import networks as nv_net  # noqa: E402  (NVIDIA's code, run side by side)

    if args.write_golden:
        write_golden(nv_net, args.write_golden)
        return

    configs = {
        "small fp32": dict(z_dim=32, c_dim=0, w_dim=32, img_resolution=32, img_channels=3,
                           mapping_kwargs=dict(num_layers=8),
                           synthesis_kwargs=dict(channel_base=1024, channel_max=64, num_fp16_res=0, conv_clamp=None)),
        "small fp16 res + clamp": dict(z_dim=32, c_dim=0, w_dim=32, img_resolution=64, img_channels=3,
                                       mapping_kwargs=dict(num_layers=2),
                                       synthesis_kwargs=dict(channel_base=2048, channel_max=64, num_fp16_res=2, conv_clamp=256)),
    }
    if args.full:
        configs["ffhq config-f 1024"] = dict(z_dim=512, c_dim=0, w_dim=512, img_resolution=1024, img_channels=3,
                                             mapping_kwargs=dict(num_layers=8),
                                             synthesis_kwargs=dict(channel_base=32768, channel_max=512, num_fp16_res=4, conv_clamp=256))
    report = {}
    for name, kw in configs.items():
        big = kw["img_resolution"] >= 512
        report[name] = compare(nv_net, kw, batch=1 if big else 2, grads=not big, fused=True if big else None)
        print(name, json.dumps(report[name], indent=1), flush=True)




GOLDEN_CONFIGS = {
    "fp32_32px": dict(z_dim=32, c_dim=0, w_dim=32, img_resolution=32, img_channels=3,
                      mapping_kwargs=dict(num_layers=8),
                      synthesis_kwargs=dict(channel_base=1024, channel_max=64, num_fp16_res=0, conv_clamp=None)),
    "fp16_64px_clamp": dict(z_dim=32, c_dim=0, w_dim=32, img_resolution=64, img_channels=3,
                            mapping_kwargs=dict(num_layers=2),
                            synthesis_kwargs=dict(channel_base=2048, channel_max=64, num_fp16_res=2, conv_clamp=256)),
}


def golden_generator(name):
    """Our generator for a golden config, weights from torch.manual_seed (shared with the test)."""
    from pti.engine.generator import Generator

    torch.manual_seed(1234)
    G = Generator(**GOLDEN_CONFIGS[name]).eval()
    with torch.no_grad():
        for n, p in G.named_parameters():
            if n.endswith("noise_strength") or (n.endswith(".bias") and ".affine." not in n):
                p.copy_(torch.randn(p.shape) * 0.1)  # non-zero so noise and bias paths are exercised
        G.mapping.w_avg.copy_(torch.randn(G.w_dim) * 0.1)
    return G


def write_golden(nv_net, path):
    """Outputs of NVIDIA's code for the golden configs, saved for the CI test."""
    import numpy as np

    arrays = {}
    for name, kw in GOLDEN_CONFIGS.items():
        G = golden_generator(name)
        G_nv = nv_net.Generator(**kw).eval()
        G_nv.load_state_dict(G.state_dict(), strict=True)
        torch.manual_seed(7)
        z = torch.randn([2, G.z_dim])
        with torch.no_grad():
            ws = G_nv.mapping(z, None, truncation_psi=0.7)
            arrays[f"{name}/z"] = z.numpy()
            arrays[f"{name}/ws"] = ws.numpy()
            arrays[f"{name}/ws_cutoff"] = G_nv.mapping(z, None, truncation_psi=0.5, truncation_cutoff=2).numpy()
            for fp32 in (True, False):
                for fused in (True, False):
                    img = G_nv.synthesis(ws, noise_mode="const", force_fp32=fp32, fused_modconv=fused)
                    arrays[f"{name}/img_fp32={fp32}_fused={fused}"] = img.numpy()
        G_nv.train()
        ws1 = ws.clone().requires_grad_(True)
        img = G_nv.synthesis(ws1, noise_mode="const", force_fp32=True)
        (img * torch.linspace(-1, 1, img.numel()).reshape(img.shape)).sum().backward()
        arrays[f"{name}/grad_ws"] = ws1.grad.numpy()
    np.savez_compressed(path, **arrays)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
