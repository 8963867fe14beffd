"""Parameter, multiply-accumulate (fvcore's convention) and SPSA memory-traffic counts of a model.

FLOPs here are multiply-accumulates (MACs) counted the way fvcore counts them, which is the
convention of the SPSA paper's tables (torchvision ResNet-50 at 1x3x224x224: 4.1115G):

- convolution: one per weight element per output position (batch x C_out x C_in/groups x
  kernel area x output area); linear / matmul: batch x in x out; bias not counted;
- BatchNorm (counted in eval mode): 2 per element with an affine transform, 1 without;
  GroupNorm / LayerNorm / InstanceNorm: 5 per element with affine, 4 without;
- adaptive average pooling (`nn.AdaptiveAvgPool*d` or `F.adaptive_avg_pool*d`): 1 per input
  element;
- nothing else: no element-wise op (ReLU, addition, sigmoid, scaling), no max-pool, no
  reduction written as a tensor method (`x.mean(...)`, as SE's and ECA's pooling are), and
  nothing inside SPSA modules: SPSA's per-pixel sums are reductions, which this convention does
  not count (the paper lists SPSA at +0 GFLOPs), even where the eager fast path computes them
  with a batched matmul (the compiled path uses plain reductions; the count must not depend on
  which).

The spatial baselines a stage may carry instead of SPSA are counted by these rules as they are:
the non-local block's θ/φ/g/W convolutions, its two batched matrix products (the affinity,
quadratic in the positions, and its product with g) and its eval BatchNorm1d (softmax and
max-pool free); the GC block's context convolution, its weighted sum over positions (a batched
matrix product), its bottleneck convolutions and its LayerNorm (tests/spsa_nas/test_counting.py
checks both against a hand count).

Convolutions and matrix products are counted at the aten-operator level with
`torch.utils.flop_counter.FlopCounterMode` (which counts 2 FLOPs per MAC; halved here); norms
and pools at the torch-function level with a `TorchFunctionMode`, so that functional calls count
as module calls do.

SPSA is nearly free under this convention (it has no convolution and no matmul) although it
makes several passes over its input. `spsa_cost` measures those passes: it runs every SPSA
module of the model on the input it received, records the bytes each aten operator reads and
writes, and reports them beside the MAC count.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from spsa_nas.attention import SPSA


def _norm_rule(affine_arg: str, eval_batch_norm: bool = False) -> Callable[[inspect.BoundArguments], int]:
    """fvcore's norm rule: 5 per element with an affine transform, 4 without; BatchNorm in eval
    mode (running statistics): 2 per element with affine, 1 without."""

    def rule(bound: inspect.BoundArguments) -> int:
        args = bound.arguments
        affine = args.get(affine_arg) is not None
        numel = args["input"].numel()
        if eval_batch_norm and not args.get("training", False):
            return numel * (2 if affine else 1)
        return numel * (5 if affine else 4)

    return rule


def _pool_rule(bound: inspect.BoundArguments) -> int:
    return bound.arguments["input"].numel()


#: Functions counted at the torch-function level (by TorchFunctionMode), with their MAC rule.
_FUNCTION_RULES: dict[Callable[..., Any], Callable[[inspect.BoundArguments], int]] = {
    F.batch_norm: _norm_rule("weight", eval_batch_norm=True),
    F.group_norm: _norm_rule("weight"),
    F.layer_norm: _norm_rule("weight"),
    F.instance_norm: _norm_rule("weight"),
    F.adaptive_avg_pool1d: _pool_rule,
    F.adaptive_avg_pool2d: _pool_rule,
    F.adaptive_avg_pool3d: _pool_rule,
}


class _NormPoolCounter(TorchFunctionMode):
    """Counts the MACs of norms and adaptive average pools, called as modules or functionally."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        rule = _FUNCTION_RULES.get(func)
        if rule is not None:
            bound = inspect.signature(func).bind(*args, **kwargs)
            self.macs += rule(bound)
        return func(*args, **kwargs)


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def saved_for_backward_bytes(model: nn.Module, x: Tensor, y: Tensor) -> int:
    """Bytes of the unique storages autograd keeps for the backward pass of one training step
    (cross-entropy of model(x) against labels y); the step's gradients are cleared afterwards.

    A structural measure of training memory: unlike a process's peak memory, it does not depend
    on the allocator or on what else the process holds.
    """
    seen: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


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


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass in eval mode on an input of `input_shape`.

    See the module docstring for what is counted. The model's training flag is restored.
    """
    shape = _check_shape(input_shape)
    was_training = model.training
    model.eval()
    norms_and_pools = _NormPoolCounter()
    counter = FlopCounterMode(display=False)
    spsa_flops = 0
    starts: list[int] = []

    def enter_spsa(module: nn.Module, inputs: Any) -> None:
        starts.append(counter.get_total_flops())

    def leave_spsa(module: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal spsa_flops
        spsa_flops += counter.get_total_flops() - starts.pop()

    spsa = [m for m in model.modules() if isinstance(m, SPSA)]
    handles = [m.register_forward_pre_hook(enter_spsa) for m in spsa]
    handles += [m.register_forward_hook(leave_spsa) for m in spsa]
    try:
        with torch.no_grad(), counter, norms_and_pools:
            model(_example_input(model, shape))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return (counter.get_total_flops() - spsa_flops) // 2 + norms_and_pools.macs


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
