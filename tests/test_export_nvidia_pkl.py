"""`pti export --format nvidia-pkl|state-dict`: a tuned person as a file other tools load.

The base is a network snapshot in NVIDIA's real pickle layout (tests/helpers.write_nvidia_pickle: persistence
records with module_src, EasyDict kwargs, numpy scalars, D and the other entries). The tuned person is an
identity on that base. The written pickle must read back, through pti's own safe loader, as the tuned
generator bit for bit, and its records must be the base's own. With PTI_SG2ADA_PATH pointing at a checkout of
stylegan2-ada-pytorch, NVIDIA's own `legacy.load_network_pkl` loads the written file side by side.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pti.engine.checkpoint import generator_hash, load_generator, save_generator
from pti.engine.identity import Identity, open_identity
from pti.engine.safe_pickle import PersistentObject, RestrictedUnpickler, safe_load_pickle
from pti.errors import ExportError
from pti.export.nvidia_pkl import write_nvidia_pickle as write_tuned_pickle
from tests.clirun import run_pti
from tests.helpers import as_persistent, easy, fake_nvidia_modules, small_generator, write_nvidia_pickle

SRC = "# NVIDIA's network module would be here: ünïcode and all\nclass Generator: ...\n"


def _perturbed(base, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    T = base.clone()
    with torch.no_grad():
        for _, p in T.synthesis.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return T


def _identity(tmp_path: Path, base_path: Path, name: str = "person.pti") -> Path:
    base = load_generator(base_path)
    with torch.no_grad():
        pivot = base.mapping(torch.randn(1, base.z_dim, generator=torch.Generator().manual_seed(0)), None)
    ident = Identity.from_tuning(base, _perturbed(base), pivot, generator_hash(base), str(base_path))
    return ident.save(tmp_path / name)


def _numpy_1x(data: bytes) -> bytes:
    """The pickle as numpy 1.x writes it: its scalars under `numpy.core.multiarray` (numpy 2 says `numpy._core`)."""
    out = data.replace(b"cnumpy._core.multiarray\nscalar\n", b"cnumpy.core.multiarray\nscalar\n")
    assert out != data
    return out


@pytest.fixture()
def base_pkl(tmp_path):
    path = write_nvidia_pickle(tmp_path / "base.pkl", small_generator(), protocol=3, module_src=SRC)
    path.write_bytes(_numpy_1x(path.read_bytes()))
    return path


def _globals(data: bytes) -> set[str]:
    """Every global a pickle names, as pti's restricted unpickler is asked for them."""
    names = set()

    class Recording(RestrictedUnpickler):
        def find_class(self, module, name):
            names.add(f"{module}.{name}")
            return super().find_class(module, name)

    Recording(io.BytesIO(data)).load()
    return names


def _records(obj, path="") -> dict[str, PersistentObject]:
    out = {}
    if isinstance(obj, PersistentObject):
        out[path] = obj
        for name, child in obj.modules.items():
            out.update(_records(child, f"{path}.{name}"))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_records(v, str(k)))
    return out


def _without_tensors(state: dict) -> dict:
    return {k: v for k, v in state.items() if k not in ("_parameters", "_buffers", "_modules")}


def _same_state(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_round_trip_through_the_cli(tmp_path, base_pkl):
    ident = _identity(tmp_path, base_pkl)
    r = run_pti("export", ident, "--format", "nvidia-pkl")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "person.pkl"  # beside the identity, named after it
    assert f"wrote {out}" in r.stdout and "bit for bit" in r.stdout and "G_ema" in r.stdout

    tuned = open_identity(ident).G
    assert _same_state(load_generator(out).state_dict(), tuned.state_dict())
    base_data, out_data = base_pkl.read_bytes(), out.read_bytes()
    assert out_data[:2] == base_data[:2] == b"\x80\x03"  # the base's protocol

    base_top, top = (safe_load_pickle(io.BytesIO(d)) for d in (base_data, out_data))
    assert list(top) == list(base_top)
    # G and G_ema are the tuned generator (one object); D and the other entries are the base's.
    assert top["G"] is top["G_ema"]
    assert _same_state(top["D"].flat_state(), base_top["D"].flat_state())
    assert top["training_set_kwargs"] == base_top["training_set_kwargs"] and top["augment_pipe"] is None
    # Every record is the base's own: class, version, source (same bytes), kwargs and non-tensor attributes.
    want, got = _records(base_top["G_ema"], "G"), _records(top["G_ema"], "G")
    assert list(got) == list(want) and len(got) > 10
    for name, rec in got.items():
        assert (rec.class_name, rec.version) == (want[name].class_name, want[name].version)
        assert rec.module_src.encode() == SRC.encode()
        assert rec.meta == want[name].meta
        assert repr(_without_tensors(rec.state)) == repr(_without_tensors(want[name].state)), name
    # The same globals, numpy's under the module name the base used (a numpy 1.x file stays loadable there).
    assert "numpy.core.multiarray.scalar" in _globals(out_data)
    assert _globals(out_data) == _globals(base_data)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_other_protocols_and_a_bare_network_pickle(tmp_path, protocol):
    base_path = write_nvidia_pickle(tmp_path / "b.pkl", small_generator(), protocol=protocol, snapshot=False)
    base = load_generator(base_path)
    tuned = _perturbed(base)
    out = tmp_path / "o.pkl"
    w = write_tuned_pickle(tuned, base_path, out)
    assert out.read_bytes()[1] == protocol and w.keys == ["G_ema"] and w.tuned == ["G_ema"]
    assert _same_state(load_generator(out).state_dict(), tuned.state_dict())
    assert _globals(out.read_bytes()) == _globals(base_path.read_bytes())


def test_drop_d(tmp_path, base_pkl):
    ident = _identity(tmp_path, base_pkl)
    out = tmp_path / "small.pkl"
    r = run_pti("export", ident, "--format", "nvidia-pkl", "--drop-d", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "legacy.load_network_pkl refuses" in r.stdout  # the caveat is said
    top = safe_load_pickle(io.BytesIO(out.read_bytes()))
    assert list(top) == ["G", "G_ema", "training_set_kwargs", "augment_pipe"]


def test_a_wrong_writer_is_caught(tmp_path, base_pkl, monkeypatch):
    """The read-back check keeps no file whose generator is not the tuned one (here: one weight left as the
    base's), and says so in one line."""
    from pti.export import nvidia_pkl

    real = nvidia_pkl._replace_parameters

    def skip_one(net, tensors, base):
        first = next(iter(tensors))
        n = real(net, {k: v for k, v in tensors.items() if k != first}, base)
        return n + 1

    monkeypatch.setattr(nvidia_pkl, "_replace_parameters", skip_one)
    base = load_generator(base_pkl)
    out = tmp_path / "wrong.pkl"
    with pytest.raises(ExportError, match="does not read back as the tuned generator"):
        write_tuned_pickle(_perturbed(base), base_pkl, out)
    assert not out.exists() and list(tmp_path.glob("*.tmp*")) == []


def test_bases_that_cannot_give_a_pickle(tmp_path):
    G = small_generator()
    st = tmp_path / "base.safetensors"
    save_generator(G, st)
    ident = _identity(tmp_path, st)
    r = run_pti("export", ident, "--format", "nvidia-pkl")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "pti safetensors file" in r.stderr and "only a stylegan2-ada-pytorch .pkl base" in r.stderr
    assert not (tmp_path / "person.pkl").exists()
    r = run_pti("export", "builtin:tiny", "--format", "nvidia-pkl", "-o", tmp_path / "t.pkl")
    assert r.returncode == 1 and "builtin:tiny" in r.stderr and "rosinality or state-dict" in r.stderr


def test_never_replaces_a_file_and_refuses_runtime_options(tmp_path, base_pkl):
    ident = _identity(tmp_path, base_pkl)
    out = tmp_path / "person.pkl"
    out.write_bytes(b"mine")
    r = run_pti("export", ident, "--format", "nvidia-pkl")
    assert r.returncode == 1 and "already exists" in r.stderr and out.read_bytes() == b"mine"
    r = run_pti("export", ident, "--format", "nvidia-pkl", "--force")
    assert r.returncode == 0 and _same_state(load_generator(out).state_dict(), open_identity(ident).G.state_dict())
    for extra in (["--precision", "fp16"], ["--max-batch", "4"]):
        r = run_pti("export", ident, "--format", "state-dict", *extra)
        assert r.returncode == 2 and "runtime exports" in r.stderr, r.stderr
    r = run_pti("export", ident, "--format", "onnx", "--drop-d")
    assert r.returncode == 2 and "--drop-d" in r.stderr


def test_a_hostile_base_is_refused_and_nothing_runs(tmp_path, base_pkl):
    ident = _identity(tmp_path, base_pkl)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    # The same generator as the identity's base, with a payload as the snapshot's D.
    G = load_generator(base_pkl)
    with fake_nvidia_modules() as fake:
        G_p = as_persistent(G, fake, easy(fake, G.init_kwargs))
        hostile = pickle.dumps(dict(G=G_p, D=Payload(), G_ema=G_p), protocol=3)
    (tmp_path / "hostile.pkl").write_bytes(hostile)
    r = run_pti("export", ident, "--format", "nvidia-pkl", "--network", tmp_path / "hostile.pkl")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "system" in r.stderr and "nothing from the file was run" in r.stderr
    assert not marker.exists() and not (tmp_path / "person.pkl").exists()


def test_state_dict_holds_nvidia_names(tmp_path, base_pkl):
    import safetensors.torch

    ident = _identity(tmp_path, base_pkl)
    r = run_pti("export", ident, "--format", "state-dict")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "person.safetensors"
    tuned = open_identity(ident).G
    assert _same_state(safetensors.torch.load_file(out), tuned.state_dict())
    assert _same_state(load_generator(out).state_dict(), tuned.state_dict())  # and pti reads it as a --network


def test_projected_w_is_the_pivot_in_nvidias_layout(tmp_path, base_pkl):
    from pti.engine.pivots import read_pivot

    ident = _identity(tmp_path, base_pkl)
    r = run_pti("export", ident, "--format", "projected-w")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "person.npz"
    with np.load(out, allow_pickle=False) as f:
        assert list(f.keys()) == ["w"]
        w = f["w"]
    pivot = Identity.load(ident).pivot
    assert w.dtype == np.float32 and w.shape == (1, *pivot.shape)
    assert np.array_equal(w[0], pivot.numpy())
    assert torch.equal(read_pivot(out, *pivot.shape), pivot)  # and it comes back in as a pivot file
    r = run_pti("export", base_pkl, "--format", "projected-w", "-o", tmp_path / "g.npz")
    assert r.returncode == 1 and "has no pivot" in r.stderr and not (tmp_path / "g.npz").exists()


# ----------------------------------------------------------------------------- NVIDIA's own loader


@pytest.mark.skipif(
    not os.environ.get("PTI_SG2ADA_PATH"), reason="set PTI_SG2ADA_PATH to a stylegan2-ada-pytorch checkout"
)
def test_nvidia_loader_reads_the_written_pickle(tmp_path):
    """A snapshot pickled by NVIDIA's own persistence (networks from the checkout), a tuned identity on it,
    `pti export --format nvidia-pkl`, then NVIDIA's `legacy.load_network_pkl` and PTI's `pickle.load`."""
    import copy

    from tools.parity_sg2ada import import_nvidia

    checkout = os.environ["PTI_SG2ADA_PATH"]
    networks = import_nvidia(checkout)
    legacy = __import__("legacy")
    kw = dict(z_dim=32, c_dim=0, w_dim=32, img_resolution=16, img_channels=3)
    syn = dict(channel_base=256, channel_max=32, num_fp16_res=0, conv_clamp=256)
    torch.manual_seed(0)
    G = networks.Generator(**kw, mapping_kwargs=dict(num_layers=2), synthesis_kwargs=syn).eval()
    D = networks.Discriminator(c_dim=0, img_resolution=16, img_channels=3, channel_base=256, channel_max=32).eval()
    snapshot = dict(training_set_kwargs=dict(path="ffhq.zip", resolution=16))
    for name, module in [("G", G), ("D", D), ("G_ema", G)]:
        snapshot[name] = copy.deepcopy(module).eval().requires_grad_(False)
    snapshot["augment_pipe"] = None
    base_path = tmp_path / "nv.pkl"
    base_path.write_bytes(pickle.dumps(snapshot))

    ident = _identity(tmp_path, base_path)
    out = tmp_path / "person.pkl"
    r = run_pti("export", ident, "--format", "nvidia-pkl", "-o", out)
    assert r.returncode == 0, r.stderr
    tuned = open_identity(ident)
    with open(out, "rb") as f:
        data = legacy.load_network_pkl(f)
    with open(out, "rb") as f:
        as_pti_does = pickle.load(f)["G_ema"]
    ws = tuned.base.mapping(torch.randn(2, 32, generator=torch.Generator().manual_seed(5)), None)
    ours = tuned.G.synthesis(ws, noise_mode="const", force_fp32=True)
    for key in ("G_ema", "G"):
        nv = data[key]
        assert type(nv).__name__ == "Generator"
        assert _same_state({k: v for k, v in nv.state_dict().items()}, tuned.G.state_dict()), key
        with torch.no_grad():
            img = nv.synthesis(ws, noise_mode="const", force_fp32=True)
        assert torch.equal(img, ours), (key, (img - ours).abs().max().item())
    assert _same_state(as_pti_does.state_dict(), tuned.G.state_dict())
    # The pivot as projected_w.npz, rendered the way NVIDIA's generate.py --projected-w does it (the script itself
    # asks for CUDA): its uint8 image equals pti's render of the person at the pivot.
    w_path = tmp_path / "w.npz"
    assert run_pti("export", ident, "--format", "projected-w", "-o", w_path).returncode == 0
    ws_file = torch.tensor(np.load(w_path)["w"])
    assert ws_file.shape[1:] == (data["G_ema"].num_ws, data["G_ema"].w_dim)
    with torch.no_grad():
        nv_img = data["G_ema"].synthesis(ws_file[0].unsqueeze(0), noise_mode="const")
        ours = tuned.G.synthesis(tuned.ident.pivot[None], noise_mode="const")
    to_u8 = lambda x: (x.permute(0, 2, 3, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8)  # noqa: E731
    assert torch.equal(to_u8(nv_img), to_u8(ours))
    assert _same_state(data["D"].state_dict(), D.state_dict())
    assert sys.modules.get("legacy") is legacy
