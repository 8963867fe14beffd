"""Tests of SPSA: fused op == decomposition == reference, gradients, NaN-free extremes, offsets, compile."""

from __future__ import annotations

import math
import warnings
from functools import partial

import pytest
import torch

from spsa_nas.attention import SPSA, spsa_decomposed, spsa_fused, spsa_reference

FAST = [spsa_fused, spsa_decomposed]


def _rand(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    # a per-channel offset so the key is not ~0, and a per-pixel one so pixels differ in level
    x = x + torch.randn(1, shape[1], 1, 1, generator=gen, dtype=torch.float64).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _corr_gate(x: torch.Tensor, alpha: float, heads: int) -> torch.Tensor:
    """The gate from torch.corrcoef, pixel by pixel (tiny inputs only)."""
    n, c, h, w = x.shape
    cg = c // heads
    gate = torch.empty(n, heads, h, w, dtype=x.dtype)
    for i in range(n):
        for g in range(heads):
            block = x[i, g * cg:(g + 1) * cg]
            key = block.mean((1, 2))
            for yy in range(h):
                for xx in range(w):
                    r = torch.corrcoef(torch.stack([block[:, yy, xx], key]))[0, 1]
                    gate[i, g, yy, xx] = (1 - torch.sigmoid(r)) ** alpha
    return gate


@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_reference_equals_corrcoef(heads: int, alpha: float) -> None:
    x = _rand((2, 8, 3, 4), torch.float64, False, seed=heads)
    gate = _corr_gate(x, alpha, heads)
    expected = (x.view(2, heads, 8 // heads, 3, 4) * gate[:, :, None]).view_as(x)
    torch.testing.assert_close(spsa_reference(x, alpha, heads), expected)
    for fn in FAST:
        torch.testing.assert_close(fn(x, alpha, heads), expected)


CASES = [
    # (shape, heads): random small shapes, heads leaving >= 4 channels per group
    ((2, 16, 5, 7), 1),
    ((3, 16, 4, 4), 2),
    ((1, 32, 6, 3), 4),
    ((2, 24, 1, 9), 2),
    ((2, 12, 8, 8), 1),
]


@pytest.mark.parametrize("fn", FAST)
@pytest.mark.parametrize(("shape", "heads"), CASES)
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_equals_reference(
    fn: object, shape: tuple[int, ...], heads: int, alpha: float, dtype: torch.dtype, channels_last: bool
) -> None:
    x = _rand(shape, dtype, channels_last, seed=sum(shape) + heads)
    fast = fn(x, alpha, heads)  # type: ignore[operator]
    ref = spsa_reference(x, alpha, heads)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(fast, ref, atol=tol, rtol=tol)
    if channels_last:
        assert fast.is_contiguous(memory_format=torch.channels_last)
    # the gate really varies (r is not trivially 0)
    gate = (fast / x).flatten()
    assert gate.max() - gate.min() > 0.05


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_backward_equals_reference(fast: object, channels_last: bool, dtype: torch.dtype) -> None:
    x = _rand((2, 16, 5, 6), dtype, channels_last, seed=7)
    grad = _rand((2, 16, 5, 6), dtype, channels_last, seed=8)
    grads = []
    for fn in (fast, spsa_reference):
        xx = x.clone().requires_grad_(True)
        fn(xx, 1.5, 2).backward(grad)  # type: ignore[operator]
        grads.append(xx.grad)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(grads[0], grads[1], atol=tol, rtol=tol)
    if channels_last:
        assert grads[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("fn", [*FAST, spsa_reference])
@pytest.mark.parametrize(("heads", "alpha"), [(1, 1.0), (2, 0.7), (4, 2.5)])
def test_gradcheck_float64(fn: object, heads: int, alpha: float) -> None:
    x = _rand((2, max(6, 3 * heads), 3, 3), torch.float64, False, seed=heads)  # 3+ channels a head
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: fn(t, alpha, heads), (x,))  # type: ignore[operator]


@pytest.mark.parametrize("fn", FAST)
def test_gradcheck_channels_last(fn: object) -> None:
    x = _rand((1, 6, 3, 3), torch.float64, True, seed=3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: fn(t, 1.0, 2), (x,))  # type: ignore[operator]


def _finite_forward_backward(fn: object, x: torch.Tensor, heads: int = 2) -> torch.Tensor:
    xx = x.clone().requires_grad_(True)
    out = fn(xx, 1.0, heads)  # type: ignore[operator]
    assert out.dtype == x.dtype and out.shape == x.shape
    assert torch.isfinite(out).all(), "forward produced NaN/inf"
    out.float().sum().backward()
    assert xx.grad is not None and torch.isfinite(xx.grad).all(), "backward produced NaN/inf"
    return out


def _degenerate_inputs() -> dict[str, torch.Tensor]:
    x = torch.randn(2, 8, 4, 5)
    zero_bn = torch.zeros(2, 8, 4, 5) + torch.randn(1, 8, 1, 1)  # zero-init last BN: bias only
    const_pixels = torch.randn(2, 1, 4, 5).expand(2, 8, 4, 5).contiguous()  # each pixel constant
    mixed = x.clone()
    mixed[:, :, 0, 0] = 3.0
    mixed[:, :, 1, 1] = 0.0
    return {
        "zeros": torch.zeros(2, 8, 4, 5),
        "ones": torch.ones(2, 8, 4, 5),
        "zero_bn": zero_bn,
        "const_pixels": const_pixels,
        "some_constant_pixels": mixed,
        "huge_1e4": x * 1e4,
        "huge_1e30": x * 1e30,
        "huge_const_pixels_1e30": const_pixels * 1e30,
        "offset_1e30": x + 1e30,
        "tiny_1e-30": x * 1e-30,
        "tiny_const_pixels": const_pixels * 1e-30,
        "one_by_one": torch.randn(2, 8, 1, 1),
    }


@pytest.mark.parametrize("fn", [*FAST, spsa_reference])
@pytest.mark.parametrize("case", list(_degenerate_inputs()))
def test_no_nan_or_inf(fn: object, case: str) -> None:
    torch.manual_seed(0)
    _finite_forward_backward(fn, _degenerate_inputs()[case])


@pytest.mark.parametrize("fn", [*FAST, spsa_reference])
def test_constant_pixel_vector_gives_r_zero(fn: object) -> None:
    torch.manual_seed(1)
    x = torch.randn(1, 8, 4, 4)
    x[:, :, 2, 3] = 0.7  # constant over channels
    out = fn(x, 1.0, 1)  # type: ignore[operator]
    assert out[0, 0, 2, 3] / 0.7 == pytest.approx(0.5, abs=1e-3)
    zeros = fn(torch.zeros(1, 8, 4, 4), 1.0, 1)  # type: ignore[operator]
    assert torch.equal(zeros, torch.zeros(1, 8, 4, 4))


@pytest.mark.parametrize("fn", [*FAST, spsa_reference])
@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1e4, 1e30])
def test_scale_invariant(fn: object, scale: float) -> None:
    x = _rand((2, 16, 5, 5), torch.float32, False, seed=11)
    gate = fn(x, 1.0, 2) / x  # type: ignore[operator]
    scaled = x * scale
    gate_scaled = fn(scaled, 1.0, 2) / scaled  # type: ignore[operator]
    torch.testing.assert_close(gate_scaled, gate, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fn", [*FAST, spsa_reference])
def test_half_precision(dtype: torch.dtype, fn: object) -> None:
    x = _rand((2, 16, 5, 5), torch.float32, False, seed=12)
    out = _finite_forward_backward(fn, x.to(dtype))
    expected = spsa_reference(x.double(), 1.0, 2)
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    big_input = (x / x.abs().max() * 6e4).to(dtype)  # up to fp16's max: squares need fp32 stats
    assert torch.isfinite(big_input).all()
    big = _finite_forward_backward(fn, big_input)
    assert torch.isfinite(big).all()


def _one_pass_shortcut_out(x: torch.Tensor) -> torch.Tensor:
    """SPSA with the naive one-pass variance Σx² − (Σx)²/C in x's dtype (what we avoid)."""
    c = x.shape[1]
    k = x.mean((2, 3), keepdim=True)
    sx, sxx = x.sum(1, keepdim=True), (x * x).sum(1, keepdim=True)
    sk, skk = k.sum(1, keepdim=True), (k * k).sum(1, keepdim=True)
    sxk = (x * k).sum(1, keepdim=True)
    cov = sxk - sx * sk / c
    var_x = (sxx - sx * sx / c).clamp_min(0)
    var_k = (skk - sk * sk / c).clamp_min(0)
    r = cov / (var_x * var_k).sqrt().clamp_min(1e-30)
    return x * torch.sigmoid(-r)


def test_offset_accuracy() -> None:
    gen = torch.Generator().manual_seed(5)
    x64 = 100.0 + torch.randn(4, 64, 8, 8, generator=gen, dtype=torch.float64)
    x32 = x64.float()
    truth = spsa_reference(x32.double(), 1.0, 1)

    def err(out: torch.Tensor) -> float:
        return ((out.double() - truth) / x32.double()).abs().max().item()  # error of the gate

    ref, naive = err(spsa_reference(x32)), err(_one_pass_shortcut_out(x32))
    for fn in FAST:
        fast = err(fn(x32))
        assert fast < 1e-5
        assert fast <= 4 * ref + 1e-7
        assert naive > 50 * fast  # the test can tell a one-pass shortcut from the shifted one


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [0.0, 100.0, -3e4])
def test_the_one_node_shift_and_scale_has_the_bits_of_shift_then_scale(dtype: torch.dtype,
                                                                      offset: float) -> None:
    """The decomposition's x̃ is one batch norm, x·(1/m) - s·(1/m), with 1/m rounded to a power of
    two (both products exact): the same bits as (x - s)·(1/m), the shift first, at any offset."""
    from spsa_nas.attention.kernels.composite import _power_of_two_inverse, _shift_and_scale

    gen = torch.Generator().manual_seed(11)
    xs = (offset + torch.randn(3, 2, 16, 49, generator=gen, dtype=torch.float64)).to(dtype)
    s = xs.mean(3, keepdim=True).mean(2, keepdim=True)
    m = (xs.mean(3, keepdim=True) - s).abs().amax(2, keepdim=True)
    m[0, 1] = 0.0  # a constant key: scale 1
    inv = _power_of_two_inverse(m)
    assert torch.equal(torch.frexp(inv).mantissa, torch.full_like(inv, 0.5))  # powers of two
    assert (inv <= 1 / torch.where(m > 0, m, torch.ones_like(m))).all() and inv[0, 1].item() == 1.0
    assert ((m * inv > 0.5) | (m == 0)).all()  # rounded down by less than a factor 2
    assert torch.equal(_shift_and_scale(xs, s, inv), (xs - s) * inv)


def test_parameter_free_and_stateless() -> None:
    module = SPSA(64, alpha=2.0, heads=4)
    assert list(module.parameters()) == [] and module.state_dict() == {}
    assert list(module.buffers()) == []


def test_small_alpha_is_nearly_identity() -> None:
    x = _rand((2, 8, 4, 4), torch.float32, False, seed=13)
    torch.testing.assert_close(SPSA(8, alpha=1e-6)(x), x, atol=1e-5, rtol=1e-5)


def test_module_impls_agree() -> None:
    x = _rand((2, 16, 4, 4), torch.float32, True, seed=14)
    ref = SPSA(16, alpha=1.5, heads=2, impl="reference")(x)
    for impl in ("fused", "decomposed"):
        torch.testing.assert_close(SPSA(16, alpha=1.5, heads=2, impl=impl)(x), ref, atol=2e-5, rtol=2e-5)
    assert SPSA(16).impl == "fused"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"heads": 3}, "does not divide"),
        ({"heads": 16}, "at least 2"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": math.inf}, "alpha"),
        ({"eps": 0.0}, "eps"),
        ({"impl": "cuda"}, "impl"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SPSA(16, **kwargs)  # type: ignore[arg-type]


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="built for 16 channels"):
        SPSA(16)(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="4-D"):
        SPSA(16)(torch.randn(16, 4, 4))


@pytest.mark.parametrize("impl", ["fused", "decomposed"])
@pytest.mark.parametrize("backend", ["aot_eager"])
def test_torch_compile(backend: str, impl: str) -> None:
    torch._dynamo.reset()
    x = _rand((2, 16, 4, 5), torch.float32, False, seed=15)
    module = SPSA(16, alpha=1.5, heads=2, impl=impl)
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    xx = x.clone().requires_grad_(True)
    out = compiled(xx)
    out.square().sum().backward()
    ref_x = x.clone().requires_grad_(True)
    ref = spsa_reference(ref_x, 1.5, 2)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(xx.grad, ref_x.grad, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("heads", [1, 4])
def test_fused_backward_saves_only_x(heads: int) -> None:
    x = _rand((2, 32, 8, 8), torch.float32, False, seed=16).requires_grad_(True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = spsa_fused(x, 1.0, heads)
    assert len(saved) == 1 and saved[0].data_ptr() == x.data_ptr()  # x itself, nothing else
    out.sum().backward()
    # the reference, through autograd, keeps several full-size intermediates alive
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        spsa_reference(x, 1.0, heads)
    assert sum(t.numel() >= x.numel() for t in saved) >= 3


# --- the ablation switches (issue 13): reverse and similarity ---------------------------------------

#: (reverse, similarity): the four combinations; the first is the default operator
SWITCHES = [(True, "correlation"), (False, "correlation"), (True, "cosine"), (False, "cosine")]
SWITCH_IDS = [f"{'rev' if r else 'norev'}-{s}" for r, s in SWITCHES]


def _plain_switched_gate(x: torch.Tensor, alpha: float, heads: int, reverse: bool,
                         similarity: str) -> torch.Tensor:
    """A from the switched formula, in float64, written out plainly (random inputs: no eps needed)."""
    n, c, h, w = x.shape
    xs = x.double().reshape(n, heads, c // heads, h, w)
    key = xs.mean((3, 4), keepdim=True)
    if similarity == "correlation":  # Pearson: centre both over the group's channels
        xs, key = xs - xs.mean(2, keepdim=True), key - key.mean(2, keepdim=True)
    r = (xs * key).sum(2) / (xs.norm(dim=2) * key.norm(dim=2))  # cosine of the (centred) vectors
    gate = 1 - torch.sigmoid(r) if reverse else torch.sigmoid(r)
    return gate**alpha  # (N, heads, H, W)


def _switched(fn: object, x: torch.Tensor, alpha: float, heads: int, reverse: bool,
              similarity: str) -> torch.Tensor:
    return fn(x, alpha, heads, reverse=reverse, similarity=similarity)  # type: ignore[operator]


@pytest.mark.parametrize(("reverse", "similarity"), SWITCHES, ids=SWITCH_IDS)
@pytest.mark.parametrize("fn", [*FAST, spsa_reference])
@pytest.mark.parametrize(("heads", "alpha"), [(1, 1.0), (2, 0.7)])
def test_switches_equal_the_plain_float64_formula(fn: object, reverse: bool, similarity: str, heads: int,
                                                  alpha: float) -> None:
    x = _rand((2, 8, 3, 4), torch.float64, False, seed=20 + heads)
    gate = _plain_switched_gate(x, alpha, heads, reverse, similarity)
    expected = (x.view(2, heads, 8 // heads, 3, 4) * gate[:, :, None]).view_as(x)
    torch.testing.assert_close(_switched(fn, x, alpha, heads, reverse, similarity), expected,
                               atol=1e-12, rtol=1e-12)


def test_the_switches_change_the_operator() -> None:
    """Each switch really changes A (so the tests above can tell the variants apart)."""
    x = _rand((2, 16, 5, 5), torch.float64, False, seed=21)
    outs = {sw: spsa_reference(x, 1.0, 2, reverse=sw[0], similarity=sw[1]) for sw in SWITCHES}  # type: ignore[arg-type]
    for a in SWITCHES:
        for b in SWITCHES:
            if a != b:
                assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)
    # alpha = 1: sigmoid(r) = 1 - (1 - sigmoid(r)), so the two gates sum to x
    for sim in ("correlation", "cosine"):
        torch.testing.assert_close(outs[(True, sim)] + outs[(False, sim)], x)


@pytest.mark.parametrize(("reverse", "similarity"), SWITCHES, ids=SWITCH_IDS)
@pytest.mark.parametrize("fn", FAST)
@pytest.mark.parametrize(("shape", "heads"), CASES[:3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_switched_fast_equals_reference(fn: object, reverse: bool, similarity: str, shape: tuple[int, ...],
                                        heads: int, dtype: torch.dtype, channels_last: bool) -> None:
    x = _rand(shape, dtype, channels_last, seed=sum(shape) + heads)
    fast = _switched(fn, x, 1.5, heads, reverse, similarity)
    ref = spsa_reference(x, 1.5, heads, reverse=reverse, similarity=similarity)  # type: ignore[arg-type]
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(fast, ref, atol=tol, rtol=tol)
    if channels_last:
        assert fast.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(("reverse", "similarity"), SWITCHES, ids=SWITCH_IDS)
@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_switched_backward_equals_reference(fast: object, reverse: bool, similarity: str,
                                            dtype: torch.dtype) -> None:
    x = _rand((2, 16, 5, 6), dtype, False, seed=27)
    grad = _rand((2, 16, 5, 6), dtype, False, seed=28)
    grads = []
    for fn in (fast, spsa_reference):
        xx = x.clone().requires_grad_(True)
        _switched(fn, xx, 1.5, 2, reverse, similarity).backward(grad)
        grads.append(xx.grad)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(grads[0], grads[1], atol=tol, rtol=tol)


@pytest.mark.parametrize(("reverse", "similarity"), SWITCHES, ids=SWITCH_IDS)
@pytest.mark.parametrize("fn", [*FAST, spsa_reference])
@pytest.mark.parametrize("channels_last", [False, True])
def test_switched_gradcheck_float64(fn: object, reverse: bool, similarity: str, channels_last: bool) -> None:
    x = _rand((2, 6, 3, 3), torch.float64, channels_last, seed=29).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: _switched(fn, t, 1.3, 2, reverse, similarity), (x,))


@pytest.mark.parametrize(("reverse", "similarity"), SWITCHES[1:], ids=SWITCH_IDS[1:])
@pytest.mark.parametrize("fn", [*FAST, spsa_reference])
@pytest.mark.parametrize("case", list(_degenerate_inputs()))
def test_switched_no_nan_or_inf(fn: object, case: str, reverse: bool, similarity: str) -> None:
    torch.manual_seed(0)
    _finite_forward_backward(partial(fn, reverse=reverse, similarity=similarity),  # type: ignore[arg-type]
                             _degenerate_inputs()[case])


@pytest.mark.parametrize("reverse", [True, False])
@pytest.mark.parametrize("fn", [*FAST, spsa_reference])
def test_cosine_degenerate_pixels_and_keys(fn: object, reverse: bool) -> None:
    """Cosine: an all-zero pixel vector and an all-zero key give r = 0 (A = 0.5 ** alpha); a constant
    pixel vector is NOT degenerate (it has a cosine with the key, unlike a correlation); a pixel
    far below eps times the key's norm has r ≈ 0 and a finite gradient."""
    torch.manual_seed(2)
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64) + 1.0
    x[0, :, 1, 1] = 0.0
    x[0, :, 2, 2] = 0.7
    x[0, :, 3, 3] = 1e-12 * torch.randn(8, dtype=torch.float64)
    x[1] = 0.0
    half = torch.randint(-4, 5, (4, 2, 4), dtype=torch.float64) / 4  # dyadic: sums are exact
    x[2, :4] = torch.cat([half, -half], dim=1)  # head 0's key is exactly zero
    xx = x.clone().requires_grad_(True)
    out = _switched(fn, xx, 2.0, 2, reverse, "cosine")
    out.square().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(xx.grad).all()  # type: ignore[arg-type]
    assert torch.equal(out[0, :, 1, 1], torch.zeros(8, dtype=torch.float64))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[2, :4], x[2, :4] * 0.25)  # zero key: r = 0, A = 0.5 ** 2
    gate = _plain_switched_gate(x[:1], 2.0, 2, reverse, "cosine")
    torch.testing.assert_close(out[0, :4, 2, 2] / 0.7, gate[0, 0, 2, 2].expand(4))
    assert abs(float(out[0, 0, 3, 3].detach() / x[0, 0, 3, 3]) - 0.25) < 1e-4  # r ≈ 0 below the eps floor


@pytest.mark.parametrize("fn", [*FAST, spsa_reference])
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_cosine_is_scale_invariant_but_not_shift_invariant(fn: object, scale: float) -> None:
    x = _rand((2, 16, 5, 5), torch.float32, False, seed=31)
    gate = _switched(fn, x, 1.0, 2, True, "cosine") / x
    scaled = x * scale
    torch.testing.assert_close(_switched(fn, scaled, 1.0, 2, True, "cosine") / scaled, gate,
                               atol=1e-5, rtol=1e-5)
    shifted = x + 3.0
    assert (_switched(fn, shifted, 1.0, 2, True, "cosine") / shifted - gate).abs().max() > 1e-2
    corr = _switched(fn, shifted, 1.0, 2, True, "correlation") / shifted  # Pearson: shift-invariant
    torch.testing.assert_close(corr, _switched(fn, x, 1.0, 2, True, "correlation") / x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("reverse", "similarity"), SWITCHES, ids=SWITCH_IDS)
def test_switched_module_impls_agree_and_show_in_repr(reverse: bool, similarity: str) -> None:
    x = _rand((2, 16, 4, 4), torch.float32, True, seed=32)
    kwargs = {"alpha": 1.5, "heads": 2, "reverse": reverse, "similarity": similarity}
    ref = SPSA(16, impl="reference", **kwargs)(x)  # type: ignore[arg-type]
    for impl in ("fused", "decomposed"):
        module = SPSA(16, impl=impl, **kwargs)  # type: ignore[arg-type]
        torch.testing.assert_close(module(x), ref, atol=2e-5, rtol=2e-5)
        with torch.no_grad():
            torch.testing.assert_close(SPSA(16, impl=impl, inplace=True, **kwargs)(x.clone()), ref,  # type: ignore[arg-type]
                                       atol=2e-5, rtol=2e-5)
    text = repr(SPSA(16, **kwargs))  # type: ignore[arg-type]
    assert ("reverse=False" in text) == (not reverse)
    assert ("similarity=cosine" in text) == (similarity == "cosine")


def test_defaults_are_the_paper_operator() -> None:
    module = SPSA(16)
    assert module.reverse is True and module.similarity == "correlation"
    assert "reverse" not in repr(module) and "similarity" not in repr(module)
    x = _rand((2, 16, 4, 4), torch.float32, False, seed=33)
    explicit = spsa_fused(x, 1.0, 2, reverse=True, similarity="correlation")
    torch.testing.assert_close(explicit, spsa_fused(x, 1.0, 2), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"similarity": "dot"}, "similarity must be one of correlation, cosine, got 'dot'"),
        ({"similarity": None}, "similarity must be one of"),
        ({"reverse": 1}, "reverse must be a bool"),
        ({"reverse": "false"}, "reverse must be a bool"),
    ],
)
def test_bad_switches(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SPSA(16, **kwargs)  # type: ignore[arg-type]
    x = torch.randn(1, 16, 2, 2)
    for fn in (spsa_reference, spsa_decomposed, spsa_fused):
        with pytest.raises(ValueError, match=message):
            fn(x, 1.0, 2, **kwargs)  # type: ignore[arg-type]


def test_similarities_are_exported() -> None:
    from spsa_nas.attention import SIMILARITIES

    assert SIMILARITIES == ("correlation", "cosine")


@pytest.mark.parametrize(("reverse", "similarity"), SWITCHES[1:], ids=SWITCH_IDS[1:])
def test_switched_torchscript_and_trace_take_the_decomposition(reverse: bool, similarity: str) -> None:
    module = SPSA(16, alpha=1.5, heads=2, reverse=reverse, similarity=similarity).eval()  # type: ignore[arg-type]
    x = _rand((2, 16, 4, 5), torch.float32, False, seed=34)
    expected = spsa_reference(x, 1.5, 2, reverse=reverse, similarity=similarity)  # type: ignore[arg-type]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(module)
        traced = torch.jit.trace(module, x)
    torch.testing.assert_close(scripted(x), expected, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(traced(x * 0.5 + 1.0), spsa_reference(x * 0.5 + 1.0, 1.5, 2, reverse=reverse,
                                                                     similarity=similarity),  # type: ignore[arg-type]
                               atol=2e-5, rtol=2e-5)
    assert "spsa_nas::" not in str(traced.graph)


@pytest.mark.parametrize(("reverse", "similarity"), SWITCHES, ids=SWITCH_IDS)
@pytest.mark.parametrize("impl", ["fused", "decomposed"])
def test_torch_compile_takes_the_decomposition(impl: str, reverse: bool, similarity: str) -> None:
    """Under torch.compile SPSA is plain reductions (no opaque custom op: inductor can fuse them with
    the neighbours, issue 11), with the switches, forward and backward equal to the reference."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    graphs: list[torch.fx.GraphModule] = []  # the forward and backward graphs, in aten operators

    def keep(gm: torch.fx.GraphModule, example: object) -> object:
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    x = _rand((2, 16, 4, 5), torch.float32, False, seed=35)
    module = SPSA(16, alpha=1.5, heads=2, impl=impl, reverse=reverse, similarity=similarity)  # type: ignore[arg-type]
    compiled = torch.compile(module, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    xx = x.clone().requires_grad_(True)
    out = compiled(xx)
    out.square().sum().backward()
    ref_x = x.clone().requires_grad_(True)
    ref = spsa_reference(ref_x, 1.5, 2, reverse=reverse, similarity=similarity)  # type: ignore[arg-type]
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(xx.grad, ref_x.grad, atol=1e-4, rtol=1e-4)
    assert len(graphs) == 2  # forward and backward
    for graph in graphs:
        ops = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
        assert not any("spsa_nas" in op for op in ops), ops
        assert {"aten.sigmoid.default", "aten.mean.dim", "aten.sum.dim_IntList"} <= ops, ops
    forward = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert "aten.bmm.default" not in forward  # the fusable form: sums, not an external matmul


@pytest.mark.parametrize(("reverse", "similarity"), SWITCHES, ids=SWITCH_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fusable_decomposition_equals_the_matmul_one(reverse: bool, similarity: str,
                                                     dtype: torch.dtype) -> None:
    from spsa_nas.attention.kernels import composite

    x = _rand((2, 16, 5, 6), dtype, True, seed=38)
    args = (1.5, 2, 1e-5, reverse, similarity)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(composite.spsa_decomposed(x, *args, fusable=True),
                               composite.spsa_decomposed(x, *args), atol=tol, rtol=tol)


@pytest.mark.parametrize(("reverse", "similarity"), SWITCHES[1:], ids=SWITCH_IDS[1:])
def test_export_keeps_the_switched_op(reverse: bool, similarity: str) -> None:
    from spsa_nas.attention.kernels import DECOMPOSITIONS

    module = SPSA(16, alpha=1.5, heads=2, reverse=reverse, similarity=similarity).eval()  # type: ignore[arg-type]
    x = _rand((2, 16, 4, 5), torch.float32, False, seed=36)
    program = torch.export.export(module, (x,))
    (node,) = [n for n in program.graph.nodes if n.op == "call_function"]
    assert node.target == torch.ops.spsa_nas.spsa.default
    expected = spsa_reference(x, 1.5, 2, reverse=reverse, similarity=similarity)  # type: ignore[arg-type]
    torch.testing.assert_close(program.module()(x), expected, atol=2e-5, rtol=2e-5)
    decomposed = program.run_decompositions(DECOMPOSITIONS)
    assert "spsa_nas" not in str(decomposed.graph)
    torch.testing.assert_close(decomposed.module()(x), expected, atol=2e-5, rtol=2e-5)


def test_the_op_keeps_its_old_signature_and_defaults() -> None:
    """Calls (and stored graphs) without the switches keep working: the schema has defaults."""
    schema = str(torch.ops.spsa_nas.spsa.default._schema)
    assert 'bool reverse=True, str similarity="correlation"' in schema
    x = _rand((2, 8, 3, 3), torch.float32, False, seed=37)
    torch.testing.assert_close(torch.ops.spsa_nas.spsa(x, 1.0, 2, 1e-5), spsa_reference(x, 1.0, 2),
                               atol=2e-5, rtol=2e-5)
    cosine = torch.ops.spsa_nas.spsa(x, 1.0, 2, 1e-5, reverse=False, similarity="cosine")
    torch.testing.assert_close(cosine, spsa_reference(x, 1.0, 2, reverse=False, similarity="cosine"),
                               atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="similarity must be 'correlation' or 'cosine', got 'dot'"):
        torch.ops.spsa_nas.spsa(x, 1.0, 2, 1e-5, True, "dot")
