"""SPSA written with plain torch operators: the decomposition (export, tracing, fallback) and the backward.

Both follow the numerical decisions of `spsa_nas.attention.spsa` (shift by the key's mean s, scale
by 1/m, relative eps, r = 0 where the denominator is degenerate). The functions are TorchScript-
compatible (typed, no dicts), so that `torch.jit.script` can compile them, and written as few,
fusable operators: per group, one mean for the key, then over the shifted and scaled x̃ the
channel sums Σx̃, Σx̃·w (the centred key) and Σx̃², each a one-row matmul (no block-diagonal
matmul, no reduction over a middle axis), and the final scaling of x by the gate. An ONNX graph
of `spsa_decomposed` is therefore a handful of full-tensor nodes that an inference runtime runs in
one pass each (tests/spsa_nas/test_export.py counts them).
"""

from __future__ import annotations

import torch
from torch import Tensor


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are computed in fp32, or fp64 for fp64 input."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tiny(dtype: torch.dtype) -> float:
    """The smallest normal number of the statistics' dtype (torch.finfo is not TorchScript)."""
    return 2.2250738585072014e-308 if dtype == torch.float64 else 1.1754943508222875e-38


def key_stats(k: Tensor, eps: float, cosine: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """From the key k (N, G, Cg, 1, 1) in the statistics' dtype: the shift s and scale 1/m
    (N, G, 1, 1, 1; m = max|k - s|, or 1 for a constant key), the centred scaled key ũ
    (N, G, Cg, 1, 1), its floored norm b and whether b is above its floor (N, G, 1, 1, 1).
    s and 1/m carry no gradient (r does not depend on them).

    `cosine`: no shift (s = 0, m = max|k|), ũ = k/m not centred, b = ‖ũ‖ unfloored ("above" where
    b > 0, i.e. the key is not all zero)."""
    if cosine:
        s = torch.zeros_like(k[:, :, :1])
        m = k.abs().amax(2, keepdim=True).detach()
        inv = torch.reciprocal(torch.where(m > 0, m, torch.ones_like(m)))
        u = k * inv
        b = torch.linalg.vector_norm(u, dim=2, keepdim=True)
        return s, inv, u, b, b > 0
    s = k.mean(2, keepdim=True).detach()
    m = (k - s).abs().amax(2, keepdim=True).detach()
    inv = torch.reciprocal(torch.where(m > 0, m, torch.ones_like(m)))
    u = (k - s) * inv
    uc = u - u.mean(2, keepdim=True)
    norm_k = torch.linalg.vector_norm(uc, dim=2, keepdim=True)
    floor_k = (eps * torch.linalg.vector_norm(k * inv, dim=2, keepdim=True)).detach()
    above_k = norm_k > floor_k
    b = torch.where(above_k, norm_k, floor_k)
    return s, inv, uc, b, above_k


def pixel_correlation(sum_y: Tensor, sum_yu: Tensor, norm_y: Tensor, sum_uc: Tensor, b: Tensor,
                      channels: int, eps: float,
                      cosine: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """r per pixel from Σx̃, Σx̃·ũ and ‖x̃‖ (N, G, 1, H, W); also a (the pixel's floored spread), ok
    (denominator usable) and above_x (a above its floor), as the backward needs them.
    `cosine`: r = Σx̃·ũ / (a·b) with a = max(‖x̃‖, eps·b) (sum_y and sum_uc unused)."""
    if cosine:
        s_xk = sum_yu
        var_x = norm_y.square()
        floor_x = (eps * b).detach().expand_as(var_x)
    else:
        s_xk = sum_yu - sum_y * sum_uc / channels
        var_x = (norm_y.square() - sum_y.square() / channels).clamp_min(0.0)
        floor_x = (eps * norm_y).detach()
    above_x = var_x > floor_x.square()
    a = torch.where(above_x, torch.where(above_x, var_x, torch.ones_like(var_x)).sqrt(), floor_x)
    d = a * b
    ok = torch.isfinite(d) & (d > _tiny(d.dtype))
    r = torch.where(ok, s_xk / torch.where(ok, d, torch.ones_like(d)), torch.zeros_like(d))
    return r, a, ok, above_x


def _grouped(x: Tensor, heads: int) -> Tensor:
    """x (N, C, H, W) as (N, G, C/G, H, W) in the statistics' dtype (a view for fp32/fp64 input)."""
    return x.unflatten(1, [heads, x.shape[1] // heads]).to(stat_dtype(x.dtype))


def _pixel_dot(y: Tensor, uc: Tensor) -> Tensor:
    """Σ_c y·ũ_c per pixel (N, G, 1, H, W), as a batched matmul (no full-size temporary)."""
    n, g, cg, h, w = y.shape
    return torch.matmul(uc.reshape(n, g, 1, cg), y.flatten(3)).unflatten(3, [h, w])


def spsa_stats(x: Tensor, heads: int, eps: float, cosine: bool = False) -> tuple[
        Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Everything SPSA computes before the gate: s, inv, uc, b, above_k (see `key_stats`), the
    pixel mean of x̃ (N, G, 1, H, W; 0 for the cosine, which does not centre), then r, a, ok,
    above_x (see `pixel_correlation`)."""
    x5 = _grouped(x, heads)
    s, inv, uc, b, above_k = key_stats(x5.mean((3, 4), keepdim=True), eps, cosine)
    y = (x5 - s).mul_(inv)  # x̃: shifted and scaled (r is invariant to both); one full-size temporary
    sum_yu = _pixel_dot(y, uc)
    norm_y = torch.linalg.vector_norm(y, dim=2, keepdim=True)
    cg = x5.shape[2]
    sum_y = torch.zeros_like(sum_yu) if cosine else y.sum(2, keepdim=True)
    r, a, ok, above_x = pixel_correlation(sum_y, sum_yu, norm_y, uc.sum(2, keepdim=True), b, cg, eps, cosine)
    return s, inv, uc, b, above_k, sum_y / cg, r, a, ok, above_x


def _channel_sum(weights: Tensor, y: Tensor, fusable: bool) -> Tensor:
    """Σ_c weights_c · y_c per pixel: (N, G, 1, P) from weights (N, G, 1, Cg), or (1, 1, 1, Cg),
    and y (N, G, Cg, P).

    Not fusable: a matmul with one row, which onnxruntime runs as a matrix-vector product in one
    pass over y (its reductions over the channel axis of a (1, 1, Cg, P) tensor take a slow
    generic path, ~15x a pass); fusable: a product and a sum, which inductor fuses with the
    producer of y."""
    if fusable:
        return (y * weights.transpose(2, 3)).sum(2, keepdim=True)
    return torch.matmul(weights, y)


def _power_of_two_inverse(m: Tensor) -> Tensor:
    """1/m rounded down to a power of two, 2^-ceil(log2 m) (1 where m is 0; like 1/m, infinite for
    a subnormal m). r does not depend on the scale of x̃ (the scale keeps x̃ in range: the scaled
    key stays within [-1, 1], no longer always reaching ±1); scaling by a power of two is exact,
    which lets the shift and the scale run as one node (_shift_and_scale)."""
    return torch.pow(0.5, torch.ceil(torch.log2(torch.where(m > 0, m, torch.ones_like(m)))))


def _shift_and_scale(xs: Tensor, s: Tensor, inv: Tensor) -> Tensor:
    """x̃ = (x - s)·inv for xs (N, G, Cg, P) and s, inv (N, G, 1, 1), in one pass: a batch norm in
    inference over the N·G groups as channels, with s as its mean, 1 as its variance (eps 0) and
    inv as its weight, i.e. x·inv + (-s·inv). With inv a power of two both products are exact, so
    its one rounding gives the bits of the two-node (x - s)·inv, shift first (the accuracy at large
    offsets that the shift is for). s is detached (a norm's running mean takes no gradient): the
    output does not depend on it (r is invariant to a shift of x̃), so no gradient is lost."""
    n, g, cg, p = xs.shape
    scale = inv.reshape(n * g)
    y = torch.nn.functional.batch_norm(xs.reshape(1, n * g, cg * p), s.detach().reshape(n * g),
                                       torch.ones_like(scale), scale, torch.zeros_like(scale),
                                       training=False, eps=0.0)
    return y.reshape(n, g, cg, p)


def spsa_decomposed(x: Tensor, alpha: float, heads: int, eps: float, reverse: bool = True,
                    similarity: str = "correlation", fusable: bool = False) -> Tensor:
    """SPSA as plain torch operators (the op's decomposition); equal to `spsa_reference`.

    Written for inference graphs (its gradient is `spsa_backward`, not autograd through it), on x
    as (N, G, Cg, P) with P = H·W (a view, channels_last included). Over the full tensor: one
    mean for the key; x̃ = (x - s)/m; three channel sums Σx̃, Σx̃·ũ and Σx̃² (ũ is centred, so
    Σx̃·ũ = Σ(x̃ - mean x̃)·ũ), each a one-row matmul (one read of x̃; `_channel_sum`) apart from
    the square x̃·x̃; and x times the gate. The rest works on
    (N, G, 1, Cg) or (N, G, 1, P) tensors.
    The floors are maxima of squares (a² = max(var, (eps·‖x̃‖)²)), which equals the where-form of
    `pixel_correlation`; 1 - sigmoid(r) is sigmoid(-r), the sign folded into ũ. The cosine
    (`similarity="cosine"`): x̃ = x/m, Σx̃·k̃ and Σx̃², a² = max(Σx̃², eps²·b²).
    `reverse=False`: the gate is sigmoid(r)^alpha.

    Not fusable (ONNX, TorchScript, the eager fallback): 1/m is rounded down to a power of two
    and x̃ is one batch-norm node, x·(1/m) - s·(1/m), the same bits as the shift then the scale
    (`_shift_and_scale`): one full-size pass less, ~2 % of a ResNet-50's time in onnxruntime.
    `fusable=True` (what torch.compile gets): the channel sums as products and sums instead of
    matmuls, so that inductor computes them in one reduction kernel fused with x̃ (and with the
    producer of x); a matmul is an external kernel that needs x̃ written out first. Same values
    up to rounding.
    """
    sd = stat_dtype(x.dtype)
    cg = x.shape[1] // heads
    x4 = x.flatten(2).unflatten(1, [heads, cg])  # (N, G, Cg, P)
    xs = x4.to(sd)
    k = xs.mean(3, keepdim=True).transpose(2, 3)  # (N, G, 1, Cg): the key, a row
    ones = torch.ones((1, 1, 1, cg), dtype=sd, device=x.device)
    if similarity == "cosine":
        m = k.abs().amax(3, keepdim=True)
        inv = torch.reciprocal(torch.where(m > 0, m, torch.ones_like(m)))
        u = k * inv
        b2 = u.square().sum(3, keepdim=True)
        y = xs * inv
        s_xk = _channel_sum(-u if reverse else u, y, fusable)  # ±Σx̃·k̃ (1 - sigmoid(r) == sigmoid(-r))
        syy = _channel_sum(ones, y * y, fusable)
        a2 = torch.maximum(syy, (eps * eps) * b2)
    else:
        s = k.mean(3, keepdim=True)
        kc = k - s
        m = kc.abs().amax(3, keepdim=True)
        if fusable:
            inv = torch.reciprocal(torch.where(m > 0, m, torch.ones_like(m)))
        else:
            inv = _power_of_two_inverse(m)
        u = kc * inv
        uc = u - u.mean(3, keepdim=True)
        b2 = torch.maximum(uc.square().sum(3, keepdim=True),
                           (eps * eps) * (k * inv).square().sum(3, keepdim=True))
        y = (xs - s) * inv if fusable else _shift_and_scale(xs, s, inv)
        sum_y = _channel_sum(ones, y, fusable)
        # ±Σx̃·ũ = ±Σ(x̃ - mean x̃)·ũ: ũ is centred (twice: k - s, then u - mean u), so the term
        # mean x̃ · Σũ is rounding (~Cg·2^-24 of ‖ũ‖), not worth two more nodes
        s_xk = _channel_sum(-uc if reverse else uc, y, fusable)
        syy = _channel_sum(ones, y * y, fusable)
        a2 = torch.maximum(syy - sum_y * sum_y * (1.0 / cg), (eps * eps) * syy)
    d = (a2 * b2).sqrt()
    ok = (d > _tiny(d.dtype)) & (d < float("inf"))
    gate = torch.sigmoid(torch.where(ok, s_xk / d, torch.zeros_like(d)))
    if alpha != 1.0:
        gate = gate.pow(alpha)
    return (x4 * gate.to(x.dtype)).reshape(x.shape)


def spsa_backward(grad_out: Tensor, x: Tensor, alpha: float, heads: int, eps: float, reverse: bool = True,
                  similarity: str = "correlation") -> Tensor:
    """dL/dx of SPSA, analytically, from x and the statistics recomputed from it.

    With q = dL/dr / (a·b) and β = dL/dr · r / a² (0 where a or a·b is floored / degenerate):
    dL/dx̃ = q·ũ_c − β·(x̃ − mean x̃); through the key, dL/dũ_c = Σ_p q·(x̃ − mean x̃) − R·ũ_c / b²
    with R = Σ_p dL/dr · r (0 where b is floored), centred over the channels and spread as
    1/(H·W) over the pixels (k is their mean); dL/dx = g·A + dL/dx̃ / m + that key term.
    The cosine: the same with mean x̃ = 0 and no centring of dL/dũ (ũ = k/m is not centred).
    dL/dr = Σ_c g·x · dA/dr with dA/dr = ∓alpha·A·sigmoid(±r) (upper sign: reverse).
    """
    cosine = similarity == "cosine"
    s, inv, uc, b, above_k, mean_y, r, a, ok, above_x = spsa_stats(x.detach(), heads, eps, cosine)
    x5 = _grouped(x.detach(), heads)
    g5 = grad_out.unflatten(1, [heads, x.shape[1] // heads]).to(x5.dtype)
    pixels = x.shape[2] * x.shape[3]
    if reverse:
        gate = torch.sigmoid(-r).pow(alpha)
        grad_r = (g5 * x5).sum(2, keepdim=True) * (-alpha) * gate * torch.sigmoid(r)
    else:
        gate = torch.sigmoid(r).pow(alpha)
        grad_r = (g5 * x5).sum(2, keepdim=True) * alpha * gate * torch.sigmoid(-r)
    zero = torch.zeros_like(r)
    q = torch.where(ok, grad_r / torch.where(ok, a * b, torch.ones_like(a)), zero)
    flat = ok & above_x
    beta = torch.where(flat, grad_r * r / torch.where(flat, a.square(), torch.ones_like(a)), zero)
    big_r = torch.where(ok, grad_r * r, zero).sum((3, 4), keepdim=True)
    # one full-size temporary, updated in place: x̃ − mean x̃, then dL/dx
    yc = (x5 - s).mul_(inv).sub_(mean_y)
    n, g = yc.shape[:2]
    grad_u = torch.matmul(yc.flatten(3), q.reshape(n, g, pixels, 1)).unsqueeze(4)  # Σ_p q·yc
    b2 = torch.where(above_k, b.square(), torch.ones_like(b))
    grad_u = grad_u - torch.where(above_k, big_r / b2, torch.zeros_like(b)) * uc
    if not cosine:
        grad_u = grad_u - grad_u.mean(2, keepdim=True)
    grad_key = grad_u * inv / pixels  # dL/dk_c · 1/(H·W)
    grad_x = yc.mul_(-beta).addcmul_(q, uc).mul_(inv).add_(grad_key).addcmul_(g5, gate)
    return grad_x.flatten(1, 2).to(x.dtype)
