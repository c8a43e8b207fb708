"""stylegan2-ada-pytorch .pkl loading through the restricted unpickler, including hostile pickles.

The pickles are built in NVIDIA's real layout by `helpers.write_nvidia_pickle` / `as_persistent`:
stand-in `torch_utils.persistence` and `dnnlib.util` modules are registered in sys.modules while
pickling, and each network object reduces to `torch_utils.persistence._reconstruct_persistent_obj(meta)`
with meta = {type, version, module_src, class_name, state}, state being the module's __dict__.
"""

from __future__ import annotations

import builtins
import collections
import os
import pickle
import subprocess
import sys

import pytest
import torch

from helpers import SMALL, Persistent, as_persistent, easy, fake_nvidia_modules, small_generator, write_nvidia_pickle
from pti.engine.checkpoint import load_checkpoint, load_generator
from pti.engine.generator import Generator
from pti.errors import CheckpointError


@pytest.fixture(scope="module")
def G_small() -> Generator:
    return small_generator()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_nvidia_snapshot_loads_exactly(tmp_path, G_small, protocol):
    path = write_nvidia_pickle(tmp_path / "snap.pkl", G_small, protocol=protocol)
    loaded = load_checkpoint(path)
    assert loaded.format == "stylegan2-ada-pkl" and "G_ema" in loaded.label
    G = loaded.generator
    assert G.init_kwargs == G_small.init_kwargs
    ref = G_small.state_dict()
    for k, v in G.state_dict().items():
        assert torch.equal(v, ref[k]), k
    z = torch.randn(2, 32)
    with torch.no_grad():
        assert torch.equal(G(z, None, noise_mode="const"), G_small(z, None, noise_mode="const"))


def test_takes_G_when_there_is_no_G_ema(tmp_path, G_small):
    with fake_nvidia_modules() as fake:
        obj = dict(G=as_persistent(G_small, fake, easy(fake, G_small.init_kwargs)))
        (tmp_path / "g.pkl").write_bytes(pickle.dumps(obj))
    assert "G" in load_checkpoint(tmp_path / "g.pkl").label


def test_positional_init_args(tmp_path, G_small):
    with fake_nvidia_modules() as fake:
        p = as_persistent(
            G_small,
            fake,
            {
                "mapping_kwargs": easy(fake, SMALL["mapping_kwargs"]),
                "synthesis_kwargs": easy(fake, SMALL["synthesis_kwargs"]),
            },
        )
        p.meta["state"]["_init_args"] = (32, 0, 32, 16, 3)
        (tmp_path / "pos.pkl").write_bytes(pickle.dumps({"G_ema": p}))
    assert load_generator(tmp_path / "pos.pkl").init_kwargs == G_small.init_kwargs


# ----------------------------------------------------------------------------- hostile pickles


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize(
    "make_payload",
    [
        lambda s: _Reduce(os.system, (f"touch {s}",)),
        lambda s: _Reduce(builtins.eval, (f"open({str(s)!r}, 'w').write('pwned')",)),
        lambda s: _Reduce(builtins.exec, (f"open({str(s)!r}, 'w').write('pwned')",)),
        lambda s: _Reduce(subprocess.Popen, (["touch", str(s)],)),
    ],
    ids=["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen"],
)
def test_hostile_callable_is_refused_and_nothing_runs(tmp_path, make_payload):
    sentinel = tmp_path / "SENTINEL"
    blob = pickle.dumps({"G_ema": make_payload(sentinel)})
    # Positive control: a plain unpickler really would run it (in a child, so the test stays clean).
    code = "import pickle,sys,time; pickle.loads(sys.stdin.buffer.read()); time.sleep(0.3)"
    subprocess.run([sys.executable, "-c", code], input=blob, check=True)
    assert sentinel.exists()
    sentinel.unlink()

    (tmp_path / "evil.pkl").write_bytes(blob)
    with pytest.raises(CheckpointError, match="refusing to load it") as e:
        load_generator(tmp_path / "evil.pkl")
    assert "evil.pkl" in str(e.value) and "\n" not in str(e.value)
    assert not sentinel.exists()


def test_hostile_payload_nested_in_network_state_is_refused(tmp_path, G_small):
    sentinel = tmp_path / "SENTINEL"
    with fake_nvidia_modules() as fake:
        p = as_persistent(G_small, fake, easy(fake, G_small.init_kwargs))
        p.meta["state"]["_forward_hooks"] = collections.OrderedDict({0: _Reduce(os.system, (f"touch {sentinel}",))})
        (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"G_ema": p}))
    with pytest.raises(CheckpointError, match=r"posix\.system|os\.system"):
        load_generator(tmp_path / "evil.pkl")
    assert not sentinel.exists()


def test_unknown_class_is_refused(tmp_path):
    blob = pickle.dumps({"G_ema": collections.Counter("abc")})
    (tmp_path / "odd.pkl").write_bytes(blob)
    with pytest.raises(CheckpointError, match=r"collections\.Counter"):
        load_generator(tmp_path / "odd.pkl")


def test_module_src_is_never_executed(tmp_path, G_small):
    sentinel = tmp_path / "SENTINEL"
    src = f"open({str(sentinel)!r}, 'w').write('pwned')\nprint('module_src ran')\n"
    exec(compile(src, "<positive control>", "exec"), {})  # what NVIDIA's loader would do with it
    assert sentinel.exists()
    sentinel.unlink()

    path = write_nvidia_pickle(tmp_path / "src.pkl", G_small, module_src=src)
    G = load_generator(path)  # the weights are fine, so it loads ...
    assert not sentinel.exists()  # ... and the carried source never ran
    assert torch.equal(G.synthesis.b16.torgb.weight, G_small.synthesis.b16.torgb.weight)


def test_persistent_ids_are_refused(tmp_path):
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return "x" if isinstance(obj, str) and obj == "pid" else None

    import io

    buf = io.BytesIO()
    P(buf, protocol=3).dump({"G_ema": "pid"})
    (tmp_path / "pid.pkl").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="persistent ids"):
        load_generator(tmp_path / "pid.pkl")


# ----------------------------------------------------------------------------- unsupported networks


def test_stylegan3_is_refused(tmp_path, G_small):
    rename = {"b4": "input", "b8": "L0_36_32", "b16": "L1_36_32"}
    with fake_nvidia_modules() as fake:
        syn = as_persistent(G_small.synthesis, fake, rename=rename)
        g = as_persistent(G_small, fake, easy(fake, G_small.init_kwargs))
        g.meta["state"]["_modules"]["synthesis"] = syn
        (tmp_path / "sg3.pkl").write_bytes(pickle.dumps({"G_ema": g}))
    with pytest.raises(CheckpointError, match="StyleGAN3"):
        load_generator(tmp_path / "sg3.pkl")


def test_conditional_is_refused(tmp_path, G_small):
    path = write_nvidia_pickle(tmp_path / "cond.pkl", G_small, kwargs_override={"c_dim": 10})
    with pytest.raises(CheckpointError, match=r"conditional generator \(c_dim=10\)"):
        load_generator(path)


def test_non_skip_architecture_is_refused(tmp_path, G_small):
    syn = {**SMALL["synthesis_kwargs"], "architecture": "resnet"}
    path = write_nvidia_pickle(tmp_path / "res.pkl", G_small, kwargs_override={"synthesis_kwargs": syn})
    with pytest.raises(CheckpointError, match="architecture='resnet'"):
        load_generator(path)


def test_not_a_generator_is_refused(tmp_path):
    with fake_nvidia_modules() as fake:
        d = Persistent(fake.reconstruct, "Discriminator", {"_parameters": {}, "_modules": {}})
        (tmp_path / "d.pkl").write_bytes(pickle.dumps({"G_ema": d}))
    with pytest.raises(CheckpointError, match="Discriminator, not a StyleGAN2 Generator"):
        load_generator(tmp_path / "d.pkl")
    (tmp_path / "keys.pkl").write_bytes(pickle.dumps({"model": 1}))
    with pytest.raises(CheckpointError, match="without a generator.*model"):
        load_generator(tmp_path / "keys.pkl")


def test_tensorflow_pickle_is_refused_with_advice(tmp_path):
    # The shape of a TF StyleGAN2 pickle (protocol 2): a tuple (G, D, Gs) of dnnlib.tflib.network.Network,
    # written opcode by opcode since the class does not exist here.
    net = b"cdnnlib.tflib.network\nNetwork\n)\x81}b"
    blob = b"\x80\x02" + net * 3 + b"\x87."
    assert pickletools_ok(blob)
    (tmp_path / "tf.pkl").write_bytes(blob)
    with pytest.raises(CheckpointError, match="TensorFlow StyleGAN2 pickle.*legacy.py"):
        load_generator(tmp_path / "tf.pkl")


def pickletools_ok(blob: bytes) -> bool:
    import io
    import pickletools

    pickletools.dis(blob, out=io.StringIO())
    return True


def test_truncated_pickle(tmp_path, G_small):
    data = write_nvidia_pickle(tmp_path / "full.pkl", G_small).read_bytes()
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pkl is truncated or not a valid pickle"):
        load_generator(tmp_path / "cut.pkl")


def test_weights_that_do_not_fit_the_config(tmp_path, G_small):
    other = {**SMALL["synthesis_kwargs"], "channel_max": 16}
    path = write_nvidia_pickle(tmp_path / "bad.pkl", G_small, kwargs_override={"synthesis_kwargs": other})
    with pytest.raises(CheckpointError, match="do not fit.*wrong shape"):
        load_generator(path)
