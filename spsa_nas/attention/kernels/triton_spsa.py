"""SPSA's CUDA kernels in Triton: the key (channel means), then statistics, gate and output per pixel block.

Two launches, both for NCHW- and channels_last-contiguous x (any strides: pointers are computed
from them), fp32/fp16/bf16 in and out with fp32 statistics (the numerics of
`spsa_nas.attention.spsa`):

1. `_key_kernel`: one program per (sample, block of channels) sums its channels over the pixels
   (fp32) into k (N, C).
2. `_spsa_kernel`: one program per (sample, group, block of pixels) derives the group's key
   statistics from k (s, 1/m, the centred scaled key ũ and its floored norm b: Cg values, in
   registers), runs down the group's channels in blocks accumulating Σx̃, Σx̃·ũ and Σx̃² per pixel,
   computes the gate, and runs down the channels again writing x · gate (those reads hit the
   cache). Traffic: x read twice (once from the cache, for small enough blocks) and out written.

The ablation switches are compile-time constants of `_spsa_kernel` (`reverse_`: the gate
1 - sigmoid(r), else sigmoid(r); `cosine_`: s = 0, m = max|k|, ũ = k/m not centred, b = ‖ũ‖,
r = Σx̃·ũ / (a·b) with a = max(‖x̃‖, eps·b)), so the default variant's code is unchanged.

Its numerics are tested on the CPU with Triton's interpreter (`TRITON_INTERPRET=1`, set before
triton is imported), which runs these kernels on CPU tensors; on CUDA by the same tests, when a
GPU is present.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the op falls back to its decomposition on CUDA
    triton = None
    tl = None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """Whether these kernels can run: Triton is installed and a GPU is present (or the interpreter)."""
    return triton is not None and (torch.cuda.is_available() or interpreting())


if triton is not None:

    @triton.jit
    def _key_kernel(x_ptr, k_ptr, c, p, s_n, s_c, s_p, block_c_: tl.constexpr, block_p_: tl.constexpr):
        n = tl.program_id(0)
        cb = tl.program_id(1)
        chans = cb * block_c_ + tl.arange(0, block_c_)
        cmask = chans < c
        acc = tl.zeros([block_c_, block_p_], dtype=tl.float32)
        for p0 in range(0, p, block_p_):
            pix = p0 + tl.arange(0, block_p_)
            mask = cmask[:, None] & (pix < p)[None, :]
            ptrs = x_ptr + n * s_n + chans[:, None] * s_c + pix[None, :] * s_p
            acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(k_ptr + n * c + chans, tl.sum(acc, axis=1) / p, mask=cmask)

    @triton.jit
    def _spsa_kernel(x_ptr, out_ptr, k_ptr, c, cg, p, heads, s_n, s_c, s_p, alpha, eps,
                     cg_pow2: tl.constexpr, block_c_: tl.constexpr, block_p_: tl.constexpr,
                     reverse_: tl.constexpr, cosine_: tl.constexpr):
        ng = tl.program_id(0)
        pb = tl.program_id(1)
        n = ng // heads
        g = ng % heads
        # the group's key statistics (Cg values; cg_pow2 is Cg rounded up to a power of two)
        kidx = tl.arange(0, cg_pow2)
        kmask = kidx < cg
        k = tl.load(k_ptr + n * c + g * cg + kidx, mask=kmask, other=0.0)
        if cosine_:  # no shift, ũ = k/m not centred, b = ‖ũ‖
            s = 0.0
            m = tl.max(tl.where(kmask, tl.abs(k), 0.0), axis=0)
            inv = 1.0 / tl.where(m > 0, m, 1.0)
            mean_u = 0.0
            kk = tl.where(kmask, k * inv, 0.0)
            sum_uc = 0.0
            b = tl.sqrt(tl.sum(kk * kk, axis=0))
        else:
            s = tl.sum(k, axis=0) / cg
            m = tl.max(tl.where(kmask, tl.abs(k - s), 0.0), axis=0)
            inv = 1.0 / tl.where(m > 0, m, 1.0)
            u = tl.where(kmask, (k - s) * inv, 0.0)
            mean_u = tl.sum(u, axis=0) / cg
            uc = tl.where(kmask, u - mean_u, 0.0)
            sum_uc = tl.sum(uc, axis=0)
            norm_k = tl.sqrt(tl.sum(uc * uc, axis=0))
            kk = tl.where(kmask, k * inv, 0.0)
            floor_k = eps * tl.sqrt(tl.sum(kk * kk, axis=0))
            b = tl.where(norm_k > floor_k, norm_k, floor_k)
        s_inv = s * inv

        pix = pb * block_p_ + tl.arange(0, block_p_)
        pmask = pix < p
        base = x_ptr + n * s_n + (g * cg) * s_c
        obase = out_ptr + n * s_n + (g * cg) * s_c
        sy = tl.zeros([block_p_], dtype=tl.float32)
        syu = tl.zeros([block_p_], dtype=tl.float32)
        syy = tl.zeros([block_p_], dtype=tl.float32)
        for c0 in range(0, cg, block_c_):
            chans = c0 + tl.arange(0, block_c_)
            cmask = chans < cg
            mask = cmask[:, None] & pmask[None, :]
            xv = tl.load(base + chans[:, None] * s_c + pix[None, :] * s_p, mask=mask, other=0.0)
            y = tl.where(mask, xv.to(tl.float32) * inv - s_inv, 0.0)
            uch = tl.load(k_ptr + n * c + g * cg + chans, mask=cmask, other=0.0)
            uch = tl.where(cmask, (uch - s) * inv - mean_u, 0.0)  # ũ of these channels
            sy += tl.sum(y, axis=0)
            syu += tl.sum(y * uch[:, None], axis=0)
            syy += tl.sum(y * y, axis=0)
        if cosine_:
            s_xk = syu
            var_x = syy
            floor_x = eps * b + tl.zeros([block_p_], dtype=tl.float32)
        else:
            s_xk = syu - sy * sum_uc / cg
            var_x = tl.maximum(syy - sy * sy / cg, 0.0)
            floor_x = eps * tl.sqrt(syy)
        a = tl.where(var_x > floor_x * floor_x, tl.sqrt(var_x), floor_x)
        d = a * b
        ok = (d > 1.1754943508222875e-38) & (d < float("inf"))
        r = tl.where(ok, s_xk / tl.where(ok, d, 1.0), 0.0)
        if reverse_:  # noqa: SIM108 (a constexpr branch, compiled alone)
            gate = 1.0 / (1.0 + tl.exp(r))  # 1 - sigmoid(r)
        else:
            gate = 1.0 / (1.0 + tl.exp(-r))  # sigmoid(r)
        gate = tl.where(alpha == 1.0, gate, tl.exp(alpha * tl.log(gate)))
        for c0 in range(0, cg, block_c_):
            chans = c0 + tl.arange(0, block_c_)
            mask = (chans < cg)[:, None] & pmask[None, :]
            offsets = chans[:, None] * s_c + pix[None, :] * s_p
            xv = tl.load(base + offsets, mask=mask, other=0.0)
            tl.store(obase + offsets, (xv.to(tl.float32) * gate[None, :]).to(xv.dtype), mask=mask)


def spsa_forward_out(x: torch.Tensor, out: torch.Tensor, alpha: float, heads: int, eps: float,
                     reverse: bool = True, similarity: str = "correlation") -> None:
    """out = SPSA(x) (out may be x; same shape and strides, NCHW or channels_last)."""
    if similarity not in ("correlation", "cosine"):
        raise ValueError(f"spsa triton: similarity must be 'correlation' or 'cosine', got {similarity!r}")
    if triton is None:
        raise RuntimeError("Triton is not installed: the CUDA kernel of SPSA needs it (pip install triton)")
    if x.shape != out.shape or x.stride() != out.stride():
        raise ValueError("spsa triton: out must have x's shape and strides")
    n, c, h, w = x.shape
    p = h * w
    if x.numel() == 0:
        return
    s_n, s_c, s_h, s_w = x.stride()
    if h > 1 and w > 1 and s_h != w * s_w:
        raise ValueError("spsa triton: x must be NCHW- or channels_last-contiguous")
    s_p = s_w if w > 1 else s_h  # pixels are one axis of stride s_p in both layouts
    cg = c // heads
    k = torch.empty(n, c, device=x.device, dtype=torch.float32)
    channels_last = s_c == 1 and c > 1
    block_c = 32 if channels_last else 16
    block_p = 32 if channels_last else 64
    _key_kernel[(n, triton.cdiv(c, block_c))](x, k, c, p, s_n, s_c, s_p, block_c_=block_c, block_p_=block_p)
    _spsa_kernel[(n * heads, triton.cdiv(p, block_p))](
        x, out, k, c, cg, p, heads, s_n, s_c, s_p, float(alpha), float(eps),
        cg_pow2=triton.next_power_of_2(cg), block_c_=block_c, block_p_=block_p,
        reverse_=bool(reverse), cosine_=similarity == "cosine",
    )
