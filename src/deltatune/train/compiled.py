"""``--compile``: the model's transformer blocks compiled with ``torch.compile``.

Each block (found by :mod:`deltatune.anatomy`, so no model code is named) is compiled in place
with ``nn.Module.compile``: the elementwise work between the matrix products (norms, rotary
embeddings, activations, residual adds, the casts around the deltas) runs fused, in one pass
over memory instead of one per operation. The blocks are compiled for dynamic shapes, so batches
of other lengths (packed rows differ in length) reuse the compiled code.

Measured on the bundled SmolLM2-135M (2-core CPU with AMX, bf16, packed demo batches): a step
takes about a third less time compiled, but compiling takes about a minute before the first
step, longer than the demo's whole training saves; so it is off by default (README, "Speed").
"""

from __future__ import annotations

from torch import nn

from ..anatomy import analyze


def compile_blocks(model: nn.Module) -> int:
    """Compile every transformer block of ``model`` in place; returns how many."""
    count = 0
    for stack in analyze(model).stacks:
        for block in model.get_submodule(stack):
            block.compile(dynamic=True)
            count += 1
    return count
