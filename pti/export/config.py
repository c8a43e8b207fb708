"""`ExportConfig`: how `pti.export.export` builds an export, frozen and checked at construction.

`pti export` maps its options onto it; `pti render --backend` and `pti bench` build one for the base
generator's export. What is exported (`Source`) and where (the folder) are the call's other arguments.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from pti.engine.config import EXPORT_PRECISIONS, Rule, check_fields, instance_of, one_of
from pti.export.contract import DEFAULT_BATCH


def _batch_profile(v) -> bool:
    return (
        isinstance(v, tuple)
        and len(v) == 3
        and all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1 for n in v)
        and v[0] <= v[1] <= v[2]
    )


@dataclass(frozen=True)
class ExportConfig:
    precision: str = "fp32"  # the graph's weights and blocks: fp32, or fp16 (half the size;
    # the generator's own fp16 path, fp16 kernels on GPUs)
    batch: tuple[int, int, int] = DEFAULT_BATCH  # the batch profile (min, opt, max): the export accepts min to max
    # frames per call; TensorRT tunes its kernels for opt
    external_data: bool | None = None  # ONNX: weights in model.onnx.data beside the graph; None = only
    # when the model passes protobuf's 2 GB limit
    device: str | torch.device = "cpu"  # where AOTInductor compiles for and TensorRT builds (resolved by
    # the caller); the ONNX export always traces on the CPU

    def __post_init__(self):
        check_fields(
            self,
            {
                "precision": one_of(*EXPORT_PRECISIONS),
                "batch": Rule(_batch_profile, "a tuple of three whole numbers 1 <= min <= opt <= max"),
                "external_data": one_of(True, False, None),
                "device": instance_of(str, torch.device),
            },
        )
