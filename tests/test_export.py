"""Export: ONNX (ONNX Runtime's CPU provider), AOTInductor, and TensorRT (skipped without it), against PyTorch.

Tolerances, on images that span [-1, 1] (range 2):
- fp32: 1e-4 absolute. The exported graph runs the same reference arithmetic in another order (non-fused
  modulated convolution, other kernels); float32 rounding (2^-24 relative) over about 20 layers whose
  activations stay within a few units gives ~1e-5 (measured 4e-6 to 2e-5, on 64 px and 1024 px).
- fp16: 1e-2 of the range (2e-2 absolute): weights and activations rounded to 2^-11 relative, about
  1e-3 per layer, accumulating over the layers (measured 5e-3 to 1.1e-2 on the tiny generator).
A swap test also checks that the wrong weights are far outside these tolerances, so it can fail.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clirun import error_lines, files_under, no_traceback, run_pti, start_pti
from helpers import tuned_tiny
from pti.engine.checkpoint import generator_hash
from pti.engine.generator import tiny_generator
from pti.engine.identity import Identity
from pti.errors import ExportError

onnx = pytest.importorskip("onnx", reason="pip install 'pti[export]'")
ort = pytest.importorskip("onnxruntime", reason="pip install 'pti[export]'")

from pti.export import load_source  # noqa: E402
from pti.export.contract import TOLERANCE, Source, load_contract  # noqa: E402
from pti.export.onnx import OnnxBackend, export_onnx  # noqa: E402

FP32, FP16 = TOLERANCE["fp32"], TOLERANCE["fp16"]


def _torch(G, ws):
    with torch.no_grad():
        return G.synthesis(ws, noise_mode="const", force_fp32=True)


def _ws(n, seed=0):
    g = torch.Generator().manual_seed(seed)  # a fixed input; same on every machine up to float rounding
    return torch.randn(n, 10, 64, generator=g) * 0.5


@pytest.fixture(scope="module")
def people(tmp_path_factory):
    """Two people tuned on the built-in tiny generator (exact weights in the files), and their ONNX exports."""
    tmp = tmp_path_factory.mktemp("people")
    base = tiny_generator()
    digest = generator_hash(base)
    out = {"tmp": tmp, "base": base, "hash": digest}
    for name, seed in (("a", 3), ("b", 5)):
        _, G, pivot = tuned_tiny(seed=seed)
        path = Identity.from_tuning(base, G, pivot, digest, "builtin:tiny", exact=True).save(tmp / f"{name}.pti")
        out[name] = path
        out[f"G_{name}"] = Identity.load(path).apply(base, digest)
    out["onnx_a"] = export_onnx(load_source(out["a"]), tmp / "a-onnx").parent
    from pti.engine import edits as E

    out["dirs"] = E.save_ganspace(E.ganspace(base, components=4, samples=2000, seed=0), tmp / "dirs.pt")
    return out


def test_onnx_graph_keeps_its_promises(people):
    folder, c = load_contract(people["onnx_a"], "onnx")
    model = onnx.load(str(folder / c["files"]["graph"]))
    onnx.checker.check_model(model)
    assert {n.domain for n in model.graph.node} <= {""}
    assert max(o.version for o in model.opset_import if o.domain == "") >= 17
    assert c["opset"] >= 17
    # the input and output, batch dynamic
    (inp, *overridable), (outp,) = model.graph.input, model.graph.output
    assert inp.name == "ws" and inp.type.tensor_type.shape.dim[0].dim_param
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [10, 64]
    assert outp.name == "images" and outp.type.tensor_type.shape.dim[0].dim_param
    # every tuned tensor is an initializer under its identity-file name, holding that person's weights
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    params = dict(people["G_a"].named_parameters())
    synth = [n for n in params if n.startswith("synthesis.")]
    assert sorted(e["tensor"] for e in c["weights"]) == sorted(synth)
    # listed as inputs too (ONNX's overridable initializers), so no runtime folds them into constants
    assert sorted(i.name for i in overridable) == sorted(e["name"] for e in c["weights"])
    for e in c["weights"]:
        assert e["name"] in inits and e["dtype"] == "float32"
        np.testing.assert_array_equal(inits[e["name"]], params[e["tensor"]].numpy())
    assert c["base_hash"] == people["hash"] and c["batch"] == {"min": 1, "opt": 8, "max": 16}
    # the sample is the person's pivot, and its checksum is what PyTorch renders from it
    from pti.export.contract import checksum, decode_array

    sample = decode_array(c["sample"]["input"])
    assert torch.equal(sample[0], Identity.load(people["a"]).pivot)
    assert np.allclose(c["sample"]["pooled_output"], checksum(_torch(people["G_a"], sample)), atol=1e-6)
    assert c["verified"]["max_abs_diff_vs_torch_fp32"] <= FP32


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_onnx_runtime_matches_torch_fp32_at_every_batch_from_one_graph(people, batch):
    be = OnnxBackend(people["onnx_a"])  # the graph's own weights: person A
    ws = _ws(batch)
    got, want = be.render(ws), _torch(people["G_a"], ws)
    assert got.shape == (batch, 3, 64, 64)
    assert (got - want).abs().max() <= FP32


def test_verification_runs_the_torch_reference_with_tf32_off_whatever_the_caller_set(people, tmp_path):
    """CUDA's default (TF32 on in cuDNN) would round every convolution of the reference past the fp32 tolerance:
    the check sets fp32's flags itself, puts the caller's back, and records them in the contract. (On a CPU
    the flags change no pixel, but they are set all the same: a hook sees them during the reference's forward.)"""
    from pti.export.contract import torch_reference

    fp32 = {"tf32_matmul": False, "tf32_cudnn": False}
    G, seen = people["G_a"], []
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as on CUDA, and more
    try:
        hook = G.synthesis.register_forward_pre_hook(
            lambda module, args: seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        )
        try:
            images, flags = torch_reference(G, _ws(1))
        finally:
            hook.remove()  # before the export copies the network
        _, contract = load_contract(export_onnx(Source(G, people["hash"], "builtin:tiny"), tmp_path / "x").parent)
        after = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert seen == [(False, False)] and flags == fp32 and images.shape == (1, 3, 64, 64)
    assert contract["verified"]["reference"] == {"precision": "fp32", "flags": fp32}
    assert contract["verified"]["flags"] == fp32  # the export's own run, too
    assert after == (True, True)  # the caller's flags are back


@pytest.mark.slow
def test_initializer_names_are_the_same_for_every_identity(people, tmp_path):
    base = onnx.load(
        str(export_onnx(load_source(None), tmp_path / "base").parent / "model.onnx"), load_external_data=False
    )
    a = onnx.load(str(people["onnx_a"] / "model.onnx"), load_external_data=False)
    assert [i.name for i in base.graph.initializer] == [i.name for i in a.graph.initializer]


def test_swapping_b_into_a_graph_by_initializer_name_renders_b(people):
    """The refit mapping, proven with plain ONNX Runtime and the contract alone (no pti runtime code)."""
    folder, c = load_contract(people["onnx_a"])
    ws = _ws(3, seed=1)
    options = ort.SessionOptions()
    keep = []
    params = dict(people["G_b"].named_parameters())
    for e in c["weights"]:
        value = ort.OrtValue.ortvalue_from_numpy(params[e["tensor"]].numpy().astype(e["dtype"]))
        keep.append(value)
        options.add_initializer(e["name"], value)
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(["images"], {"ws": ws.numpy()})[0])
    want_b, want_a = _torch(people["G_b"], ws), _torch(people["G_a"], ws)
    assert (got - want_b).abs().max() <= FP32
    assert (want_a - want_b).abs().max() > 100 * FP32  # A's render is far away: the swap really happened
    # and pti's backend does the same from a tuned generator
    assert (OnnxBackend(folder, people["G_b"]).render(ws) - want_b).abs().max() <= FP32


@pytest.mark.slow
def test_fp16_export_is_within_one_percent_of_the_image_range(people, tmp_path):
    folder = export_onnx(load_source(people["a"]), tmp_path / "fp16", precision="fp16").parent
    _, c = load_contract(folder)
    model = onnx.load(str(folder / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    assert all(inits[e["name"]].data_type == onnx.TensorProto.FLOAT16 for e in c["weights"])
    assert c["input"]["dtype"] == "float32" and c["output"]["dtype"] == "float32"
    ws = _ws(8, seed=2)
    for G, be in ((people["G_a"], OnnxBackend(folder)), (people["G_b"], OnnxBackend(folder, people["G_b"]))):
        diff = (be.render(ws) - _torch(G, ws)).abs().max() / 2.0
        assert diff <= 1e-2
        assert diff > 1e-6  # it really computed in fp16 (an fp32 graph would be ~1e-6)


def test_a_graph_whose_weights_were_folded_is_refused(people, tmp_path):
    """A deliberately wrong export: the exporter's optimizer folds `weight * gain` into anonymous constants.
    The check that guards swapping must catch it."""
    from pti.export.contract import ExportSynthesis
    from pti.export.onnx import _check_graph

    module = ExportSynthesis(people["G_a"])
    path = tmp_path / "folded.onnx"
    torch.onnx.export(
        module,
        (_ws(2),),
        str(path),
        dynamo=True,
        input_names=["ws"],
        output_names=["images"],
        opset_version=18,
        optimize=True,
        external_data=False,
    )
    with pytest.raises(ExportError, match="folded .* tuned weights"):
        _check_graph(onnx, path, module, 18)


@pytest.mark.slow
def test_external_data_on_request(people, tmp_path):
    folder = export_onnx(load_source(people["a"]), tmp_path / "ext", external_data=True).parent
    _, c = load_contract(folder)
    assert c["files"] == {"graph": "model.onnx", "external_data": "model.onnx.data"}
    assert (folder / "model.onnx").stat().st_size < (folder / "model.onnx.data").stat().st_size
    ws = _ws(2)
    assert (OnnxBackend(folder, people["G_b"]).render(ws) - _torch(people["G_b"], ws)).abs().max() <= FP32


def test_batch_outside_the_profile_and_another_base_are_refused(people, tmp_path):
    be = OnnxBackend(people["onnx_a"])
    with pytest.raises(ExportError, match="outside the export's batch profile 1-16"):
        be.render(_ws(17))
    with pytest.raises(ExportError, match="base generator"):
        OnnxBackend(people["onnx_a"], base_hash="0" * 64)


@pytest.mark.slow
def test_onnx_1024px_config_f_matches_torch(tmp_path):
    """The real size: config-f 1024 px (18 ws, 512 channels, fp16 blocks as in ffhq.pkl), random weights."""
    from pti.engine.generator import Generator

    torch.manual_seed(0)
    G = (
        Generator(
            z_dim=512,
            w_dim=512,
            img_resolution=1024,
            img_channels=3,
            synthesis_kwargs=dict(num_fp16_res=4, conv_clamp=256),
        )
        .eval()
        .requires_grad_(False)
    )
    folder = export_onnx(Source(G, generator_hash(G), "random config-f"), tmp_path / "big", batch=(1, 2, 2)).parent
    ws = torch.randn(2, 18, 512, generator=torch.Generator().manual_seed(0))
    got, want = OnnxBackend(folder, G).render(ws), _torch(G, ws)
    assert got.shape == (2, 3, 1024, 1024)
    assert (got - want).abs().max() <= FP32


# ----------------------------------------------------------------------------- render backends and the CLI


def _u8(path):
    from PIL import Image

    return np.asarray(Image.open(path)).astype(int)


def test_render_backend_onnx_gives_the_torch_pixels(people, tmp_path):
    import pti

    edit = [f"{people['dirs']}:0=-2:2:3"]
    ref = pti.render(people["b"], edit, tmp_path / "torch", device="cpu")
    got = pti.render(people["b"], edit, tmp_path / "onnx", device="cpu", backend="onnx", engine=people["onnx_a"])
    assert got.report["backend"] == "onnx"
    fp32 = {"tf32_matmul": False, "tf32_cudnn": False}  # as the export was verified
    assert got.report["impl"] == {
        "requested": "auto",
        "impl": "onnx",
        "ops": {},
        "precision": "fp32",
        "flags": fp32,
        "compile_seconds": None,
    }
    for label in ref.labels:  # one 8-bit level at most: fp32 rounding (1e-4 << 1/127.5) at a rounding boundary
        assert (
            np.abs(
                _u8(tmp_path / "torch" / "frames" / f"{label}.png") - _u8(tmp_path / "onnx" / "frames" / f"{label}.png")
            ).max()
            <= 1
        )


def test_render_backend_exports_the_base_once_into_the_cache(people, tmp_path, monkeypatch):
    import pti
    from pti.export import default_export_dir

    monkeypatch.setenv("PTI_HOME", str(tmp_path / "home"))
    pti.render(people["a"], [], tmp_path / "o1", device="cpu", backend="onnx")
    folder = default_export_dir(people["hash"], "onnx", "fp32")
    _, c = load_contract(folder)
    assert c["identity"] is None and c["base_hash"] == people["hash"]  # the base, not the person
    stamp = (folder / "model.onnx").stat().st_mtime_ns
    res = pti.render(people["b"], [], tmp_path / "o2", device="cpu", backend="onnx")
    assert (folder / "model.onnx").stat().st_mtime_ns == stamp  # reused, B's weights swapped in
    want = _u8(tmp_path / "o2" / "reconstruction.png")
    from pti.engine.images import to_uint8

    assert (
        np.abs(want - to_uint8(_torch(people["G_b"], Identity.load(people["b"]).pivot[None]))[0].astype(int)).max() <= 1
    )
    assert res.report["engine"] == str(folder)


@pytest.mark.slow
def test_cli_export_writes_the_folder_and_a_summary(people, tmp_path):
    p = run_pti("export", people["a"], "--format", "onnx", "-o", tmp_path / "x")
    assert p.returncode == 0, p.stderr
    assert files_under(tmp_path / "x") == ["contract.json", "model.onnx"]
    assert "swappable by name" in p.stdout and "differs from PyTorch by" in p.stdout
    again = run_pti("export", people["a"], "-o", tmp_path / "x")
    assert again.returncode == 1 and "already holds an export" in again.stderr and no_traceback(again)


def test_info_describes_an_export_folder(people, tmp_path):
    p = run_pti("info", people["onnx_a"])
    assert p.returncode == 0, p.stderr
    assert "onnx (fp32), opset 18" in p.stdout and "66 tuned tensors swappable by name" in p.stdout
    assert "[batch 1-16 (opt 8), 10, 64]" in p.stdout and "from PyTorch" in p.stdout
    record = json.loads(run_pti("info", people["onnx_a"] / "contract.json", "--json").stdout)
    assert record["kind"] == "onnx" and record["base_hash"] == people["hash"] and record["bytes"] > 0
    p = run_pti("info", tmp_path)
    assert p.returncode == 1 and "is a folder" in p.stderr and no_traceback(p)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "onnnx"], "onnnx"),
        (["--refit", "x"], "--refit is for --format tensorrt"),
        (["--max-batch", "0"], "max-batch"),
    ],
)
def test_cli_export_usage_errors_exit_2(people, tmp_path, args, message):
    p = run_pti("export", people["a"], "-o", tmp_path / "x", *args)
    assert p.returncode == 2 and message in p.stderr and no_traceback(p)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_cli_errors_are_one_line(people, tmp_path):
    other = tmp_path / "other.safetensors"
    from pti.engine.checkpoint import save_generator

    G = tiny_generator()
    with torch.no_grad():
        G.synthesis.b4.conv1.bias.add_(1)
    save_generator(G, other)
    cases = [
        (["export", people["a"], "--network", other, "-o", tmp_path / "e1"], "tuned on generator"),
        (["render", people["a"], "--backend", "onnx", "--engine", tmp_path / "nowhere"], "no contract.json"),
        (
            [
                "render",
                people["a"],
                "--backend",
                "onnx",
                "--engine",
                people["onnx_a"],
                "--batch",
                "32",
                "-e",
                f"{people['dirs']}:0=-1:1:20",
                "-o",
                tmp_path / "r",
            ],
            "outside the export's batch profile",
        ),
        (
            [
                "render",
                people["a"],
                "--backend",
                "onnx",
                "--engine",
                people["onnx_a"],
                "--network",
                other,
                "-o",
                tmp_path / "r2",
            ],
            "tuned on generator",
        ),
    ]
    for args, message in cases:
        p = run_pti(*args)
        assert p.returncode == 1, (args, p.stderr)
        lines = error_lines(p.stderr)
        assert len(lines) == 1 and message in lines[0] and no_traceback(p), (args, p.stderr)
    assert not (tmp_path / "e1").exists() or files_under(tmp_path / "e1") == []


def test_a_contract_for_another_base_is_refused(people, tmp_path):
    """An export folder whose contract names another base generator: the identity's weights do not belong there."""
    import shutil

    folder = tmp_path / "tampered"
    shutil.copytree(people["onnx_a"], folder)
    c = json.loads((folder / "contract.json").read_text())
    c["base_hash"] = "f" * 64
    (folder / "contract.json").write_text(json.dumps(c))
    p = run_pti("render", people["b"], "--backend", "onnx", "--engine", folder, "-o", tmp_path / "r")
    assert p.returncode == 1 and "export was made from base generator ffffffff" in p.stderr and no_traceback(p)
    (folder / "model.onnx").unlink()
    p = run_pti("render", people["b"], "--backend", "onnx", "--engine", folder, "-o", tmp_path / "r")
    assert p.returncode == 1 and "incomplete (model.onnx is missing)" in p.stderr


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
@pytest.mark.slow
def test_interrupted_export_leaves_nothing(people, tmp_path, signame):
    """The signal arrives after model.onnx is written into the staging folder, before the contract."""
    out = tmp_path / "x"
    proc = start_pti("export", people["a"], "-o", out, wrapper=["pti.export.onnx:_check_graph", signame, "--"])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Kept: nothing" in err and "Traceback" not in err
    assert files_under(out) == []


# ----------------------------------------------------------------------------- AOTInductor


@pytest.fixture(scope="module")
def aoti_a(people):
    from pti.export.aoti import export_aoti

    return export_aoti(load_source(people["a"]), people["tmp"] / "a-aoti", batch=(1, 4, 8)).parent


@pytest.mark.slow
def test_aoti_package_matches_torch_and_swaps_identities_without_recompiling(people, aoti_a):
    from pti.export.aoti import AotiBackend

    folder, c = load_contract(aoti_a, "aoti")
    assert sorted(c["files"].values()) == ["model.pt2", "weights.safetensors"]
    stamp = (folder / "model.pt2").stat().st_mtime_ns
    ws = _ws(8, seed=3)
    for batch in (1, 3, 8):
        assert (AotiBackend(folder).render(ws[:batch]) - _torch(people["G_a"], ws[:batch])).abs().max() <= FP32
    b = AotiBackend(folder, people["G_b"])
    assert (b.render(ws) - _torch(people["G_b"], ws)).abs().max() <= FP32
    assert (_torch(people["G_a"], ws) - _torch(people["G_b"], ws)).abs().max() > 100 * FP32
    a = AotiBackend(folder, people["G_a"])  # the same loaded package, back to A, and B again on demand
    assert (a.render(ws) - _torch(people["G_a"], ws)).abs().max() <= FP32
    assert (b.render(ws[:2]) - _torch(people["G_b"], ws[:2])).abs().max() <= FP32
    assert (folder / "model.pt2").stat().st_mtime_ns == stamp
    with pytest.raises(ExportError, match="batch profile 1-8"):
        a.render(_ws(9))


@pytest.mark.slow
def test_aoti_package_of_another_torch_or_device_is_refused(aoti_a, tmp_path):
    import shutil

    from pti.export.aoti import AotiBackend

    for field, value, message in (
        ("torch", "2.0.0", "compiled by torch 2.0.0"),
        ("device", "cuda: NVIDIA H100 sm_90", "compiled for cuda"),
    ):
        folder = tmp_path / field
        shutil.copytree(aoti_a, folder)
        c = json.loads((folder / "contract.json").read_text())
        c["built_with"][field] = value
        (folder / "contract.json").write_text(json.dumps(c))
        with pytest.raises(ExportError, match=message):
            AotiBackend(folder, device="cpu")


@pytest.mark.slow
def test_render_backend_aoti_gives_the_torch_pixels(people, aoti_a, tmp_path):
    import pti

    edit = [f"{people['dirs']}:1=+2"]
    ref = pti.render(people["b"], edit, tmp_path / "torch", device="cpu")
    got = pti.render(people["b"], edit, tmp_path / "aoti", device="cpu", backend="aoti", engine=aoti_a)
    (label,) = ref.labels
    assert got.report["backend"] == "aoti"
    assert np.abs(_u8(tmp_path / "torch" / f"{label}.png") - _u8(tmp_path / "aoti" / f"{label}.png")).max() <= 1


# ----------------------------------------------------------------------------- TensorRT


def test_tensorrt_without_tensorrt_is_one_line(people, tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here; this checks the message where it is not")
    except ImportError:
        pass
    p = run_pti("export", people["a"], "--format", "tensorrt", "-o", tmp_path / "t")
    assert p.returncode == 1 and "TensorRT is not installed" in p.stderr and no_traceback(p)
    assert not (tmp_path / "t").exists() or files_under(tmp_path / "t") == []


@pytest.mark.gpu
def test_tensorrt_engine_refits_identities(people, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (its wheels fetch libraries from NVIDIA's index)")
    from pti.export.tensorrt import TensorRTBackend, export_tensorrt, refit

    folder = export_tensorrt(load_source(people["a"], device="cuda"), tmp_path / "a-trt", batch=(1, 4, 8)).parent
    ws = _ws(4, seed=4)
    assert (TensorRTBackend(folder).render(ws) - _torch(people["G_a"], ws)).abs().max() / 2 <= 1e-2
    b_folder = refit(folder, load_source(people["b"], device="cuda"), tmp_path / "b-trt").parent
    assert (TensorRTBackend(b_folder).render(ws) - _torch(people["G_b"], ws)).abs().max() / 2 <= 1e-2
    assert (
        TensorRTBackend(folder, people["G_b"].clone().cuda(), cuda_graph=True).render(ws) - _torch(people["G_b"], ws)
    ).abs().max() / 2 <= 1e-2
