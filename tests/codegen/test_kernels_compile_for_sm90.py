"""Kernels compiled for an H100/H200 (sm_90) without one: what the generated code does that the
interpreter cannot show. Triton compiles for a target it is told of and its bundled ``ptxas``
assembles the result, so no GPU is needed. Pointers are declared 16-byte aligned and integer
arguments divisible by 16, as a launch specializes them for tensors from PyTorch's allocator. The
suite runs under ``TRITON_INTERPRET=1``, where kernels are interpreted functions that cannot be
compiled, so the compiling happens in a child process without it.

- The single-row kernel (``gemv.py``): with ``LOOP_STAGES`` > 1 its K loop copies tiles
  asynchronously (``cp.async``) into shared memory, and with 1 it does not.
- The block-sparse prefill kernel (``sparse_attention.py``) at head dim 128, blocks of 64 (4 warps)
  and 128 (8 warps), as ``triton_sparse_attention`` launches them: it fits in shared memory and
  its products run on the Hopper matrix units (``wgmma``) with the key and value tiles copied
  asynchronously.
- The decode attention kernel (``decode_attention.py``) at head dim 128: every cache format fits
  the 227 KB of shared memory one program may use on sm_90, and the quantized formats read their
  group parameters once per group (reading them per channel compiled to 411 (int8) and 771 (int4)
  4-byte copies per program and, for int4, 279 KB of shared memory: a kernel that cannot launch).
- The token matching kernels (``token_merge.py``) for ViT-B's keys averaged over heads (64 channels,
  bfloat16) and its hidden states (768, float32): the similarity kernel fits in shared memory (with
  a whole row of channels per tile the 768-wide metric took 256 KB), and the plan kernel compiles
  (a module constant it reads must be a ``tl.constexpr``, which the interpreter does not check).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SM90_SHARED_BYTES = 232448  # 227 KB: what one program may use on an H100/H200
DECODE_FORMATS = [(0, 1), (8, 128), (8, 32), (4, 32)]  # (bits, group size); 0: a bfloat16 cache
PREFILL_TILES = [(64, 4), (128, 8)]  # (block, warps)
MATCH_METRICS = [(64, "*bf16"), (768, "*fp32")]  # (channels, dtype)


def compile_for_sm90(kernel, args: dict[str, str], constants: dict, unaligned: tuple[str, ...] = (),
                     num_warps: int = 4, num_stages: int = 3) -> dict:
    """``kernel`` compiled for sm_90 with these argument types and constant arguments: its counts of
    asynchronous copies and scalar global loads, whether it waits on copies, and its shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    signature = {**args, **dict.fromkeys(constants, "constexpr")}
    aligned = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(args.items())
               if name not in unaligned and not kind.startswith("fp")}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    return {"copies": len(re.findall(r"cp\.async\.c[ag]\.shared\.global", ptx)),
            "scalar_loads": len(re.findall(r"ld\.global\.b(?:8|16|32)\b", ptx)),
            "waits": "cp.async.wait_group" in ptx, "shared": compiled.metadata.shared,
            "wgmma": len(re.findall(r"wgmma\.mma_async", ptx))}


def compile_all() -> dict[str, dict]:
    """Every configuration the tests look at, by name (run where kernels are not interpreted)."""
    from bevel.codegen.kernels.decode_attention import decode_attention_kernel
    from bevel.codegen.kernels.gemv import gemv_kernel
    from bevel.codegen.kernels.sparse_attention import block_sparse_attention_kernel
    from bevel.codegen.kernels.token_merge import best_match_kernel, plan_kernel

    found = {}
    for int4 in (False, True):
        # the single-row kernel at 4 rows x 2048 columns, 4 warps, as the autotuner launches it
        args = dict(zip(["x_ptr", "w_ptr", "scale_ptr", "zero_ptr", "bias_ptr", "out_ptr", "N", "K", "stride_wn",
                         "stride_sn", "stride_zn"],
                        ["*bf16", "*u8" if int4 else "*i8", "*fp16" if int4 else "*fp32", "*u8" if int4 else "*i8",
                         "*bf16", "*bf16", "i32", "i32", "i32", "i32", "i32"]))
        for stages in (1, 3):
            constants = {"INT4": int4, "GROUP_SIZE": 128 if int4 else 0, "HAS_BIAS": False, "BLOCK_N": 4,
                         "BLOCK_K": 2048, "LOOP_STAGES": stages}
            found[f"gemv int{4 if int4 else 8} stages {stages}"] = compile_for_sm90(
                gemv_kernel, args, constants, unaligned=("bias_ptr",), num_stages=2)
    for bits, group_size in DECODE_FORMATS:
        # as triton_cache_attention launches it for a decode step of 32 query / 8 KV heads x 128 (one
        # position table for every KV head), bfloat16 queries
        cache = {0: "*bf16", 8: "*i8", 4: "*u8"}[bits]
        args = dict(zip(["q_ptr", "k_ptr", "v_ptr", "kp_ptr", "vp_ptr", "q_pos_ptr", "kv_pos_ptr", "window_ptr",
                         "sinks_ptr", "top_ptr", "total_ptr", "acc_ptr", "T", "L", "D", "HEADS", "KV_HEADS",
                         "Q_BLOCKS", "CHUNK", "SPLITS", "scale"],
                        ["*bf16", cache, cache, "*fp32", "*fp32", "*i64", "*i64", "*i64", "*i64", "*fp32", "*fp32",
                         "*fp32"] + ["i32"] * 8 + ["fp32"]))
        constants = dict(POS_HEADS=1, BITS=bits, GROUP_SIZE=group_size, PARAMS=2 if bits == 4 else 1, BLOCK_N=64,
                         BLOCK_D=128, BLOCK_Q=16, IEEE=False)
        found[f"decode bits {bits} group {group_size}"] = compile_for_sm90(decode_attention_kernel, args, constants)
    for block, warps in PREFILL_TILES:
        # bfloat16, one position table and one block table for every head (a window shared by all)
        args = dict(zip(["q_ptr", "k_ptr", "v_ptr", "q_pos_ptr", "kv_pos_ptr", "table_ptr", "count_ptr", "window_ptr",
                         "sinks_ptr", "out_ptr", "T", "L", "D", "DV", "HEADS", "KV_HEADS", "QUERY_BLOCKS", "WIDTH",
                         "scale"],
                        ["*bf16"] * 3 + ["*i64", "*i64", "*i32", "*i32", "*i64", "*i64", "*bf16"] + ["i32"] * 8
                        + ["fp32"]))
        constants = dict(POS_HEADS=1, TABLE_HEADS=1, BLOCK=block, BLOCK_D=128, BLOCK_DV=128, IEEE=False)
        found[f"prefill block {block}"] = compile_for_sm90(block_sparse_attention_kernel, args, constants,
                                                           num_warps=warps)
    for channels, dtype in MATCH_METRICS:
        # as triton_bipartite_match launches it
        args = dict(zip(["metric_ptr", "size_ptr", "best_ptr", "where_ptr", "N", "C", "protect"],
                        [dtype, "*fp32", "*fp32", "*i64", "i32", "i32", "i32"]))
        found[f"match channels {channels}"] = compile_for_sm90(best_match_kernel, args, dict(
            BLOCK_I=32, BLOCK_J=32, BLOCK_C=min(64, channels)))
    args = dict(zip(["best_ptr", "where_ptr", "size_ptr", "prefix_ptr", "dest_ptr", "N", "protect", "remove"],
                    ["*fp32", "*i64", "*fp32", "*i64", "*i64", "i32", "i32", "i32"]))
    found["match plan"] = compile_for_sm90(plan_kernel, args, dict(BLOCK=64))
    return found


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    code = ("import json; from tests.codegen.test_kernels_compile_for_sm90 import compile_all; "
            "print(json.dumps(compile_all()))")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).parents[2], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("int4", [False, True], ids=["int8", "int4"])
def test_gemv_loop_stages_turn_the_weight_loads_into_asynchronous_copies(compiled, int4):
    plain, pipelined = (compiled[f"gemv int{4 if int4 else 8} stages {s}"] for s in (1, 3))
    print(f"int{4 if int4 else 8}: LOOP_STAGES=3 {pipelined['copies']} cp.async, {pipelined['shared']} B shared; "
          f"LOOP_STAGES=1 {plain['copies']} cp.async, {plain['shared']} B shared")
    assert plain["copies"] == 0 and not plain["waits"]
    assert pipelined["copies"] > 0 and pipelined["waits"]
    assert pipelined["shared"] > plain["shared"]  # the buffers of the tiles in flight


@pytest.mark.parametrize("bits,group_size", DECODE_FORMATS)
def test_decode_attention_fits_sm90_and_reads_group_parameters_once(compiled, bits, group_size):
    found = compiled[f"decode bits {bits} group {group_size}"]
    print(f"bits {bits}, group {group_size}: {found['copies']} cp.async, {found['scalar_loads']} scalar loads, "
          f"{found['shared']} B shared")
    assert found["shared"] <= SM90_SHARED_BYTES
    # the bfloat16 kernel's own count (48 + 3) bounds what the codes and their parameters may take
    assert found["copies"] + found["scalar_loads"] <= 64


@pytest.mark.parametrize("block,warps", PREFILL_TILES)
def test_block_sparse_attention_fits_sm90_on_its_matrix_units(compiled, block, warps):
    found = compiled[f"prefill block {block}"]
    print(f"block {block}, {warps} warps: {found['wgmma']} wgmma, {found['copies']} cp.async, "
          f"{found['shared']} B shared")
    assert found["shared"] <= SM90_SHARED_BYTES
    assert found["wgmma"] > 0 and found["copies"] > 0


@pytest.mark.parametrize("channels", [c for c, _ in MATCH_METRICS])
def test_token_matching_kernels_fit_sm90(compiled, channels):
    found, plan = compiled[f"match channels {channels}"], compiled["match plan"]
    print(f"matching {channels} channels: {found['shared']} B shared; plan kernel {plan['shared']} B shared")
    assert found["shared"] <= SM90_SHARED_BYTES and plan["shared"] <= SM90_SHARED_BYTES
