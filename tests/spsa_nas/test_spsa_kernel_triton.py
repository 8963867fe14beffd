"""SPSA's Triton kernel: its numerics on the CPU through Triton's interpreter, on CUDA when a GPU is present.

The interpreter (`TRITON_INTERPRET=1`) must be on before Triton is imported, so those checks run in
a fresh Python process that compares the kernel with the reference on many cases and prints the
errors as JSON; each case is then asserted here. The CUDA tests skip on a machine without CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from spsa_nas.attention import SPSA, spsa_reference

triton = pytest.importorskip("triton")

#: (shape, heads, channels_last, dtype, alpha, reverse, similarity): both layouts, group sizes 2 to
#: 300 (the key's registers padded to a power of two), pixel counts off the block size,
#: fp32/fp16/bf16, and the ablation switches (reverse off, cosine) in both layouts
CASES = [
    ((2, 16, 5, 7), 2, False, "float32", 1.5, True, "correlation"),
    ((2, 16, 5, 7), 1, True, "float32", 1.0, True, "correlation"),
    ((1, 300, 3, 5), 1, False, "float32", 2.0, True, "correlation"),
    ((1, 300, 3, 5), 3, True, "float32", 0.7, True, "correlation"),
    ((3, 8, 1, 1), 4, False, "float32", 1.0, True, "correlation"),
    ((2, 24, 9, 1), 2, True, "float32", 1.0, True, "correlation"),
    ((2, 64, 10, 10), 4, False, "float16", 1.0, True, "correlation"),
    ((2, 64, 10, 10), 2, True, "bfloat16", 1.0, True, "correlation"),
    ((2, 16, 5, 7), 2, False, "float32", 1.5, False, "correlation"),
    ((2, 16, 5, 7), 2, True, "float32", 1.5, True, "cosine"),
    ((1, 300, 3, 5), 3, False, "float32", 0.7, False, "cosine"),
    ((2, 64, 10, 10), 2, True, "float16", 1.0, False, "cosine"),
]
TOLERANCE = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 2e-2}

_SCRIPT = r"""
import json, sys
import torch
from spsa_nas.attention.kernels import triton_spsa
from spsa_nas.attention import spsa_reference
assert triton_spsa.interpreting() and triton_spsa.available()
errors = []
for shape, heads, channels_last, dtype, alpha, reverse, similarity in json.loads(sys.argv[1]):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen) + torch.randn(1, shape[1], 1, 1, generator=gen)
    x[0, :, 0, 0] = 0.5  # a constant pixel vector
    x = x.to(getattr(torch, dtype))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty_like(x)
    triton_spsa.spsa_forward_out(x, out, alpha, heads, 1e-5, reverse, similarity)
    ref = spsa_reference(x.double(), alpha, heads, reverse=reverse, similarity=similarity)
    in_place = x.clone()
    triton_spsa.spsa_forward_out(in_place, in_place, alpha, heads, 1e-5, reverse, similarity)
    err = (out.double() - ref).abs() / (1 + ref.abs())
    errors.append({"err": err[1:].max().item() if shape[0] > 1 else err[:, :, 1:].max().item(),
                   "constant_pixel_err": err[0, :, 0, 0].max().item(),
                   "finite": bool(torch.isfinite(out).all()), "same_layout": out.stride() == x.stride(),
                   "in_place_equal": bool(torch.equal(in_place, out))})
print(json.dumps(errors))
"""


@pytest.fixture(scope="module")
def interpreted() -> list[dict[str, object]]:
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(CASES)], env=env, capture_output=True,
                         text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("index", range(len(CASES)), ids=[
    f"{c[0]}-h{c[1]}-{'cl' if c[2] else 'nchw'}-{c[3]}-{'rev' if c[5] else 'norev'}-{c[6]}" for c in CASES])
def test_interpreted_kernel_equals_reference(interpreted: list[dict[str, object]], index: int) -> None:
    result = interpreted[index]
    assert result["finite"] and result["same_layout"] and result["in_place_equal"]
    assert result["err"] < TOLERANCE[CASES[index][3]]
    # a constant pixel vector's r is fp32 rounding over the eps floor (as in the CPU kernel)
    assert result["constant_pixel_err"] < max(5e-3, TOLERANCE[CASES[index][3]])


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_op_uses_triton_and_equals_reference(channels_last: bool, dtype: torch.dtype) -> None:
    from spsa_nas.attention.kernels import fused_available

    x = torch.randn(4, 64, 14, 14, device="cuda") + torch.randn(1, 64, 1, 1, device="cuda")
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(dtype).contiguous(memory_format=layout)
    assert fused_available(x)
    out = SPSA(64, heads=2)(x)
    ref = spsa_reference(x.double(), 1.0, 2)
    tol = TOLERANCE[str(dtype).removeprefix("torch.")]
    assert ((out.double() - ref).abs() / (1 + ref.abs())).max().item() < tol
    xx = x.float().detach().requires_grad_(True)
    SPSA(64, heads=2)(xx).square().sum().backward()
    ref_x = x.double().detach().requires_grad_(True)
    spsa_reference(ref_x, 1.0, 2).square().sum().backward()
    torch.testing.assert_close(xx.grad.double(), ref_x.grad, atol=1e-3, rtol=1e-3)


@cuda
@pytest.mark.parametrize(("reverse", "similarity"),
                         [(False, "correlation"), (True, "cosine"), (False, "cosine")])
def test_cuda_op_with_switches_equals_reference(reverse: bool, similarity: str) -> None:
    x = torch.randn(4, 64, 14, 14, device="cuda") + torch.randn(1, 64, 1, 1, device="cuda")
    module = SPSA(64, heads=2, reverse=reverse, similarity=similarity)  # type: ignore[arg-type]
    ref = spsa_reference(x.double(), 1.0, 2, reverse=reverse, similarity=similarity)  # type: ignore[arg-type]
    assert ((module(x).double() - ref).abs() / (1 + ref.abs())).max().item() < TOLERANCE["float32"]
    xx = x.detach().requires_grad_(True)
    module(xx).square().sum().backward()
    ref_x = x.double().detach().requires_grad_(True)
    spsa_reference(ref_x, 1.0, 2, reverse=reverse, similarity=similarity).square().sum().backward()  # type: ignore[arg-type]
    torch.testing.assert_close(xx.grad.double(), ref_x.grad, atol=1e-3, rtol=1e-3)
