"""Plain-torch reference kernels of the operators :mod:`flagrelease.gems.oplib` registers.

Each kernel computes in float32 and rounds once to the output dtype, the way FlagGems'
Triton kernels do on a GPU, through a different sequence of torch calls than the native
CPU kernel it replaces.  Operators a kernel calls internally reach the native kernels
(the library's re-entrancy guard sends nested calls straight to them).  A kernel returns
:data:`NATIVE` for inputs it does not handle (integer dtypes, say): the library then
calls the original kernel and does not count the call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "NATIVE",
    "add",
    "addmm",
    "argmax",
    "cat",
    "gelu",
    "index_select",
    "log_softmax",
    "mean_dim",
    "mm",
    "mul",
    "pow_tensor_scalar",
    "rsqrt",
    "silu",
    "softmax",
    "sub",
]


class _Native:
    """Marker: let the original kernel handle this call."""

    def __repr__(self) -> str:
        return "NATIVE"


NATIVE: Any = _Native()


def _float(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _f32(x: Any) -> Any:
    return x.float() if isinstance(x, torch.Tensor) else x


def silu(x: torch.Tensor) -> Any:
    """``aten::silu``: x * sigmoid(x), as x / (1 + exp(-x))."""
    if not _float(x):
        return NATIVE
    xf = x.float()
    return (xf / (1.0 + torch.exp(-xf))).to(x.dtype)


def gelu(x: torch.Tensor, *, approximate: str = "none") -> Any:
    """``aten::gelu``: the erf form, or the tanh approximation."""
    if not _float(x):
        return NATIVE
    xf = x.float()
    if approximate == "tanh":
        inner = math.sqrt(2.0 / math.pi) * (xf + 0.044715 * xf * xf * xf)
        return (0.5 * xf * (1.0 + torch.tanh(inner))).to(x.dtype)
    return (0.5 * xf * (1.0 + torch.erf(xf / math.sqrt(2.0)))).to(x.dtype)


def _binary(a: Any, b: Any, op: str, alpha: Any = 1) -> Any:
    dtype = torch.result_type(a, b)
    if not dtype.is_floating_point or not (_float(a) or _float(b)):
        return NATIVE
    af, bf = _f32(a), _f32(b)
    if op == "mul":
        out = af * bf
    elif op == "add":
        out = af + (bf if alpha == 1 else bf * alpha)
    else:
        out = af - (bf if alpha == 1 else bf * alpha)
    if not isinstance(out, torch.Tensor):  # both scalars cannot reach a Tensor overload
        return NATIVE
    return out.to(dtype)


def mul(a: Any, b: Any) -> Any:
    """``aten::mul.Tensor`` in float32."""
    return _binary(a, b, "mul")


def add(a: Any, b: Any, *, alpha: Any = 1) -> Any:
    """``aten::add.Tensor`` in float32."""
    return _binary(a, b, "add", alpha)


def sub(a: Any, b: Any, *, alpha: Any = 1) -> Any:
    """``aten::sub.Tensor`` in float32."""
    return _binary(a, b, "sub", alpha)


def pow_tensor_scalar(x: torch.Tensor, exponent: Any) -> Any:
    """``aten::pow.Tensor_Scalar``: repeated products for small integer exponents."""
    if not _float(x):
        return NATIVE
    xf = x.float()
    if exponent == 2:
        out = xf * xf
    elif exponent == 1:
        out = xf.clone()
    elif exponent == 0.5:
        out = torch.sqrt(xf)
    else:
        out = torch.exp(torch.log(torch.abs(xf)) * float(exponent))
        if float(exponent).is_integer() and int(exponent) % 2:
            out = out * torch.sign(xf)
        out = torch.where(xf == 0, torch.zeros_like(out) if float(exponent) > 0 else out, out)
    return out.to(x.dtype)


def rsqrt(x: torch.Tensor) -> Any:
    """``aten::rsqrt``: 1 / sqrt(x)."""
    if not _float(x):
        return NATIVE
    return (1.0 / torch.sqrt(x.float())).to(x.dtype)


def mean_dim(
    x: torch.Tensor, dim: Sequence[int] | None, keepdim: bool = False, *, dtype: torch.dtype | None = None
) -> Any:
    """``aten::mean.dim``: a float32 sum divided by the element count."""
    out_dtype = dtype or x.dtype
    if not _float(x) or not out_dtype.is_floating_point:
        return NATIVE
    dims = list(range(x.dim())) if dim is None or len(dim) == 0 else [d % max(x.dim(), 1) for d in dim]
    count = 1
    for d in dims:
        count *= x.shape[d] if x.dim() else 1
    total = torch.sum(x.float(), dim=dims, keepdim=keepdim) if x.dim() else x.float()
    return (total / count).to(out_dtype)


def index_select(x: torch.Tensor, dim: int, index: torch.Tensor) -> Any:
    """``aten::index_select`` (the embedding lookup) through advanced indexing."""
    if x.dim() == 0 or index.dim() > 1:
        return NATIVE
    dim = dim % x.dim()
    return x[(slice(None),) * dim + (index.reshape(-1),)].clone()


def _shifted(x: torch.Tensor, dim: int) -> torch.Tensor:
    xf = x.float()
    return xf - torch.amax(xf, dim=dim, keepdim=True)


def log_softmax(x: torch.Tensor, dim: int, half_to_float: bool) -> Any:
    """``aten::_log_softmax``: x - max - log(sum(exp(x - max)))."""
    if not _float(x):
        return NATIVE
    shifted = _shifted(x, dim)
    out = shifted - torch.log(torch.sum(torch.exp(shifted), dim=dim, keepdim=True))
    return out if half_to_float else out.to(x.dtype)


def softmax(x: torch.Tensor, dim: int, half_to_float: bool) -> Any:
    """``aten::_softmax``: exp(x - max) / sum(exp(x - max))."""
    if not _float(x):
        return NATIVE
    e = torch.exp(_shifted(x, dim))
    out = e / torch.sum(e, dim=dim, keepdim=True)
    return out if half_to_float else out.to(x.dtype)


def argmax(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> Any:
    """``aten::argmax``: the first index that holds the maximum."""
    if not _float(x) or x.numel() == 0 or torch.isnan(x).any():
        return NATIVE
    if dim is None:
        flat = x.reshape(-1)
        out = argmax(flat, 0, False)
        return out.reshape([1] * x.dim()) if keepdim else out
    dim = dim % max(x.dim(), 1)
    if x.dim() == 0:
        return torch.zeros((), dtype=torch.long)
    top = torch.amax(x, dim=dim, keepdim=True)
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    positions = torch.arange(x.shape[dim], dtype=torch.long).reshape(shape).expand_as(x)
    sentinel = torch.full_like(positions, x.shape[dim])
    return torch.amin(torch.where(x == top, positions, sentinel), dim=dim, keepdim=keepdim)


def mm(a: torch.Tensor, b: torch.Tensor) -> Any:
    """``aten::mm`` with float32 accumulation."""
    if not (_float(a) and _float(b)) or a.dtype != b.dtype:
        return NATIVE
    return torch.matmul(a.float(), b.float()).to(a.dtype)


def addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: Any = 1, alpha: Any = 1) -> Any:
    """``aten::addmm``: beta * bias + alpha * (a @ b), in float32."""
    if not (_float(a) and _float(b) and _float(bias)) or a.dtype != b.dtype:
        return NATIVE
    out = torch.matmul(a.float(), b.float())
    if alpha != 1:
        out = out * alpha
    return (out + (bias.float() if beta == 1 else bias.float() * beta)).to(a.dtype)


def cat(tensors: Sequence[torch.Tensor], dim: int = 0) -> Any:
    """``aten::cat``: copy each piece into its slice of a new tensor."""
    parts = [t for t in tensors if not (t.dim() == 1 and t.numel() == 0)]
    if not parts or len({t.dtype for t in parts}) != 1 or len({t.dim() for t in parts}) != 1:
        return NATIVE
    dim = dim % parts[0].dim()
    shape = list(parts[0].shape)
    shape[dim] = sum(t.shape[dim] for t in parts)
    out = torch.empty(shape, dtype=parts[0].dtype, device=parts[0].device)
    start = 0
    for t in parts:
        out.narrow(dim, start, t.shape[dim]).copy_(t)
        start += t.shape[dim]
    return out
