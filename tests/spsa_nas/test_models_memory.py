"""SPSA memory: recomputing the last BN + attention in training; the fast path in batch slices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spsa_nas.attention import SPSA, spsa_fast
from spsa_nas.counting import saved_for_backward_bytes
from spsa_nas.models import build_model, set_memory_efficient
from spsa_nas.spec import ArchSpec, StageSpec

SMALL = {"stem": "cifar", "input_size": 32, "width": 0.25, "num_classes": 10}


def _spec(backbone: str, stage: StageSpec) -> ArchSpec:
    return ArchSpec.uniform(backbone, stage, **SMALL)


def _inputs(batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=generator, dtype=dtype)
    return x, torch.randint(0, 10, (batch,), generator=generator)


def _count_spsa_calls(model: nn.Module) -> list[int]:
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    for module in model.modules():
        if isinstance(module, SPSA):
            module.register_forward_pre_hook(hook)  # the recomputation may stop inside SPSA
    return calls


def _one_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients after one training step's backward, and the buffers after its forward."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # MobileNetV2's classifier dropout: the same mask for both models
    nn.functional.cross_entropy(model(x), y).backward()
    result = {f"grad:{name}": p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    result |= {f"buffer:{name}": b.clone() for name, b in model.named_buffers()}
    return result


CASES = {
    "resnet50-spsa-se": ("resnet50", StageSpec(spsa=True, channel_attn="se")),
    "resnet18-cbam-spsa": ("resnet18", StageSpec(spsa=True, channel_attn="cbam", attn_order="spsa_first")),
    "mobilenet_v2-spsa-eca": ("mobilenet_v2", StageSpec(spsa=True, channel_attn="eca")),
    "shufflenet-spsa": ("shufflenet_v2_x1_0", StageSpec(spsa=True)),
    "shufflenet-spsa-fca": ("shufflenet_v2_x1_0", StageSpec(spsa=True, channel_attn="fca",
                                                            attn_order="spsa_first")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_recomputation_gives_the_same_gradients_and_running_stats(case: str) -> None:
    backbone, stage = CASES[case]
    torch.manual_seed(0)
    efficient = build_model(_spec(backbone, stage)).double()
    plain = build_model(_spec(backbone, stage), memory_efficient=False).double()
    plain.load_state_dict(efficient.state_dict())
    for model in (efficient, plain):  # non-trivial running statistics and BN affine parameters
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                generator = torch.Generator().manual_seed(module.num_features)
                module.running_mean.uniform_(-0.2, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.weight.data.uniform_(0.5, 1.5, generator=generator)
                module.bias.data.uniform_(-0.2, 0.2, generator=generator)
    x, y = _inputs(4, torch.float64)
    calls_efficient, calls_plain = _count_spsa_calls(efficient), _count_spsa_calls(plain)
    got, expected = _one_step(efficient, x, y), _one_step(plain, x, y)
    blocks = sum(isinstance(m, SPSA) for m in efficient.modules())
    # the recomputation really ran: every SPSA forward twice (forward + backward) against once
    assert (calls_efficient[0], calls_plain[0]) == (2 * blocks, blocks)
    assert got.keys() == expected.keys()
    assert any(key.startswith("buffer:") and key.endswith("num_batches_tracked") for key in got)
    for key, value in expected.items():
        if key.endswith("num_batches_tracked"):
            assert int(got[key]) == int(value) == 1, key  # updated once, not once per recomputation
        else:
            torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-12, msg=key)


def test_a_second_step_still_matches() -> None:
    """Running stats after two steps (momentum applied twice, never thrice or four times)."""
    torch.manual_seed(0)
    stage = StageSpec(spsa=True, channel_attn="cbam")
    efficient = build_model(_spec("resnet18", stage)).double()
    plain = build_model(_spec("resnet18", stage), memory_efficient=False).double()
    plain.load_state_dict(efficient.state_dict())
    x, y = _inputs(4, torch.float64)
    for _ in range(2):
        got, expected = _one_step(efficient, x, y), _one_step(plain, x, y)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-12, msg=key)


def test_recomputation_under_bf16_autocast_and_channels_last() -> None:
    """The recomputation runs under the forward's autocast state (as train.py uses it)."""
    torch.manual_seed(0)
    stage = StageSpec(spsa=True, channel_attn="se")
    efficient = build_model(_spec("resnet18", stage)).to(memory_format=torch.channels_last)
    plain = build_model(_spec("resnet18", stage), memory_efficient=False)
    plain.load_state_dict(efficient.state_dict())
    plain.to(memory_format=torch.channels_last)
    x, y = _inputs(4, torch.float32)
    x = x.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = _one_step(efficient, x, y), _one_step(plain, x, y)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("backbone", ["resnet50", "resnet18", "mobilenet_v2", "shufflenet_v2_x1_0"])
def test_spsa_everywhere_saves_no_more_than_the_plain_model(backbone: str) -> None:
    x, y = _inputs(8, torch.float32)
    torch.manual_seed(0)
    plain = saved_for_backward_bytes(build_model(_spec(backbone, StageSpec())).train(), x, y)
    torch.manual_seed(0)
    model = build_model(_spec(backbone, StageSpec(spsa=True))).train()
    efficient = saved_for_backward_bytes(model, x, y)
    assert efficient <= 1.05 * plain, (backbone, efficient / plain)
    # switched off, SPSA keeps its input (the last BN's output) alive: the count sees it
    set_memory_efficient(model, False)
    kept = saved_for_backward_bytes(model, x, y)
    assert kept > efficient, (backbone, kept / plain, efficient / plain)


def test_resnet50_without_recomputation_exceeds_the_target() -> None:
    """The count can fail: without recomputation, ResNet-50 with SPSA saves > 1.05x the plain model."""
    x, y = _inputs(8, torch.float32)
    plain = saved_for_backward_bytes(build_model(_spec("resnet50", StageSpec())).train(), x, y)
    model = build_model(_spec("resnet50", StageSpec(spsa=True)), memory_efficient=False).train()
    assert saved_for_backward_bytes(model, x, y) > 1.05 * plain


def test_eval_and_no_grad_do_not_recompute() -> None:
    model = build_model(_spec("resnet18", StageSpec(spsa=True)))
    calls = _count_spsa_calls(model)
    x, y = _inputs(2, torch.float32)
    model.eval()
    nn.functional.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        model.train()(x)
    assert calls[0] == 2 * 8  # two forwards of 8 blocks, no recomputation


def test_state_dict_keys_do_not_change() -> None:
    spec = _spec("resnet50", StageSpec(spsa=True, channel_attn="se"))
    assert list(build_model(spec).state_dict()) == list(
        build_model(spec, memory_efficient=False).state_dict())


def test_memory_efficient_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="memory_efficient"):
        build_model(_spec("resnet18", StageSpec(spsa=True)), memory_efficient="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="enabled"):
        set_memory_efficient(nn.Linear(2, 2), 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_spsa_fused_path_per_sample_equals_the_whole_batch(heads: int, channels_last: bool) -> None:
    """The fused op's statistics are per sample: a batch gives what its samples give one by one."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, 16, 6, 7, generator=generator) + torch.randn(1, 16, 1, 1, generator=generator)
    x[1, :, 2, 3] = 0.5  # a constant pixel vector
    x[3] = 0.0  # an all-zero sample
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    whole = spsa_fast(x, 1.5, heads)
    whole_grad = _grad(x, heads)
    for i in range(x.shape[0]):
        torch.testing.assert_close(spsa_fast(x[i:i + 1], 1.5, heads), whole[i:i + 1], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(_grad(x[i:i + 1], heads), whole_grad[i:i + 1], rtol=1e-5, atol=1e-6)


def _grad(x: torch.Tensor, heads: int) -> torch.Tensor:
    xx = x.detach().clone().requires_grad_(True)
    spsa_fast(xx, 1.5, heads).square().sum().backward()
    assert xx.grad is not None
    return xx.grad


def test_spsa_inplace_writes_into_its_input_only_without_grad() -> None:
    x = torch.randn(3, 8, 5, 4, generator=torch.Generator().manual_seed(4))
    expected = spsa_fast(x, 1.0, 2)
    y = x.clone()
    with torch.no_grad():
        out = SPSA(8, heads=2, inplace=True)(y)
    assert out.data_ptr() == y.data_ptr()
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    z = x.clone().requires_grad_(True)
    out = SPSA(8, heads=2, inplace=True)(z)  # a gradient flows: not in place
    assert out.data_ptr() != z.data_ptr()
    torch.testing.assert_close(z.detach(), x, rtol=0, atol=0)


def test_models_eval_output_does_not_depend_on_inplace() -> None:
    model = build_model(_spec("resnet18", StageSpec(spsa=True, channel_attn="eca"))).eval()
    x, _ = _inputs(2, torch.float32)
    with torch.no_grad():
        got = model(x)
        spsa = [module for module in model.modules() if isinstance(module, SPSA)]
        assert spsa and all(module.inplace for module in spsa)  # in place by default in eval
        for module in spsa:
            module.inplace = False
        expected = model(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
