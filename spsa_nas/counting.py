"""Parameter, multiply-accumulate (fvcore's convention) and SPSA memory-traffic counts of a model.

FLOPs here are multiply-accumulates (MACs) counted the way fvcore counts them, which is the
convention of the SPSA paper's tables (torchvision ResNet-50 at 1x3x224x224: 4.1115G):

- convolution: one per weight element per output position (batch x C_out x C_in/groups x
  kernel area x output area); linear / matmul: batch x in x out; bias not counted;
- BatchNorm (counted in eval mode): 2 per element with an affine transform, 1 without;
  GroupNorm / LayerNorm / InstanceNorm: 5 per element with affine, 4 without;
- adaptive average pooling modules: 1 per input element;
- nothing else: no element-wise op (ReLU, addition, sigmoid, scaling), no max-pool, no
  reduction written as a tensor method (`x.mean(...)`).

Convolutions and matrix products are counted at the operator level with
`torch.utils.flop_counter.FlopCounterMode` (which counts 2 FLOPs per MAC; halved here), so that
functional calls inside attention modules count too; norms and pools are counted by module hooks.

SPSA is nearly free under this convention (it has no convolution and no matmul) although it
makes several passes over its input. `spsa_cost` measures those passes: it runs every SPSA
module of the model on the input it received, records the bytes each aten operator reads and
writes, and reports them beside the MAC count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_OTHER_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_ADAPTIVE_AVG_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be (N, C, H, W) of positive sizes, got {tuple(input_shape)}")
    return shape


def _example_input(model: nn.Module, shape: tuple[int, ...]) -> Tensor:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)


def _norm_and_pool_macs(module: nn.Module, inputs: tuple[Any, ...]) -> int:
    x = inputs[0]
    if isinstance(module, _BATCH_NORMS):
        return x.numel() * (2 if module.affine else 1)
    if isinstance(module, _OTHER_NORMS):
        affine = getattr(module, "affine", getattr(module, "elementwise_affine", False))
        return x.numel() * (5 if affine else 4)
    if isinstance(module, _ADAPTIVE_AVG_POOLS):
        return x.numel()
    return 0


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass in eval mode on an input of `input_shape`.

    See the module docstring for what is counted. The model's training flag is restored.
    """
    shape = _check_shape(input_shape)
    counted = 0

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        nonlocal counted
        del output
        counted += _norm_and_pool_macs(module, inputs)

    kinds = _BATCH_NORMS + _OTHER_NORMS + _ADAPTIVE_AVG_POOLS
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(_example_input(model, shape))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return counter.get_total_flops() // 2 + counted


class _TrafficMode(TorchDispatchMode):
    """Sums the bytes every aten operator reads (tensor inputs) and writes (tensor outputs).

    View operators (outputs that alias an input) move no data and are skipped; in-place
    operators count their inputs as read and their result as written.
    """

    def __init__(self) -> None:
        super().__init__()
        self.read = 0
        self.written = 0
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        ins = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        inplace = func._schema.name.endswith("_")
        in_ptrs = {t.untyped_storage().data_ptr() for t in ins}
        if outs and not inplace and all(t.untyped_storage().data_ptr() in in_ptrs for t in outs):
            return out  # a view
        self.ops += 1
        self.read += sum(t.numel() * t.element_size() for t in ins)
        self.written += sum(t.numel() * t.element_size() for t in outs)
        return out


def spsa_cost(model: nn.Module, input_shape: Sequence[int]) -> dict[str, Any]:
    """What SPSA costs in memory traffic in one eval forward pass (fp32, measured per operator).

    Returns `modules` (number of SPSA modules), `calls`, `elements` (their input elements in
    total), `bytes_in` (fp32 bytes of those inputs: one pass over each), `bytes_read` and
    `bytes_written` (over all aten operators SPSA ran), `passes` ((read + written) / bytes_in,
    i.e. full-tensor passes per call), `ops` (aten operators per call, averaged) and
    `per_module` (name, input shape, bytes read and written of each call).
    """
    from spsa_nas.attention import SPSA

    shape = _check_shape(input_shape)
    names = {m: n for n, m in model.named_modules() if isinstance(m, SPSA)}
    captured: list[tuple[str, nn.Module, Tensor]] = []

    def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        captured.append((names[module], module, inputs[0].detach().float().clone()))

    handles = [m.register_forward_pre_hook(hook) for m in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(_example_input(model, shape))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    per_module = []
    total_in = total_read = total_written = total_ops = 0
    for name, module, x in captured:
        mode = _TrafficMode()
        with torch.no_grad(), mode:
            module(x)
        nbytes = x.numel() * x.element_size()
        per_module.append({"name": name, "shape": list(x.shape), "bytes_in": nbytes,
                           "bytes_read": mode.read, "bytes_written": mode.written, "ops": mode.ops})
        total_in += nbytes
        total_read += mode.read
        total_written += mode.written
        total_ops += mode.ops
    calls = len(captured)
    return {
        "modules": len(names),
        "calls": calls,
        "elements": total_in // 4,
        "bytes_in": total_in,
        "bytes_read": total_read,
        "bytes_written": total_written,
        "passes": (total_read + total_written) / total_in if total_in else 0.0,
        "ops": total_ops / calls if calls else 0.0,
        "per_module": per_module,
    }
