"""Edit directions and the edit grammar (pti.engine.edits), against REFERENCE §2 written out here in numpy.

Tolerances: the library computes in float32 what the reference computes in float64; each edited
value is a handful of float32 operations on numbers of size |w| + |a| * |d|, so 8 float32 epsilons
of that scale bound the difference (measured: below 2 epsilons).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ffhq_shaped_generator
from pti.engine import edits as E
from pti.engine import weights as W
from pti.engine.generator import tiny_generator
from pti.errors import WeightsError

EPS32 = float(np.finfo(np.float32).eps)
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "directions"
L, C = 10, 64  # the tiny generator's ws


def _close(got: torch.Tensor, want: np.ndarray) -> None:
    scale = float(np.abs(want).max()) + 1.0
    np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=8 * EPS32 * scale)


# ------------------------------------------------------------------------------------ reference formulas


def interfacegan_ref(w: np.ndarray, d: np.ndarray, a: float, first: int, last: int) -> np.ndarray:
    out = w.astype(np.float64).copy()
    d = np.broadcast_to(d.astype(np.float64), w.shape)
    for layer in range(first, last + 1):
        out[layer] = out[layer] + a * d[layer]
    return out


def ganspace_ref(
    w: np.ndarray, mean: np.ndarray, comp: np.ndarray, std: float, a: float, first: int, last: int
) -> np.ndarray:
    """The authors' get_delta: coordinate of layer 0 in sd units, moved to `a` on layers first..last."""
    w = w.astype(np.float64)
    coord = float(np.sum((w[0] - mean) * comp)) / std
    out = w.copy()
    for layer in range(first, last + 1):
        out[layer] = out[layer] + (a - coord) * comp * std
    return out


@pytest.fixture(scope="module")
def pivot() -> torch.Tensor:
    return torch.from_numpy(np.random.RandomState(5).randn(L, C).astype(np.float32))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Direction files in every supported layout, from stored random arrays."""
    tmp = tmp_path_factory.mktemp("dirs")
    rs = np.random.RandomState(11)
    d = rs.randn(C).astype(np.float32)
    d /= np.linalg.norm(d)
    per_layer = rs.randn(L, C).astype(np.float32)
    comp = np.linalg.qr(rs.randn(C, 6))[0].T.astype(np.float32)  # 6 orthonormal rows
    mean, std = rs.randn(C).astype(np.float32), np.array([3.0, 2.5, 2.0, 1.5, 1.0, 0.5], np.float32)
    torch.save(torch.from_numpy(d)[None], tmp / "d_1c.pt")
    np.save(tmp / "d_c.npy", d.astype(np.float64))  # the original InterFaceGAN .npy is float64
    torch.save(torch.from_numpy(per_layer)[None], tmp / "d_1lc.pt")
    np.save(tmp / "d_lc.npy", per_layer)
    torch.save(
        {"mean": torch.from_numpy(mean)[None], "comp": torch.from_numpy(comp)[:, None], "std": torch.from_numpy(std)},
        tmp / "pca.pt",
    )
    np.savez(tmp / "pca.npz", lat_mean=mean[None], lat_comp=comp[:, None], lat_stdev=std, var_ratio=std**2)
    return dict(dir=tmp, d=d, per_layer=per_layer, comp=comp, mean=mean, std=std)


# ------------------------------------------------------------------------------------ arithmetic


@pytest.mark.parametrize(
    "name,layers", [("d_1c.pt", None), ("d_c.npy", None), ("d_1c.pt", (0, 3)), ("d_c.npy", (4, 4))]
)
def test_interfacegan_is_additive_on_the_layers(files, pivot, name, layers):
    spec = E.parse_edit(f"{files['dir'] / name}=+2.5" + (f"@{layers[0]}-{layers[1]}" if layers else ""))
    direction = E.resolve(spec, L, C)
    (frame,) = E.frames(pivot, [spec], [direction])
    first, last = layers or (0, L - 1)
    _close(frame.ws, interfacegan_ref(pivot.numpy(), files["d"][None], 2.5, first, last))


@pytest.mark.parametrize("name", ["d_1lc.pt", "d_lc.npy"])
def test_per_layer_directions(files, pivot, name):
    spec = E.parse_edit(f"{files['dir'] / name}=-1.5")
    (frame,) = E.frames(pivot, [spec], [E.resolve(spec, L, C)])
    _close(frame.ws, interfacegan_ref(pivot.numpy(), files["per_layer"], -1.5, 0, L - 1))


@pytest.mark.parametrize("name", ["pca.pt", "pca.npz"])
@pytest.mark.parametrize("k,a,layers", [(0, 2.0, None), (3, -4.0, (2, 5)), (5, 0.0, (9, 9))])
def test_ganspace_moves_the_coordinate_to_the_target(files, pivot, name, k, a, layers):
    text = f"{files['dir'] / name}:{k}={a:+g}" + (f"@{layers[0]}-{layers[1]}" if layers else "")
    spec = E.parse_edit(text)
    (frame,) = E.frames(pivot, [spec], [E.resolve(spec, L, C)])
    first, last = layers or (0, L - 1)
    want = ganspace_ref(pivot.numpy(), files["mean"], files["comp"][k], float(files["std"][k]), a, first, last)
    _close(frame.ws, want)
    untouched = [i for i in range(L) if not first <= i <= last]
    assert torch.equal(frame.ws[untouched], pivot[untouched])
    # for a W pivot (one w on every layer) the edited layers then sit exactly at coordinate a (sd units)
    w_pivot = pivot[:1].expand(L, C).clone()
    (frame,) = E.frames(w_pivot, [spec], [E.resolve(spec, L, C)])
    coord = (frame.ws[first].double().numpy() - files["mean"]) @ files["comp"][k] / files["std"][k]
    assert abs(coord - a) < 1e-5 * (abs(a) + 10)


def test_several_edits_sum_each_from_the_pivot(files, pivot):
    specs = E.parse_edits(
        [f"{files['dir'] / 'd_1c.pt'}=+2@0-4", f"{files['dir'] / 'pca.pt'}:1=+3", f"{files['dir'] / 'd_lc.npy'}=-1"]
    )
    (frame,) = E.frames(pivot, specs, [E.resolve(s, L, C) for s in specs])
    p = pivot.numpy()
    want = (
        p.astype(np.float64)
        + (interfacegan_ref(p, files["d"][None], 2.0, 0, 4) - p)
        + (ganspace_ref(p, files["mean"], files["comp"][1], float(files["std"][1]), 3.0, 0, L - 1) - p)
        + (interfacegan_ref(p, files["per_layer"], -1.0, 0, L - 1) - p)
    )
    _close(frame.ws, want)
    assert frame.label == "d_1c.pt+2@0-4_pca.pt_1+3_d_lc.npy-1"


def test_a_sweep_gives_its_frames_in_order_with_the_other_edits_on_each(files, pivot):
    specs = E.parse_edits([f"{files['dir'] / 'd_1c.pt'}=-3:3:7", f"{files['dir'] / 'pca.pt'}:0=+1"])
    out = E.frames(pivot, specs, [E.resolve(s, L, C) for s in specs])
    values = [-3, -2, -1, 0, 1, 2, 3]
    assert [f.values[specs[0].text] for f in out] == values
    p = pivot.numpy()
    fixed = ganspace_ref(p, files["mean"], files["comp"][0], float(files["std"][0]), 1.0, 0, L - 1) - p
    for f, v in zip(out, values):
        _close(f.ws, interfacegan_ref(p, files["d"][None], v, 0, L - 1) + fixed)
    assert out[0].label == "d_1c.pt-3_pca.pt_0+1" and out[-1].label == "d_1c.pt+3_pca.pt_0+1"


def test_no_edit_is_the_pivot(pivot):
    (frame,) = E.frames(pivot, [], [])
    assert frame.label == "reconstruction" and torch.equal(frame.ws, pivot)


# ------------------------------------------------------------------------------------ grammar


@pytest.mark.parametrize(
    "text,target,component,values,layers",
    [
        ("age=+3", "age", None, (3.0,), None),
        ("age=-1.5", "age", None, (-1.5,), None),
        ("smile=2e-1", "smile", None, (0.2,), None),
        ("age=+3@0-8", "age", None, (3.0,), (0, 8)),
        ("age=+3@4", "age", None, (3.0,), (4, 4)),
        ("age=-3:3:7", "age", None, (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0), None),
        ("./dirs.pt:3=+2", "./dirs.pt", 3, (2.0,), None),
        ("./dirs.pt:3=-1:1:3@2-5", "./dirs.pt", 3, (-1.0, 0.0, 1.0), (2, 5)),
        ("/a=b/c.npy=+1", "/a=b/c.npy", None, (1.0,), None),  # '=' in a path: the last one separates
    ],
)
def test_grammar(text, target, component, values, layers):
    spec = E.parse_edit(text)
    assert (spec.target, spec.component, spec.values, spec.layers) == (target, component, values, layers)
    assert spec.sweep == (len(values) > 1)


@pytest.mark.parametrize(
    "text,needle",
    [
        ("age", "NAME=VALUE"),
        ("=3", "NAME=VALUE"),
        ("age=", "NAME=VALUE"),
        ("age=three", "not a number"),
        ("age=+3x", "not a number"),
        ("age=1:2", "START:STOP:N"),
        ("age=-3:3:1", "from 2 to"),
        ("age=-3:3:x", "from 2 to"),
        ("age=-3:3:100000", "from 2 to"),
        ("age=+1@8-2", "empty"),
        ("age=+1@a-b", "A-B"),
        ("age=+1@", "A-B"),
    ],
)
def test_grammar_errors(text, needle):
    with pytest.raises(E.EditSyntaxError, match=needle) as info:
        E.parse_edit(text)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


def test_two_sweeps_are_refused():
    with pytest.raises(E.EditSyntaxError, match="only one sweep"):
        E.parse_edits(["age=-3:3:7", "smile=-1:1:3"])


def test_resolution_errors(files, pivot):
    with pytest.raises(E.EditSyntaxError, match="unknown direction 'agee'; known: age, smile, pose, eye_openness"):
        E.resolve(E.parse_edit("agee=+1"), L, C)
    with pytest.raises(E.EditSyntaxError, match="layers 3-10 are out of range; this generator has layers 0-9"):
        E.resolve(E.parse_edit(f"{files['dir'] / 'd_1c.pt'}=+1@3-10"), L, C)
    with pytest.raises(E.DirectionError, match="direction file not found"):
        E.resolve(E.parse_edit("./missing.npy=+1"), L, C)
    with pytest.raises(E.DirectionError, match=r"shaped \[1, 64\], but this generator's ws are \[18, 512\]"):
        E.resolve(E.parse_edit(f"{files['dir'] / 'd_1c.pt'}=+1"), 18, 512)
    with pytest.raises(E.DirectionError, match=r"shaped \[10, 64\], but this generator's ws are \[12, 64\]"):
        E.resolve(E.parse_edit(f"{files['dir'] / 'd_lc.npy'}=+1"), 12, C)
    with pytest.raises(E.DirectionError, match="pick one as"):
        E.resolve(E.parse_edit(f"{files['dir'] / 'pca.pt'}=+1"), L, C)
    with pytest.raises(E.EditSyntaxError, match="components 0..5"):
        E.resolve(E.parse_edit(f"{files['dir'] / 'pca.pt'}:6=+1"), L, C)


def test_direction_files_never_run_code(tmp_path):
    import os
    import pickle

    sentinel = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Payload(), protocol=2))
    with pytest.raises(E.DirectionError, match=r"evil.pt: refused: .*\(posix.system\).* which pti never runs"):
        E.load_direction_file(evil)
    assert not sentinel.exists()


def test_ffhq_presets_on_the_tiny_generator_say_what_they_are_for():
    G = tiny_generator()
    with pytest.raises(E.DirectionError, match=r"1024 px FFHQ generator .* ws \[10, 64\]\. .*pti directions ganspace"):
        E.resolve(E.parse_edit("age=+3"), G.num_ws, G.w_dim)


def test_an_uncached_preset_says_how_to_get_it(tmp_path):
    reg = W.Registry(cache_dir=tmp_path / "empty")
    with pytest.raises(WeightsError, match="interfacegan_age.pt .* `pti weights fetch interfacegan-age`"):
        E.resolve(E.parse_edit("age=+3"), 18, 512, registry=reg)


# ------------------------------------------------------------------------------------ the real FFHQ files

needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"{FIXTURES} is absent (it ships beside the repo, not in it)"
)


@needs_fixtures
def test_real_direction_files_have_the_documented_layouts():
    for name in ("age.pt", "smile.pt", "rotation.pt"):
        d = E.load_direction_file(FIXTURES / name)
        assert d.kind == "interfacegan" and tuple(d.vector.shape) == (1, 512)
        assert abs(float(d.vector.norm()) - 1) < 1e-5
    data = torch.load(FIXTURES / "ffhq_pca.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in data.items()} == {"mean": (1, 512), "comp": (80, 1, 512), "std": (80,)}
    comp = E.load_direction_file(FIXTURES / "ffhq_pca.pt", 54)
    assert comp.kind == "ganspace" and comp.vector.shape == (512,) and comp.std > 0


@needs_fixtures
def test_presets_resolve_through_the_registry_and_apply_the_authors_edits(tmp_path):
    reg = W.Registry(cache_dir=tmp_path / "cache")
    for entry, name in (
        ("interfacegan-age", "age.pt"),
        ("interfacegan-rotation", "rotation.pt"),
        ("ganspace-ffhq", "ffhq_pca.pt"),
    ):
        reg.import_file(FIXTURES / name, name=entry)  # the registry's published checksums must match
    G = ffhq_shaped_generator()
    with torch.no_grad():
        pivot = G.mapping(torch.from_numpy(np.random.RandomState(0).randn(1, 512)).float(), truncation_psi=0.7)[0]
    specs = E.parse_edits(["age=+3", "pose=-1", "eye_openness=5"])
    dirs = [E.resolve(s, 18, 512, registry=reg) for s in specs]
    assert dirs[2].layers == (7, 7)  # the authors' (54, 7, 8): layer 7 only
    (frame,) = E.frames(pivot, specs, dirs)
    age = torch.load(FIXTURES / "age.pt", weights_only=True).numpy()
    rot = torch.load(FIXTURES / "rotation.pt", weights_only=True).numpy()
    pca = {k: v.numpy() for k, v in torch.load(FIXTURES / "ffhq_pca.pt", weights_only=True).items()}
    p = pivot.numpy()
    want = (
        p.astype(np.float64)
        + (interfacegan_ref(p, age, 3.0, 0, 17) - p)
        + (interfacegan_ref(p, rot, -1.0, 0, 17) - p)
        + (ganspace_ref(p, pca["mean"][0], pca["comp"][54, 0], float(pca["std"][54]), 5.0, 7, 7) - p)
    )
    _close(frame.ws, want)


# ------------------------------------------------------------------------------------ GANSpace


@pytest.fixture(scope="module")
def tiny_pca():
    return E.ganspace(tiny_generator(), components=16, samples=5000, seed=3, batch=1024)


def test_ganspace_components_are_orthonormal_and_sorted(tiny_pca):
    comp, std = tiny_pca["comp"][:, 0].double(), tiny_pca["std"]
    assert tuple(tiny_pca["comp"].shape) == (16, 1, C) and tuple(tiny_pca["mean"].shape) == (1, C)
    torch.testing.assert_close(comp @ comp.T, torch.eye(16, dtype=torch.float64), rtol=0, atol=1e-6)
    assert torch.all(std[:-1] >= std[1:]) and std[-1] > 0


def test_ganspace_matches_an_independent_pca_of_the_same_samples(tiny_pca):
    G = tiny_generator()
    z = np.random.RandomState(3).randn(5000, G.z_dim)
    with torch.no_grad():
        w = G.mapping(torch.from_numpy(z).float(), truncation_psi=1.0)[:, 0].double().numpy()
    centered = w - w.mean(0)
    coords = centered @ tiny_pca["comp"][:, 0].double().numpy().T
    np.testing.assert_allclose(coords.std(0), tiny_pca["std"].double().numpy(), rtol=1e-4)  # sd along each component
    eigval = np.sort(np.linalg.eigvalsh(np.cov(centered.T, bias=True)))[::-1][:16]
    np.testing.assert_allclose(tiny_pca["std"].double().numpy() ** 2, eigval, rtol=1e-4)


def test_ganspace_same_seed_same_file_and_another_seed_differs(tmp_path, tiny_pca):
    again = E.ganspace(tiny_generator(), components=16, samples=5000, seed=3, batch=333)  # batch size does not matter
    for k in tiny_pca:
        torch.testing.assert_close(again[k], tiny_pca[k], rtol=0, atol=1e-6 * float(tiny_pca[k].abs().max()))
    a = E.save_ganspace(tiny_pca, tmp_path / "a.pt")
    b = E.save_ganspace(
        E.ganspace(tiny_generator(), components=16, samples=5000, seed=3, batch=1024), tmp_path / "b.pt"
    )
    assert a.read_bytes() == b.read_bytes()
    other = E.ganspace(tiny_generator(), components=16, samples=5000, seed=4, batch=1024)
    assert not torch.allclose(other["mean"], tiny_pca["mean"])
    loaded = E.load_direction_file(a, 2)  # and the file serves as directions, the ffhq_pca.pt layout
    assert loaded.kind == "ganspace" and loaded.std == pytest.approx(float(tiny_pca["std"][2]))
