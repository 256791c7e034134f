"""Portable kernels: the few places where a backend lacks what the model needs.

CPU has no bf16/fp16 MatMul, BatchMatMul or Gather and no PyNative `Arange`; Ascend and GPU have them.
The model calls these helpers so its code reads the same on every device.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, ops


def native_dtype(compute_dtype: ms.dtype) -> ms.dtype:
    """Activation dtype the kernels run in: the requested one, except fp32 on CPU (no bf16/fp16 MatMul,
    BatchMatMul or Gather kernels there)."""
    return ms.float32 if ms.get_context("device_target") == "CPU" else compute_dtype


def emulated_dtype(compute_dtype: ms.dtype):
    """The low-precision dtype matmuls round to when it cannot run natively (CPU), else None."""
    return compute_dtype if native_dtype(compute_dtype) != compute_dtype else None


def _round(x: Tensor, dtype) -> Tensor:
    return ops.cast(ops.cast(x, dtype), ms.float32)


def matmul(prim, a: Tensor, b: Tensor, round_dtype=None) -> Tensor:
    """`prim(a, b)` for a MatMul/BatchMatMul primitive the caller keeps (so the parallel plan can shard it).

    With `round_dtype` (CPU emulation of bf16/fp16), inputs and result are rounded to that dtype around
    an fp32 matmul: the precision of a low-precision matmul with fp32 accumulation, as on Ascend/GPU.
    """
    if round_dtype is None:
        return prim(a, b)
    return _round(prim(_round(a, round_dtype), _round(b, round_dtype)), round_dtype)


def embedding(prim, table: Tensor, ids: Tensor, dtype: ms.dtype) -> Tensor:
    """Rows `ids` of `table` in `dtype`. A bf16 table read in fp32 is cast before the Gather (CPU, whose
    activations are fp32, has no bf16 Gather); the two orders give the same values. Decided from dtypes
    alone: a device query cannot be compiled inside `construct`."""
    if table.dtype == ms.bfloat16 and dtype == ms.float32:
        return prim(ops.cast(table, dtype), ids, 0)
    return ops.cast(prim(table, ids, 0), dtype)


def arange(n: int) -> Tensor:
    """int32 0..n-1 from kernels every backend has in both modes (CPU PyNative lacks `Arange`)."""
    return ops.range(Tensor(0, ms.int32), Tensor(n, ms.int32), Tensor(1, ms.int32))
