"""The configs above the engine (`RunConfig`, `RenderConfig`, `ExportConfig`) refuse bad values at construction,
one line naming the config, the field, the rule and the value, as `InvertConfig` and `TuneConfig` do."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_accepted, assert_refused, field_names, refused_cases
from pti.engine.invert import InvertConfig
from pti.engine.tune import TuneConfig
from pti.export.config import ExportConfig
from pti.pipeline import RunConfig, Weights
from pti.rendering import RenderConfig

NAN, INF = math.nan, math.inf

RUN_REFUSED = {
    "network": [Path("ffhq.pkl"), 3],  # a str: the config travels to workers and into the identity as text
    "device": [None, torch.device("cpu"), 0],
    "align": [1, "yes", None],
    "face": [-1, 1.0, True],
    "invert_cfg": [None, {"steps": 4}, TuneConfig()],
    "tune_cfg": [None, {"max_steps": 4}, InvertConfig()],
    "exact": [0, None],
    "allow_fallback": [1, "no"],
    "threads": [True, 1.5],  # names and numbers are checked where they are applied
    "weights": ["~/.cache/pti", Path("cache")],
    "init": ["w+", None, "E4E"],
    "init_path": [Path("w.npz"), 3],
    "init_sha256": [b"ab", 3],
    "restyle_iterations": [0, 1001, 2.0, True],
}
RUN_EDGES = [
    dict(network=None, device="cpu", align=False, face=0, exact=True, allow_fallback=False, threads=None),
    dict(network="builtin:tiny", device="cuda:1", face=7, threads="auto"),
    dict(threads=1, face=np.int64(2)),
]

RENDER_REFUSED = {
    "network": [3, b"ffhq.pkl"],
    "device": [None, 0],
    "batch": [0, -1, 8.0, True],
    "compare": [1, None],
    "gif_fps": [0.0, -8.0, NAN, INF, "8"],  # a frame lasts 1000 / fps ms
    "mp4": [0, "no"],
    "backend": ["ort", "Torch", None],
    "engine": [3, b"dir"],
    "precision": ["fp64", "FP32", None],  # torch: fp32, tf32, bf16; an export: fp32, fp16
    "impl": ["cuda", "Triton", None],  # auto, ref, compile, triton
    "threads": [True, 2.5],
    "force": [1, None],
    "paste": [1, "yes", None],
    "photo": [3, b"photo.jpg", "photo.jpg"],  # a path, and only with paste=True
    "paste_format": ["PNG", "jpg", None],  # auto, png, jpeg
    "stitch": [1, None, True],  # a bool, and only with paste=True
    "stitch_steps": [0, 10_001, 2.0],
    "stitch_threshold": [-1e-3, NAN, "0"],
}
RENDER_EDGES = [
    dict(
        batch=1,
        gif_fps=1e-3,
        backend="tensorrt",
        precision="fp16",
        network="g.pkl",
        engine="exports/a",
        threads="torch",
    ),
    dict(batch=np.int64(256), compare=True, mp4=True, force=True, network=Path("g.pkl"), engine=Path("e"), threads=4),
    dict(precision="bf16", impl="compile"),
    dict(paste=True, photo="photo.jpg", paste_format="jpeg"),
    dict(paste=True, photo=Path("photo.png"), paste_format="png", stitch=True, stitch_steps=1, stitch_threshold=0.0),
    dict(precision="tf32", impl="triton"),
    dict(backend="onnx", precision="fp32", impl="auto"),
]

EXPORT_REFUSED = {
    "precision": ["bf16", "FP16", None],
    "batch": [(0, 8, 16), (1, 16, 8), (2, 1, 4), (1, 8), [1, 8, 16], (1, 8.0, 16), (True, 8, 16)],
    "external_data": [0, 1, "yes"],
    "device": [None, 0],
}
EXPORT_EDGES = [
    dict(precision="fp16", batch=(1, 1, 1), external_data=True, device="cuda"),
    dict(batch=(4, 4, 1024), external_data=False),
    dict(external_data=None, batch=(np.int64(1), 2, 3)),
]


@pytest.mark.parametrize(
    "cls,refused",
    [(RunConfig, RUN_REFUSED), (RenderConfig, RENDER_REFUSED), (ExportConfig, EXPORT_REFUSED)],
    ids=["RunConfig", "RenderConfig", "ExportConfig"],
)
def test_every_field_has_refused_values(cls, refused) -> None:
    assert set(refused) == field_names(cls)


@pytest.mark.parametrize("name,value", refused_cases(RUN_REFUSED))
def test_a_bad_run_config_is_refused_naming_the_field(name, value) -> None:
    assert_refused(RunConfig, name, value)


@pytest.mark.parametrize("name,value", refused_cases(RENDER_REFUSED))
def test_a_bad_render_config_is_refused_naming_the_field(name, value) -> None:
    assert_refused(RenderConfig, name, value)


@pytest.mark.parametrize(
    "fields,name,needle",
    [
        (dict(precision="fp16"), "precision", "fp16 is an export's precision"),
        (dict(backend="onnx", precision="bf16"), "precision", "bf16 is a precision of the torch backend"),
        (dict(backend="tensorrt", precision="tf32"), "precision", "tf32 is a precision of the torch backend"),
        (dict(backend="aoti", impl="compile"), "impl", "compile is for the torch backend"),
        (dict(backend="onnx", impl="ref"), "impl", "ref is for the torch backend"),
    ],
)
def test_render_options_that_do_not_fit_the_backend_are_refused(fields, name, needle) -> None:
    """One --precision and one --impl for every backend: the torch backend computes in fp32, tf32 or bf16 by
    any implementation; an export renders its fp32 or fp16 graph as its runtime built it."""
    with pytest.raises(ValueError, match=rf"^RenderConfig\.{name}: {needle}[^\n]*$"):
        RenderConfig(**fields)


@pytest.mark.parametrize("name,value", refused_cases(EXPORT_REFUSED))
def test_a_bad_export_config_is_refused_naming_the_field(name, value) -> None:
    assert_refused(ExportConfig, name, value)


@pytest.mark.parametrize(
    "cls,edges",
    [(RunConfig, e) for e in RUN_EDGES]
    + [(RenderConfig, e) for e in RENDER_EDGES]
    + [(ExportConfig, e) for e in EXPORT_EDGES],
)
def test_the_edges_of_each_range_are_accepted(cls, edges) -> None:
    assert_accepted(cls, edges)


def test_a_run_config_carries_a_registry_as_what_rebuilds_it(tmp_path) -> None:
    from helpers import standin_registry

    reg = standin_registry(tmp_path / "cache")
    config = RunConfig(weights=Weights.of(reg))
    rebuilt = config.registry()
    assert rebuilt.cache_dir == reg.cache_dir and rebuilt.entries == reg.entries
    assert RunConfig().registry() is None and Weights.of(None) is None
    import pickle

    assert pickle.loads(pickle.dumps(config)) == config  # what a spawned worker receives
