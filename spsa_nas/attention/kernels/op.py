"""SPSA as the PyTorch custom operators `spsa_nas::spsa` and `spsa_nas::spsa_` (in place).

`torch.ops.spsa_nas.spsa(x, alpha, heads, eps, reverse=True, similarity="correlation")` is one
operator to autograd and torch.export (the switches: `spsa_nas.attention.spsa`): its fake kernel
gives the output's shape and layout, its backward is the analytic
formula of `composite.spsa_backward` (plain torch operators), and `DECOMPOSITIONS` maps it to
`composite.spsa_decomposed` for `ExportedProgram.run_decompositions` (and ONNX). Kernels: on the
CPU the fused C++ kernel (`kernels.cpu`) for fp32/fp64, on CUDA the Triton kernel
(`kernels.triton_spsa`) for fp32/fp16/bf16; anything else (another dtype or device, or a kernel
that could not be built) runs the decomposition. `spsa_nas::spsa_` writes the output into x (no
autograd; the module uses it in eager inference only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from spsa_nas.attention.kernels import cpu
from spsa_nas.attention.kernels.composite import spsa_backward, spsa_decomposed

_LIB = torch.library.Library("spsa_nas", "DEF")  # lives as long as the process
# reverse and similarity (the ablation switches) have defaults: earlier calls and stored graphs keep working
_LIB.define('spsa(Tensor x, float alpha, int heads, float eps, bool reverse=True, '
            'str similarity="correlation") -> Tensor')
_LIB.define('spsa_(Tensor(a!) x, float alpha, int heads, float eps, bool reverse=True, '
            'str similarity="correlation") -> Tensor(a!)')


def output_layout(x: Tensor) -> torch.memory_format:
    """The output's memory format: channels_last for channels_last input, else contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def cuda_kernel() -> Callable[..., None] | None:
    """The Triton kernel's launcher (x, out, alpha, heads, eps, reverse, similarity), or None where
    Triton cannot run."""
    try:
        from spsa_nas.attention.kernels import triton_spsa
    except ImportError:
        return None
    return triton_spsa.spsa_forward_out if triton_spsa.available() else None


def fused_available(x: Tensor) -> bool:
    """Whether a fused kernel runs SPSA for `x` (its device and dtype); else the decomposition does."""
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.float64) and cpu.load() is not None
    if x.device.type == "cuda":
        return x.dtype in (torch.float32, torch.float16, torch.bfloat16) and cuda_kernel() is not None
    return False


def _check_similarity(similarity: str) -> None:
    if similarity not in ("correlation", "cosine"):
        raise ValueError(f"spsa_nas::spsa: similarity must be 'correlation' or 'cosine', got {similarity!r}")


def _run(x: Tensor, out: Tensor, alpha: float, heads: int, eps: float, reverse: bool,
         similarity: str) -> Tensor:
    """out = SPSA(x) with the fused kernel for x's device (x and out: same shape and layout)."""
    if x.device.type == "cpu":
        cpu.load().forward_out(x, out, alpha, heads, eps, reverse, similarity == "cosine")  # type: ignore[union-attr]
    else:
        cuda_kernel()(x, out, alpha, heads, eps, reverse, similarity)  # type: ignore[misc]
    return out


def _forward(x: Tensor, alpha: float, heads: int, eps: float, reverse: bool = True,
             similarity: str = "correlation") -> Tensor:
    _check_similarity(similarity)
    layout = output_layout(x)
    if not fused_available(x):
        return spsa_decomposed(x, alpha, heads, eps, reverse, similarity).contiguous(memory_format=layout)
    x = x.contiguous(memory_format=layout)
    return _run(x, torch.empty_like(x, memory_format=layout), alpha, heads, eps, reverse, similarity)


def _forward_inplace(x: Tensor, alpha: float, heads: int, eps: float, reverse: bool = True,
                     similarity: str = "correlation") -> Tensor:
    _check_similarity(similarity)
    if fused_available(x) and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return _run(x, x, alpha, heads, eps, reverse, similarity)
    return x.copy_(spsa_decomposed(x, alpha, heads, eps, reverse, similarity))


_LIB.impl("spsa", _forward, "CompositeExplicitAutograd")
_LIB.impl("spsa_", _forward_inplace, "CompositeExplicitAutograd")


@torch.library.register_fake("spsa_nas::spsa")
def _spsa_fake(x: Tensor, alpha: float, heads: int, eps: float, reverse: bool = True,
               similarity: str = "correlation") -> Tensor:
    return torch.empty_like(x, memory_format=output_layout(x))


@torch.library.register_fake("spsa_nas::spsa_")
def _spsa_inplace_fake(x: Tensor, alpha: float, heads: int, eps: float, reverse: bool = True,
                       similarity: str = "correlation") -> Tensor:
    return x


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, ctx.alpha, ctx.heads, ctx.eps, ctx.reverse, ctx.similarity = inputs
    ctx.save_for_backward(x)


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    (x,) = ctx.saved_tensors
    grad_x = spsa_backward(grad, x, ctx.alpha, ctx.heads, ctx.eps, ctx.reverse, ctx.similarity)
    return grad_x, None, None, None, None, None


torch.library.register_autograd("spsa_nas::spsa", _backward, setup_context=_setup_context)

#: For `ExportedProgram.run_decompositions(DECOMPOSITIONS)`: SPSA as plain torch operators.
DECOMPOSITIONS: dict[Any, Callable[..., Tensor]] = {torch.ops.spsa_nas.spsa.default: spsa_decomposed}
