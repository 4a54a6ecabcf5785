"""The single-row kernel's pipelined configs, compiled for an H100/H200 (sm_90) without one: with
``LOOP_STAGES`` > 1 its K loop must copy tiles asynchronously (``cp.async``) into shared memory, and
with 1 it must not (see the docstring of ``codegen/kernels/gemv.py``). Triton compiles for a target
it is told of, and its bundled ``ptxas`` assembles the result, so no GPU is needed; the pointers are
declared 16-byte aligned, as a launch specializes them for tensors from PyTorch's allocator."""

from __future__ import annotations

import re

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
from triton.runtime.jit import JITFunction

from bevel.codegen.kernels.gemv import gemv_kernel

# under TRITON_INTERPRET=1 (as the suite runs) the decorator gave an interpreted function: compile
# the Python function it wraps
KERNEL = gemv_kernel if isinstance(gemv_kernel, JITFunction) else JITFunction(gemv_kernel.fn)
ARGS = ["x_ptr", "w_ptr", "scale_ptr", "zero_ptr", "bias_ptr", "out_ptr", "N", "K", "stride_wn", "stride_sn",
        "stride_zn"]


def compiled_ptx(int4: bool, stages: int) -> tuple[str, int]:
    """The PTX of one config (4 rows x 2048 columns, 4 warps) for sm_90, and its shared memory bytes."""
    types = ["*bf16", "*u8" if int4 else "*i8", "*fp16" if int4 else "*fp32", "*u8" if int4 else "*i8", "*bf16",
             "*bf16", "i32", "i32", "i32", "i32", "i32"]
    constants = {"INT4": int4, "GROUP_SIZE": 128 if int4 else 0, "HAS_BIAS": False, "BLOCK_N": 4, "BLOCK_K": 2048,
                 "LOOP_STAGES": stages}
    signature = {**dict(zip(ARGS, types)), **dict.fromkeys(constants, "constexpr")}
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(len(ARGS)) if i != 4}  # bias: none here
    source = ASTSource(fn=KERNEL, signature=signature, constexprs=constants, attrs=aligned)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
    return kernel.asm["ptx"], kernel.metadata.shared


@pytest.mark.parametrize("int4", [False, True], ids=["int8", "int4"])
def test_loop_stages_turn_the_weight_loads_into_asynchronous_copies(int4):
    plain, plain_shared = compiled_ptx(int4, 1)
    pipelined, pipelined_shared = compiled_ptx(int4, 3)
    copies = len(re.findall(r"cp\.async\.c[ag]\.shared\.global", pipelined))
    print(f"{'int4' if int4 else 'int8'}: LOOP_STAGES=3 {copies} cp.async, {pipelined_shared} B shared; "
          f"LOOP_STAGES=1 {plain_shared} B shared")
    assert "cp.async" not in plain
    assert copies > 0 and "cp.async.wait_group" in pipelined
    assert pipelined_shared > plain_shared  # the buffers of the tiles in flight
