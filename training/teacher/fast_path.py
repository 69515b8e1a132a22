"""The teacher's fast path: switches that change how the frozen UNet runs, not what it computes.

Each switch is off in `FastPath()` (the plain path) and has an equivalence test at tiny size in
tests/test_fast_path.py:

* `weights_in_dtype`: the networks' weights stored in the teacher's autocast dtype (bf16), not only computed in it
  under autocast. Frozen weights have no autocast cast cache (it only keeps casts of weights that need a gradient),
  so an fp32 teacher under autocast casts all its weights at every forward. A no-op for an fp32 teacher.
* `compile_backend`: `torch.compile` of the UNet's repeated blocks (regional compilation: resnet blocks, attention
  and transformer blocks; the glue between them stays eager). Only `forward` is compiled, so the tap hooks and the
  early stop that raises from them stay eager; a block holding a tap inside it is left eager and its children are
  compiled instead. "inductor" on GPUs; "eager" / "aot_eager" check the wiring without code generation.
* `attention`: the attention processor of every diffusers `Attention` module: "sdpa" (`AttnProcessor2_0`,
  `torch.nn.functional.scaled_dot_product_attention`: flash / memory-efficient kernels on GPUs, what diffusers
  already picks by default with torch 2) or "math" (`AttnProcessor`: explicit softmax(QK^T)V, the reference the
  profiler compares SDPA with). None keeps what the UNet was loaded with.

Not here, left for a GPU session: CUDA graphs (`torch.compile(mode="reduce-overhead")` on the fixed-shape
teacher) and FP8 matmuls/convolutions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

ATTENTION_PROCESSORS = ("sdpa", "math")
# diffusers classes compiled one by one (the repeated blocks of UNet2DModel and UNet2DConditionModel)
COMPILED_BLOCKS = ("ResnetBlock2D", "Attention", "Transformer2DModel")


@dataclass(frozen=True)
class FastPath:
    """Which switches are on; `FastPath()` is the plain path."""

    weights_in_dtype: bool = False
    compile_backend: str | None = None
    attention: str | None = None

    def __post_init__(self):
        if self.attention not in (None, *ATTENTION_PROCESSORS):
            raise ValueError(f"attention must be one of {ATTENTION_PROCESSORS} or None, got {self.attention!r}")

    def describe(self) -> str:
        """The switches that are on, for a log line ("plain" when none is)."""
        on = [f"{name}={value}" for name, value in vars(self).items() if value]
        return ", ".join(on) or "plain"


PLAIN = FastPath()
# what the trainer's --fast-path turns on in the teacher (the trainer adds channels_last)
GPU_FAST_PATH = FastPath(weights_in_dtype=True, compile_backend="inductor", attention="sdpa")


def set_attention(unet: nn.Module, kind: str) -> int:
    """Give every diffusers `Attention` module of `unet` the processor `kind` ("sdpa" or "math"); returns how many."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    processor = {"sdpa": AttnProcessor2_0, "math": AttnProcessor}[kind]
    modules = [m for m in unet.modules() if isinstance(m, Attention)]
    for module in modules:
        module.set_processor(processor())
    return len(modules)


def compile_blocks(unet: nn.Module, backend: str, taps: Iterable[str]) -> list[str]:
    """Compile the `forward` of the outermost `COMPILED_BLOCKS` of `unet` that hold no tap inside them (a tapped
    module itself is fine: its hook runs outside its forward); returns their names."""
    taps = tuple(taps)
    compiled: list[str] = []
    for name, module in unet.named_modules():
        if type(module).__name__ not in COMPILED_BLOCKS or any(name.startswith(f"{c}.") for c in compiled):
            continue
        if any(tap.startswith(f"{name}.") for tap in taps):
            continue  # holds a tap: its children are compiled instead
        module.forward = torch.compile(module.forward, backend=backend)
        compiled.append(name)
    # blocks of one class share their code, and dynamo keeps one compiled version per input shape of a code object:
    # room for every block at the training batch and at another (the checkpoints' feature picture)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(compiled))
    return compiled
