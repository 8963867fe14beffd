"""SPSA, the simple parameter-free self-attention approximation: the module, the formula and its fast forms.

The operator (Zhai et al., ICLR 2023 Tiny Papers). For x of shape (N, C, H, W), split the channels
into `heads` contiguous groups; per group, key k = global average pool of x over H, W; for every
pixel, r = Pearson correlation over the group's channels between x[n, g, :, h, w] and k[n, g, :]
(both centred over those channels); A = (1 - sigmoid(r)) ** alpha; out = x * A. No parameters.

Ablation switches (the paper's Fig. 3 and Table 4; the defaults are the operator above, bit for bit):

* `reverse` (bool, default True): True is the paper's gate A = (1 - sigmoid(r)) ** alpha (pixels
  that resemble the key, i.e. the background, are damped); False is A = sigmoid(r) ** alpha.
* `similarity` (`SIMILARITIES`, default "correlation"): "correlation" is the Pearson correlation
  above; "cosine" is the dot-product/cosine variant of the paper's Table 4,
  r = <x, k> / (‖x‖ ‖k‖) over the group's channels, NOT centred.

Numerical decisions (every implementation makes exactly the same ones):

* Shift and scale. The correlation r is invariant to subtracting a per-(n, group) constant from x
  and to scaling x by a positive per-(n, group) constant. The implementations work on
  x̃ = (x - s) / m with s = the key's mean over the group's channels and m = the largest |k_c - s|
  (1 where the key is constant). The shift removes the common offset, so the one-pass variance
  Σx̃² - (Σx̃)²/C no longer cancels catastrophically (a raw one-pass shortcut is ~500× less
  accurate than two-pass centring at mean 100, std 1); the scale keeps the squares in fp32's range
  for magnitudes from 1e-30 to 1e30 (the key spread follows the data's scale). s and m carry no
  gradient. The cosine is not shift-invariant, so it takes only the scale: s = 0,
  m = max_c |k_c| (1 where the key is all zero), x̃ = x / m, k̃ = k / m.
* Statistics are computed in fp32 (fp64 for fp64 input); the output keeps the input's dtype.
* eps is relative, so that SPSA stays scale-invariant (an absolute eps added to variances would
  flatten r for small activations). With ‖·‖ the Euclidean norm over the group's channels:
  - correlation: a = max(‖x̃ - mean x̃‖, eps·‖x̃‖), b = max(‖k̃ - mean k̃‖, eps·‖k / m‖),
    r = S / (a·b) with S = Σ (x̃ - mean x̃)(k̃ - mean k̃). A pixel vector (or key) whose spread
    is below eps times its magnitude counts as constant.
  - cosine: b = ‖k̃‖ (1 ≤ b ≤ √C for a nonzero key: its largest entry is ±1; 0 for an all-zero
    key), a = max(‖x̃‖, eps·b), r = S / (a·b) with S = Σ x̃·k̃. A pixel vector whose norm is below
    eps times the key's counts as (nearly) zero: its r shrinks linearly to 0 with its norm
    instead of jumping, and its gradient stays bounded (a floor relative to the pixel's own
    norm, as the correlation's, would never apply: a norm is never below eps times itself).
  The floors carry no gradient. Where a·b is zero or not finite (correlation: an all-zero or
  constant pixel vector, an all-zero key; cosine: an all-zero key), r = 0, so
  A = 0.5 ** alpha; an all-zero pixel vector has S = 0, so r = 0 in both. No NaN or inf forward
  or backward. eps defaults to 1e-5.

Implementations (`SPSA(impl=...)`), every one honouring both switches:

* "fused" (default): the custom op `torch.ops.spsa_nas.spsa` (`spsa_nas.attention.kernels`): a
  fused C++ kernel on the CPU (built on first use), a Triton kernel on CUDA, the decomposition
  elsewhere; an analytic backward that saves only x; one node to torch.export.
* "decomposed": the same formula as a few plain torch reductions (`kernels.composite`).
* "reference": the formula written out plainly (two-pass centring, autograd): the oracle.

Tracing: `torch.jit.trace`, `torch.jit.script` and both ONNX exporters see the decomposition
(plain operators, so the traced model needs no custom op to run); torch.fx sees `spsa(...)` as a
leaf function; torch.export sees the custom op. torch.compile (when not exporting) sees the
decomposition, whatever `impl`: plain reductions that inductor fuses with the neighbouring
convolution epilogues, BN and activations (measured against the opaque op: docs/attention.md).
Argument checks happen in `SPSA.__init__`; the input's checks run in eager mode and in FX
graphs, never in a trace.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from spsa_nas.attention.kernels import composite
from spsa_nas.attention.kernels import op as _op  # noqa: F401 (registers torch.ops.spsa_nas.*)

DEFAULT_EPS = 1e-5

Impl = Literal["fused", "decomposed", "reference"]
IMPLS: tuple[str, ...] = ("fused", "decomposed", "reference")

Similarity = Literal["correlation", "cosine"]
#: The similarities r between a pixel's channel vector and the key (module docstring).
SIMILARITIES: tuple[str, ...] = ("correlation", "cosine")


def _check_args(channels: int, alpha: float, heads: int, eps: float, reverse: bool = True,
                similarity: str = "correlation") -> None:
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"SPSA: channels must be a positive int, got {channels!r}")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"SPSA: heads must be a positive int, got {heads!r}")
    if channels % heads:
        raise ValueError(f"SPSA: heads={heads} does not divide channels={channels}")
    if channels // heads < 2:
        raise ValueError(
            f"SPSA: heads={heads} leaves {channels // heads} channel per head; a correlation "
            "over channels needs at least 2"
        )
    if not (isinstance(alpha, int | float) and 0.0 < float(alpha) < float("inf")):
        raise ValueError(f"SPSA: alpha must be a finite number > 0, got {alpha!r}")
    if not (isinstance(eps, int | float) and 0.0 < float(eps) < 1.0):
        raise ValueError(f"SPSA: eps must be in (0, 1), got {eps!r}")
    if not isinstance(reverse, bool):
        raise ValueError(f"SPSA: reverse must be a bool (True: gate 1 - sigmoid(r); False: sigmoid(r)), "
                         f"got {reverse!r}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"SPSA: similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}")


def _check_input(x: torch.Tensor, heads: int, channels: int | None = None) -> None:
    if x.dim() != 4:
        raise ValueError(f"SPSA: expected a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"SPSA: built for {channels} channels, got input of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"SPSA: expected a floating-point input, got {x.dtype}")
    _check_args(x.shape[1], 1.0, heads, DEFAULT_EPS)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are computed in fp32, or fp64 for fp64 input."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _safe_ratio(num: torch.Tensor, den: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """num / den where ok, else 0 — without evaluating num / 0 anywhere (no NaN in gradients)."""
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _denominator_ok(d: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(d) & (d > torch.finfo(d.dtype).tiny)


def _floored_norm(square: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """sqrt(square) where it is above `floor`, else `floor` (no sqrt(0) in the gradient)."""
    above = square > floor.square()
    return torch.where(above, torch.where(above, square, torch.ones_like(square)).sqrt(), floor)


def spsa_reference(
    x: torch.Tensor, alpha: float = 1.0, heads: int = 1, eps: float = DEFAULT_EPS,
    reverse: bool = True, similarity: Similarity = "correlation",
) -> torch.Tensor:
    """SPSA straight from the formula (two-pass centring, autograd); see the module docstring."""
    _check_input(x, heads)
    _check_args(x.shape[1], alpha, heads, eps, reverse, similarity)
    n, c, h, w = x.shape
    sd = _stat_dtype(x.dtype)
    x5 = x.view(n, heads, c // heads, h, w).to(sd)
    k = x5.mean((3, 4))  # (N, G, Cg): the key
    if similarity == "correlation":
        s = k.mean(2, keepdim=True)
        m = (k - s).abs().amax(2, keepdim=True).detach()
    else:  # the cosine is not shift-invariant: scale only
        s = torch.zeros_like(k[..., :1])
        m = k.abs().amax(2, keepdim=True).detach()
    m = torch.where(m > 0, m, torch.ones_like(m))
    xt = (x5 - s[..., None, None]) / m[..., None, None]  # shifted and scaled: r is invariant
    kt = (k - s) / m
    if similarity == "correlation":
        xc = xt - xt.mean(2, keepdim=True)
        kc = kt - kt.mean(2, keepdim=True)
        floor_x = (eps * torch.linalg.vector_norm(xt, dim=2)).detach()
        floor_k = (eps * torch.linalg.vector_norm(k / m, dim=2)).detach()[..., None, None]
    else:
        xc, kc = xt, kt
        floor_k = torch.zeros_like(kt[..., :1, None])  # b = ‖k̃‖, 0 only for an all-zero key
    s_xk = (xc * kc[..., None, None]).sum(2)  # (N, G, H, W)
    b = _floored_norm(kc.square().sum(2)[..., None, None], floor_k)
    if similarity == "cosine":
        floor_x = (eps * b).detach().expand_as(s_xk)
    a = _floored_norm(xc.square().sum(2), floor_x)
    d = a * b
    r = _safe_ratio(s_xk, d, _denominator_ok(d))
    gate = torch.sigmoid(-r if reverse else r).pow(alpha)  # 1 - sigmoid(r) == sigmoid(-r)
    return (x5 * gate[:, :, None]).to(x.dtype).view(n, c, h, w)


def _compiling_not_exporting() -> bool:
    """Under torch.compile but not torch.export: SPSA then takes its decomposition, which inductor
    fuses with its neighbours; torch.export keeps the op. On the CPU the opaque op with the fused
    kernel was measured faster under inductor at batch 8 but slower at batch 1, the batch the search
    measures latency at (docs/attention.md, "Tracing and export")."""
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting()


def spsa_decomposed(x: torch.Tensor, alpha: float = 1.0, heads: int = 1, eps: float = DEFAULT_EPS,
                    reverse: bool = True, similarity: Similarity = "correlation") -> torch.Tensor:
    """SPSA as a few plain torch reductions (what tracing, TorchScript and ONNX export see)."""
    if not torch.compiler.is_compiling():
        _check_input(x, heads)
        _check_args(x.shape[1], alpha, heads, eps, reverse, similarity)
    fusable = torch.compiler.is_compiling()  # sums inductor fuses, not a matmul (composite docstring)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Decomposed.apply(x, float(alpha), heads, float(eps), reverse, similarity, fusable)
    return composite.spsa_decomposed(x, float(alpha), heads, float(eps), reverse, similarity, fusable)


class _Decomposed(torch.autograd.Function):
    """The decomposition with the fused op's analytic backward (`composite.spsa_backward`):
    autograd through the plain operators would meet 0·inf where a norm overflows fp32."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: float, heads: int, eps: float, reverse: bool,
                similarity: str, fusable: bool) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.args = (alpha, heads, eps, reverse, similarity)
        return composite.spsa_decomposed(x, alpha, heads, eps, reverse, similarity, fusable)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        return composite.spsa_backward(grad, x, *ctx.args), None, None, None, None, None, None


def spsa_fused(x: torch.Tensor, alpha: float = 1.0, heads: int = 1, eps: float = DEFAULT_EPS,
               inplace: bool = False, reverse: bool = True,
               similarity: Similarity = "correlation") -> torch.Tensor:
    """SPSA through the custom op `spsa_nas::spsa` (fused kernel where available, see
    `spsa_nas.attention.kernels`); equal to `spsa_reference` up to rounding.

    `inplace=True` writes the output into x (and returns it) when no gradient flows through x
    (otherwise it is ignored), in eager mode only: it saves allocating and writing a new
    full-size tensor. Under torch.compile (not torch.export) the decomposition runs instead of the
    op, for inductor to fuse (module docstring).
    """
    if not torch.compiler.is_compiling():
        _check_input(x, heads)
        _check_args(x.shape[1], alpha, heads, eps, reverse, similarity)
    elif _compiling_not_exporting():
        return spsa_decomposed(x, alpha, heads, eps, reverse, similarity)
    if (inplace and not (torch.is_grad_enabled() and x.requires_grad)
            and not torch.compiler.is_compiling()):
        return torch.ops.spsa_nas.spsa_(x, float(alpha), heads, float(eps), reverse, similarity)
    return torch.ops.spsa_nas.spsa(x, float(alpha), heads, float(eps), reverse, similarity)


#: Kept for callers of the earlier name: the default implementation.
spsa_fast = spsa_fused


def spsa(x: torch.Tensor, alpha: float, heads: int, eps: float, impl: str, inplace: bool,
         channels: int | None = None, reverse: bool = True,
         similarity: Similarity = "correlation") -> torch.Tensor:
    """SPSA by `impl` ("fused", "decomposed" or "reference"); `channels`: what x must have.

    A leaf of torch.fx's symbolic tracing (`torch.fx.wrap`): an FX graph (torchvision's
    create_feature_extractor, FX quantization) calls it as one function and runs the fused
    kernel as eager mode does; its argument checks run then, on real tensors.
    """
    if not torch.compiler.is_compiling():
        _check_input(x, heads, channels)
    if impl == "reference":
        return spsa_reference(x, alpha, heads, eps, reverse, similarity)
    if impl == "decomposed" or _compiling_not_exporting():
        return spsa_decomposed(x, alpha, heads, eps, reverse, similarity)
    return spsa_fused(x, alpha, heads, eps, inplace, reverse, similarity)


torch.fx.wrap("spsa")


class SPSA(nn.Module):
    """Simple parameter-free self-attention approximation on (N, channels, H, W); keeps the shape.

    `alpha` > 0 is the gate's exponent (alpha → 0 approaches the identity), `heads` the number of
    contiguous channel groups (each at least 2 channels), `eps` the relative floor of the
    similarity's denominator (module docstring). `reverse` (default True: A = (1 - sigmoid(r))^alpha;
    False: sigmoid(r)^alpha) and `similarity` ("correlation", default, or "cosine") are the paper's
    ablation switches (module docstring). `impl`: "fused" (default), "decomposed" or "reference"
    (module docstring). `inplace=True` (no gradient through the input, eager) overwrites the input
    with the output, as `nn.ReLU(inplace=True)` does; the blocks of `spsa_nas.models` use it, their
    input being the fresh output of a BN. No parameters and no buffers.
    """

    def __init__(
        self,
        channels: int,
        *,
        alpha: float = 1.0,
        heads: int = 1,
        eps: float = DEFAULT_EPS,
        impl: Impl = "fused",
        inplace: bool = False,
        reverse: bool = True,
        similarity: Similarity = "correlation",
    ) -> None:
        super().__init__()
        _check_args(channels, alpha, heads, eps, reverse, similarity)
        if impl not in IMPLS:
            raise ValueError(f"SPSA: impl must be one of {', '.join(IMPLS)}, got {impl!r}")
        self.channels = channels
        self.alpha = float(alpha)
        self.heads = heads
        self.eps = float(eps)
        self.impl = impl
        self.inplace = bool(inplace)
        self.reverse = reverse
        self.similarity: str = similarity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # noqa: SIM102 (nested: TorchScript then compiles none of it)
            if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
                return spsa(x, self.alpha, self.heads, self.eps, self.impl, self.inplace, self.channels,
                            self.reverse, self.similarity)
        # TorchScript and ONNX graphs get plain operators: they run without the custom op
        return composite.spsa_decomposed(x, self.alpha, self.heads, self.eps, self.reverse, self.similarity)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, alpha={self.alpha}, heads={self.heads}, "
                f"eps={self.eps}, impl={self.impl}" + (", inplace=True" if self.inplace else "")
                + ("" if self.reverse else ", reverse=False")
                + ("" if self.similarity == "correlation" else f", similarity={self.similarity}"))
