"""The spatial-attention baselines of SPSA's Table 2: the non-local block (embedded Gaussian) and the
global-context block — their formulas against a per-position computation, identity at init,
parameter and MAC counts by formula, and every way to trace or export them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from spsa_nas.attention.gc import GCBlock
from spsa_nas.attention.nonlocal_block import NonLocalBlock
from spsa_nas.counting import count_flops, count_params

C = 16


def _randomised(module: nn.Module, seed: int = 0) -> nn.Module:
    """`module` with every parameter and BN statistic drawn at random (no longer the identity), in
    eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm1d):
                bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=generator))
                bn.running_var.uniform_(0.5, 1.5, generator=generator)
    return module.eval()


def _x(size: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, C, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make", [lambda: NonLocalBlock(C), lambda: GCBlock(C)], ids=["nl", "gc"])
@pytest.mark.parametrize("size", [1, 5, 8])
def test_a_new_block_is_the_identity_and_keeps_the_shape(make, size: int) -> None:  # type: ignore[no-untyped-def]
    block = make().eval()
    x = _x(size)
    y = block(x)
    assert y.shape == x.shape
    assert torch.equal(y, x)  # zero-initialised last layer: pre-trained backbones are undisturbed
    assert not torch.equal(_randomised(make())(x), x)


@pytest.mark.parametrize("sub_sample", [False, True])
def test_non_local_block_equals_the_per_position_formula(sub_sample: bool) -> None:
    block = _randomised(NonLocalBlock(C, sub_sample=sub_sample))
    x = _x(6).double()
    block = block.double()
    with torch.no_grad():
        y = block(x)
        pooled = nn.functional.max_pool2d(x, 2, ceil_mode=True) if sub_sample else x
        theta, phi, g = block.theta(x), block.phi(pooled), block.g(pooled)
        expected = torch.empty_like(x)
        for n in range(x.shape[0]):
            keys = phi[n].flatten(1)  # (C', J)
            values = g[n].flatten(1)  # (C', J)
            for i in range(x.shape[2]):
                for j in range(x.shape[3]):
                    f = torch.softmax(theta[n, :, i, j] @ keys, dim=0)  # over every key position
                    y_ij = values @ f  # (C',)
                    w_y = block.out.weight[:, :, 0] @ y_ij
                    bn = block.bn
                    z = (w_y - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
                    expected[n, :, i, j] = x[n, :, i, j] + z
    torch.testing.assert_close(y, expected)


def test_gc_block_equals_the_per_position_formula() -> None:
    block = _randomised(GCBlock(C, rd_ratio=1 / 4)).double()
    x = _x(5).double()
    with torch.no_grad():
        y = block(x)
        conv_k = block.context
        logits = torch.einsum("c,nchw->nhw", conv_k.weight[0, :, 0, 0], x) + conv_k.bias[0]
        weights = torch.softmax(logits.flatten(1), dim=1)  # over positions
        context = torch.einsum("ncp,np->nc", x.flatten(2), weights)[:, :, None, None]
        expected = x + block.transform(context)  # one vector added at every position
    torch.testing.assert_close(y, expected)
    assert torch.allclose(y - x, (y - x)[:, :, :1, :1].expand_as(x))


def test_parameter_counts_follow_the_papers_formulas() -> None:
    inter, hidden = C // 2, C // 16
    # NL: θ, φ, g (C·C' + C' each), W (C'·C, no bias), BN (2C)
    assert count_params(NonLocalBlock(C)) == 3 * (C * inter + inter) + inter * C + 2 * C
    # GC: context conv (C + 1), C→h conv (C·h + h), LayerNorm (2h), h→C conv (h·C + C)
    assert count_params(GCBlock(C)) == (C + 1) + (C * hidden + hidden) + 2 * hidden + (hidden * C + C)


def test_non_local_macs_are_quadratic_in_the_positions_and_counted() -> None:
    h = w = 8
    hw, pooled, inter = h * w, (h // 2) * (w // 2), C // 2
    convs = C * inter * hw + 2 * C * inter * pooled + inter * C * hw  # θ; φ and g; W
    affinity = 2 * hw * pooled * inter  # θᵀφ and the product with g
    batch_norm = 2 * C * hw  # eval BN with affine, fvcore's rule
    assert count_flops(NonLocalBlock(C), (1, C, h, w)) == convs + affinity + batch_norm
    # GC is linear in the positions: the 1x1 context conv and the weighted sum (a C x HW by HW x 1)
    gc = GCBlock(C)
    hidden = C // 16
    layer_norm = 5 * hidden
    assert count_flops(gc, (1, C, h, w)) == C * hw + C * hw + C * hidden + layer_norm + hidden * C


@pytest.mark.parametrize("make", [lambda: NonLocalBlock(C), lambda: GCBlock(C)], ids=["nl", "gc"])
def test_every_way_to_trace_or_export_gives_the_eager_output(make, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    block = _randomised(make())
    x = _x(6)
    with torch.no_grad():
        expected = block(x)
        other = _x(4, seed=3)  # a second size: nothing may be baked in for the first one
        expected_other = block(other)
        traced = torch.jit.trace(block, x)
        torch.testing.assert_close(traced(x), expected)
        torch.testing.assert_close(traced(other), expected_other)
        scripted = torch.jit.script(block)
        torch.testing.assert_close(scripted(other), expected_other)
        graph = torch.fx.symbolic_trace(block)
        torch.testing.assert_close(graph(other), expected_other)
        exported = torch.export.export(block, (x,))
        torch.testing.assert_close(exported.module()(x), expected)
    path = tmp_path / "block.onnx"
    torch.onnx.export(block, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for tensor, want in ((x, expected), (other, expected_other)):
        (got,) = session.run(None, {"x": tensor.numpy()})
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: NonLocalBlock(0), "NonLocalBlock: channels must be a positive int"),
        (lambda: NonLocalBlock(C, reduction=0), "NonLocalBlock: reduction must be a positive int"),
        (lambda: GCBlock(True), "GCBlock: channels must be a positive int"),  # type: ignore[arg-type]
        (lambda: GCBlock(C, rd_ratio=2.0), r"GCBlock: rd_ratio must be in \(0, 1\]"),
    ],
)
def test_bad_arguments_name_the_block(make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        make()
