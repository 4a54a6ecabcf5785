"""Triton kernels behind the CUDA face of bevel's custom ops (``bevel.runtime.ops``).

Each module holds one family: ``quantized_linear`` the int8/int4 linears' wrappers (their kernels in
``weight_only_matmul`` and ``int8_matmul``), ``embedding`` the int8 table gather; ``autotune`` the
config filtering they share. Under ``TRITON_INTERPRET=1`` they also run on CPU tensors (how the tests
check them against the ops' references).
"""
