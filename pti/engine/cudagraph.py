"""CUDA-graph replay of a render function, keyed on everything that changes what the function computes.

A CUDA graph replays the kernels it recorded, on the memory addresses it recorded, with the settings that
were in effect when it was recorded. So a replay is only the same computation as an eager call when none of
these changed since, and `graph_key` is all of them:

    ws            shape, dtype and device (the graph reads a static copy of its input)
    grad mode     torch.is_grad_enabled()
    autocast      on the input's device kind: enabled, and its dtype when enabled
    TF32          torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 and
                  torch.get_float32_matmul_precision() (what cuBLAS and cuDNN were told)
    impl          the implementation setting the function runs (`G.impl`, "ref", "prefer:triton", ...)
    the weights   every parameter and buffer of the module: the tensor object (id) and its storage address
                  (data_ptr)

Weights changed in place (an optimizer step, `copy_`, `load_state_dict` without `assign`) keep their
addresses, so a replay reads their new values: the same key, and rightly so. A weight rebound to another
tensor (the parameters of a tuned clone, `load_state_dict(assign=True)`, `param.data = ...`,
`module.to(...)`) changes the key, and `cuda_graphed` records again rather than replaying kernels that
read the old tensors. A graph keeps the tensors it was keyed on alive, so no other tensor can take their
id or address while it exists; when the weights change, the graphs of the old weights are dropped (their
memory pools freed), since a rebinding is almost always for good (the next identity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def weights_key(module: torch.nn.Module) -> tuple:
    """The identity of every parameter and buffer of `module` and its submodules: (id, data_ptr) each, in
    the modules' own order. A walk of the modules' tensor dicts rather than `named_parameters()`: this runs
    on every replay, and at 1024 px (165 tensors) it costs half as much (about 80 us on a 2-core VM)."""
    out = []
    stack = [module]
    while stack:
        m = stack.pop()
        for tensors in (m._parameters, m._buffers):
            for t in tensors.values():
                if t is not None:
                    out.append((id(t), t.data_ptr()))
        stack.extend(reversed(m._modules.values()))
    return tuple(out)


def graph_key(ws: torch.Tensor, module: torch.nn.Module, impl: str) -> tuple:
    """What a recorded graph of `module` rendering `ws` under `impl` depends on (the module's table); two
    calls with equal keys compute the same function of ws's values."""
    autocast, dtype = autocast_state(ws.device.type)
    return (
        tuple(ws.shape),
        ws.dtype,
        str(ws.device),
        torch.is_grad_enabled(),
        autocast,
        dtype if autocast else None,  # the dtype of a disabled autocast changes nothing
        bool(torch.backends.cuda.matmul.allow_tf32),
        bool(torch.backends.cudnn.allow_tf32),
        torch.get_float32_matmul_precision(),
        impl,
        weights_key(module),
    )


def autocast_state(kind: str) -> tuple[bool, torch.dtype | None]:
    """(enabled, dtype) of autocast on the device kind `kind`; (False, None) for kinds autocast does not know
    (the "meta" device)."""
    try:
        return torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)
    except RuntimeError:
        return False, None


@dataclass
class _Recorded:
    graph: torch.cuda.CUDAGraph
    static_in: torch.Tensor
    static_out: torch.Tensor
    weights: tuple  # the tensors the key names, held so their ids and addresses stay theirs


def cuda_graphed(fn: Callable, device: torch.device, module: torch.nn.Module, impl: str) -> Callable:
    """`fn(ws) -> images` (which runs `module` under `impl`), replayed from a CUDA graph recorded once per
    `graph_key`: after warm-up calls on a side stream (which also compile Triton kernels), the whole
    network's launches are recorded; each later call copies ws into the graph's static input and replays.

    Needs an `fn` without randomness inside (constant noise). The returned images are the graph's static
    output: the next call overwrites them, so clone what you keep. A rebound weight records again (see the
    module's docstring); `run.graphs` holds the recorded graphs by key, for tests and memory accounting."""
    graphs: dict[tuple, _Recorded] = {}

    def record(ws: torch.Tensor) -> _Recorded:
        kind = ws.device.type
        enabled, dtype = autocast_state(kind)
        # Autocast's cache of cast weights would keep the casts out of the graph (done once, before it) and
        # free them when the caller's autocast block ends, leaving the graph reading freed memory: record
        # with the cache off, so the casts are kernels of the graph, reading the weights on every replay.
        static_in = ws.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.autocast(kind, dtype=dtype, enabled=enabled, cache_enabled=False):
            for _ in range(3):
                fn(static_in)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.autocast(kind, dtype=dtype, enabled=enabled, cache_enabled=False):
            with torch.cuda.graph(graph):
                static_out = fn(static_in)
        return _Recorded(graph, static_in, static_out, tuple(module.parameters()) + tuple(module.buffers()))

    def run(ws: torch.Tensor) -> torch.Tensor:
        key = graph_key(ws, module, impl)
        entry = graphs.get(key)
        if entry is None:
            if any(k[-1] != key[-1] for k in graphs):  # other weights: their graphs will not replay again
                torch.cuda.synchronize(device)  # none of them still running when its pool is freed
                graphs.clear()
            entry = graphs[key] = record(ws)
        entry.static_in.copy_(ws)
        entry.graph.replay()
        return entry.static_out

    run.graphs = graphs  # type: ignore[attr-defined]
    return run
