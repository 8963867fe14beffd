"""SPSA, the simple parameter-free self-attention approximation: a reference and a fast implementation.

The operator (Zhai et al., ICLR 2023 Tiny Papers). For x of shape (N, C, H, W), split the channels
into `heads` contiguous groups; per group, key k = global average pool of x over H, W; for every
pixel, r = Pearson correlation over the group's channels between x[n, g, :, h, w] and k[n, g, :]
(both centred over those channels); A = (1 - sigmoid(r)) ** alpha; out = x * A. No parameters.

Numerical decisions (both implementations make exactly the same ones):

* Shift and scale. r is invariant to subtracting a per-(n, group) constant from x and to scaling
  x by a positive per-(n, group) constant. Both implementations work on
  x̃ = (x - s) / m with s = the key's mean over the group's channels and m = the largest
  |k_c - s| (1 where the key is constant). The shift removes the common offset, so the fast path's
  one-pass variance Σx̃² - (Σx̃)²/C no longer cancels catastrophically (a raw one-pass shortcut is
  ~500× less accurate than two-pass centring at mean 100, std 1); the scale keeps the squares in
  fp32's range for magnitudes from 1e-30 to 1e30 (the key spread follows the data's scale).
  s and m carry no gradient: r does not depend on them.
* Statistics are computed in fp32 (fp64 for fp64 input); the output keeps the input's dtype.
* eps is relative, so that SPSA stays scale-invariant (an absolute eps added to variances would
  flatten r for small activations): with ‖·‖ the Euclidean norm over the group's channels,
  a = max(‖x̃ - mean x̃‖, eps·‖x̃‖) and b = max(‖k̃ - mean k̃‖, eps·‖k / m‖), r = S / (a·b)
  with S = Σ (x̃ - mean x̃)(k̃ - mean k̃). A pixel vector (or key) whose spread is below eps times
  its magnitude counts as constant; the floors carry no gradient. Where a·b is zero or not
  finite (an all-zero or constant pixel vector, an all-zero key), r = 0, so A = 0.5 ** alpha:
  no NaN or inf forward or backward. eps defaults to 1e-5 (well above fp32 rounding of the
  centred sums, well below any real spread).

`spsa_reference` is the formula written out plainly (two-pass centring, autograd). `SPSA`'s default
fast path reads x once for the key, once for the per-pixel sums Σx̃, Σx̃·k̃ (one batched matmul
against a block-diagonal [1, k̃] matrix) and ‖x̃‖, and once for the output; x̃ is materialised
only a cache-sized slice of the batch at a time (never as a full-size fp32 temporary), and with
`inplace=True` and no gradient the output overwrites x (no full-size allocation at all). Its
backward is an analytic torch.autograd.Function that saves x and small per-pixel/per-channel
tensors only. Under torch.compile the same statistics are written as channel reductions, which
inductor fuses.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

DEFAULT_EPS = 1e-5

Impl = Literal["fast", "reference"]


def _check_args(channels: int, alpha: float, heads: int, eps: float) -> None:
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


def spsa_reference(
    x: torch.Tensor, alpha: float = 1.0, heads: int = 1, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """SPSA straight from the formula (two-pass centring, autograd); see the module docstring."""
    _check_input(x, heads)
    _check_args(x.shape[1], alpha, heads, eps)
    n, c, h, w = x.shape
    sd = _stat_dtype(x.dtype)
    x5 = x.view(n, heads, c // heads, h, w).to(sd)
    k = x5.mean((3, 4))  # (N, G, Cg): the key
    s = k.mean(2, keepdim=True)
    m = (k - s).abs().amax(2, keepdim=True).detach()
    m = torch.where(m > 0, m, torch.ones_like(m))
    xt = (x5 - s[..., None, None]) / m[..., None, None]  # shifted and scaled: r is invariant
    kt = (k - s) / m
    xc = xt - xt.mean(2, keepdim=True)
    kc = kt - kt.mean(2, keepdim=True)
    s_xk = (xc * kc[..., None, None]).sum(2)  # (N, G, H, W)
    var_x = xc.square().sum(2)
    var_k = kc.square().sum(2)[..., None, None]
    floor_x = (eps * torch.linalg.vector_norm(xt, dim=2)).detach()
    floor_k = (eps * torch.linalg.vector_norm(k / m, dim=2)).detach()[..., None, None]
    above_x = var_x > floor_x.square()
    above_k = var_k > floor_k.square()
    a = torch.where(above_x, torch.where(above_x, var_x, torch.ones_like(var_x)).sqrt(), floor_x)
    b = torch.where(above_k, torch.where(above_k, var_k, torch.ones_like(var_k)).sqrt(), floor_k)
    d = a * b
    r = _safe_ratio(s_xk, d, _denominator_ok(d))
    gate = torch.sigmoid(-r).pow(alpha)  # 1 - sigmoid(r) == sigmoid(-r)
    return (x5 * gate[:, :, None]).to(x.dtype).view(n, c, h, w)


def _key_stats(x: torch.Tensor, heads: int, eps: float) -> dict[str, torch.Tensor]:
    """Per-(n, group) and per-channel statistics of the key; all small tensors, dtype fp32/fp64."""
    n, c, _, _ = x.shape
    sd = _stat_dtype(x.dtype)
    k = torch.mean(x, dim=(2, 3), dtype=sd).view(n, heads, c // heads)  # pass 1 over x
    s = k.mean(2, keepdim=True)
    m = (k - s).abs().amax(2, keepdim=True)
    inv = 1.0 / torch.where(m > 0, m, torch.ones_like(m))
    u = (k - s) * inv
    uc = u - u.mean(2, keepdim=True)
    norm_k = torch.linalg.vector_norm(uc, dim=2, keepdim=True)
    floor_k = eps * torch.linalg.vector_norm(k * inv, dim=2, keepdim=True)
    above_k = norm_k > floor_k
    b = torch.where(above_k, norm_k, floor_k)
    return {"s": s, "inv": inv, "uc": uc, "b": b, "above_k": above_k}


def _shifted(x5: torch.Tensor, key: dict[str, torch.Tensor]) -> torch.Tensor:
    """x̃ = (x - s) / m as one fused multiply-add; keeps x's memory layout; dtype fp32/fp64."""
    inv = key["inv"][..., None, None]
    return torch.addcmul(-key["s"][..., None, None] * inv, x5, inv)


#: Bytes of x̃ that the eager path materialises at a time (a slice of the batch): small enough to
#: stay in the CPU's cache between the shift and the reductions that read it, large enough that
#: the per-slice launch overhead is negligible.
_SLICE_BYTES = 4 << 20


def _pixel_stats(
    y: torch.Tensor, uc: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Σ_c x̃, Σ_c x̃·ũ and ‖x̃‖ per pixel and group, each (N, G, H*W)."""
    n, g, cg, h, w = y.shape
    if torch.compiler.is_compiling():
        # plain reductions: inductor fuses them (and the shift before them) into one pass
        sum_y = y.sum(2)
        sum_yu = (y * uc[..., None, None]).sum(2)
        norm_y = y.square().sum(2).sqrt()
    else:
        # eager: one batched matmul against a block-diagonal [1; ũ] (N, 2G, C) matrix, and the
        # squares summed in place (y is a cache-sized scratch slice, see _sliced_pixel_stats)
        blocks = torch.eye(g, dtype=y.dtype, device=y.device).repeat_interleave(cg, dim=1)
        weights = torch.cat([blocks.expand(n, g, g * cg), blocks * uc.reshape(n, 1, g * cg)], dim=1)
        sums = torch.bmm(weights, y.view(n, g * cg, h * w))
        sum_y, sum_yu = sums[:, :g], sums[:, g:]
        norm_y = y.square_().sum(2).sqrt_()
    return sum_y.reshape(n, g, h * w), sum_yu.reshape(n, g, h * w), norm_y.reshape(n, g, h * w)


def _sliced_pixel_stats(
    x5: torch.Tensor, key: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_pixel_stats` of x̃ = `_shifted(x5)`, one slice of the batch at a time in eager mode.

    Materialising the whole x̃ would cost a write and a read of a full-size fp32 tensor from
    memory (and its allocation); a cache-sized slice is written and read back from the cache.
    Same numerics: the statistics are per sample.
    """
    n = x5.shape[0]
    rows = max(1, _SLICE_BYTES // max(1, x5[:1].numel() * key["s"].element_size()))
    if torch.compiler.is_compiling() or rows >= n:
        return _pixel_stats(_shifted(x5, key), key["uc"])
    parts = [
        _pixel_stats(_shifted(x5[i:i + rows], {k: key[k][i:i + rows] for k in ("s", "inv")}),
                     key["uc"][i:i + rows])
        for i in range(0, n, rows)
    ]
    sum_y, sum_yu, norm_y = (torch.cat(stat) for stat in zip(*parts, strict=True))
    return sum_y, sum_yu, norm_y


def _fast_forward(
    x: torch.Tensor, alpha: float, heads: int, eps: float, inplace: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The fast path's output (written into x when `inplace`) and the small tensors its backward needs."""
    n, c, h, w = x.shape
    cg = c // heads
    key = _key_stats(x, heads, eps)
    x5 = x.view(n, heads, cg, h, w)
    sum_y, sum_yu, norm_y = _sliced_pixel_stats(x5, key)  # pass 2 (one pass when compiled)
    s_xk = sum_yu - sum_y * key["uc"].sum(2, keepdim=True) / cg
    var_x = (norm_y.square() - sum_y.square() / cg).clamp_min(0.0)
    floor_x = eps * norm_y
    above_x = var_x > floor_x.square()
    a = torch.where(above_x, var_x.sqrt(), floor_x)
    d = a * key["b"]
    ok = _denominator_ok(d)
    r = _safe_ratio(s_xk, d, ok)
    gate = torch.sigmoid(-r).pow(alpha)
    gate5 = gate.view(n, heads, 1, h, w).to(x.dtype)
    out = x5.mul_(gate5) if inplace else x5 * gate5  # pass 3
    saved = dict(key, r=r, a=a, ok=ok, above_x=above_x, mean_y=sum_y / cg)
    return out.view(n, c, h, w), saved


class _SPSAFunction(torch.autograd.Function):
    """The fast path with an analytic backward that keeps only x and small tensors alive.

    With q = dL/dr / (a·b) and β = dL/dr · r / a² (0 where a or a·b is floored / degenerate):
    dL/dx̃ = q·ũ_c − β·(x̃ − mean x̃); through the key, dL/dũ_c = Σ_p q·(x̃ − mean x̃) − R·ũ_c / b²
    with R = Σ_p dL/dr · r (0 where b is floored), centred over the channels and spread as
    1/(H·W) over the pixels (k is their mean); dL/dx = g·A + dL/dx̃ / m + that key term.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: float, heads: int, eps: float) -> torch.Tensor:
        out, saved = _fast_forward(x, alpha, heads, eps)
        ctx.names = sorted(saved)
        ctx.alpha = alpha
        ctx.heads = heads
        ctx.save_for_backward(x, *(saved[k] for k in ctx.names))
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        x, *tensors = ctx.saved_tensors
        st = dict(zip(ctx.names, tensors, strict=True))
        alpha, heads = ctx.alpha, ctx.heads
        n, c, h, w = x.shape
        cg, p = c // heads, h * w
        sd = st["r"].dtype
        x5 = x.view(n, heads, cg, h, w)
        g5 = grad_out.view(n, heads, cg, h, w)
        r, a, b, ok = st["r"], st["a"], st["b"], st["ok"]
        gate = torch.sigmoid(-r).pow(alpha)  # (N, G, P)
        grad_gate = torch.sum(g5.to(sd) * x5, dim=2, dtype=sd).view(n, heads, p)
        grad_r = grad_gate * (-alpha) * gate * torch.sigmoid(r)
        q = _safe_ratio(grad_r, a * b, ok)
        beta = _safe_ratio(grad_r * r, a.square(), ok & st["above_x"])
        big_r = torch.where(ok, grad_r * r, torch.zeros_like(r)).sum(2, keepdim=True)  # (N, G, 1)
        uc = st["uc"]
        y = _shifted(x5, st)  # recomputed: (N, G, Cg, H, W), x's layout
        y.sub_(st["mean_y"].view(n, heads, 1, h, w))  # x̃ − mean x̃
        if torch.compiler.is_compiling():
            grad_u = (y * q.view(n, heads, 1, h, w)).sum((3, 4))
        else:
            grad_u = torch.bmm(y.view(n, c, p), q.transpose(1, 2))  # (N, C, G): keep own group
            grad_u = grad_u.view(n, heads, cg, heads).diagonal(dim1=1, dim2=3).transpose(1, 2)
        grad_u = grad_u - _safe_ratio(big_r, b.square(), st["above_k"]) * uc
        grad_key = (grad_u - grad_u.mean(2, keepdim=True)) * st["inv"] / p  # dL/dk_c · 1/(H·W)
        y.mul_(-beta.view(n, heads, 1, h, w))
        y.addcmul_(q.view(n, heads, 1, h, w), uc[..., None, None])
        y.mul_(st["inv"][..., None, None]).add_(grad_key[..., None, None])
        y.addcmul_(g5, gate.view(n, heads, 1, h, w))
        return y.view(n, c, h, w).to(x.dtype), None, None, None


def spsa_fast(x: torch.Tensor, alpha: float = 1.0, heads: int = 1, eps: float = DEFAULT_EPS,
              inplace: bool = False) -> torch.Tensor:
    """SPSA's fast path (the default of `SPSA`); equal to `spsa_reference` up to rounding.

    `inplace=True` writes the output into x (and returns it) when no gradient flows through x
    (otherwise it is ignored), in eager mode only: it saves allocating and writing a new
    full-size tensor, which on a CPU costs as much as the rest of SPSA at large sizes.
    """
    _check_input(x, heads)
    _check_args(x.shape[1], alpha, heads, eps)
    if torch.is_grad_enabled() and x.requires_grad:
        return _SPSAFunction.apply(x, float(alpha), heads, float(eps))
    inplace = inplace and not (torch.compiler.is_compiling() or torch.jit.is_tracing()
                               or torch.onnx.is_in_onnx_export())
    return _fast_forward(x, float(alpha), heads, float(eps), inplace)[0]


class SPSA(nn.Module):
    """Simple parameter-free self-attention approximation on (N, channels, H, W); keeps the shape.

    `alpha` > 0 is the gate's exponent (alpha → 0 approaches the identity), `heads` the number of
    contiguous channel groups (each at least 2 channels), `eps` the relative floor of the
    correlation's denominator (module docstring). `impl="fast"` (default) or `"reference"`.
    `inplace=True` (fast path, no gradient through the input, eager) overwrites the input with
    the output, as `nn.ReLU(inplace=True)` does; the blocks of `spsa_nas.models` use it, their
    input being the fresh output of a BN. No parameters and no buffers.
    """

    def __init__(
        self,
        channels: int,
        *,
        alpha: float = 1.0,
        heads: int = 1,
        eps: float = DEFAULT_EPS,
        impl: Impl = "fast",
        inplace: bool = False,
    ) -> None:
        super().__init__()
        _check_args(channels, alpha, heads, eps)
        if impl not in ("fast", "reference"):
            raise ValueError(f"SPSA: impl must be 'fast' or 'reference', got {impl!r}")
        self.channels = channels
        self.alpha = float(alpha)
        self.heads = heads
        self.eps = float(eps)
        self.impl = impl
        self.inplace = bool(inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.heads, self.channels)
        if self.impl == "reference":
            return spsa_reference(x, self.alpha, self.heads, self.eps)
        return spsa_fast(x, self.alpha, self.heads, self.eps, self.inplace)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, alpha={self.alpha}, heads={self.heads}, "
                f"eps={self.eps}, impl={self.impl}" + (", inplace=True" if self.inplace else ""))
