"""SPSA's custom op and its fused C++ CPU kernel: equal to the reference, fully registered, a fallback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spsa_nas.attention import SPSA, spsa_fused, spsa_reference
from spsa_nas.attention.kernels import DECOMPOSITIONS, cpu, fused_available

pytestmark = pytest.mark.skipif(cpu.load() is None, reason=f"no fused CPU kernel here: {cpu.status()}")


def _rand(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool, seed: int,
          offset: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x + torch.randn(1, shape[1], 1, 1, generator=gen, dtype=torch.float64) + offset
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _kernel(x: torch.Tensor, alpha: float, heads: int) -> torch.Tensor:
    """The compiled kernel itself (not through the op): the test is about it."""
    return cpu.load().forward(x, alpha, heads, 1e-5)  # type: ignore[union-attr]


#: shapes that exercise the NCHW path's full SIMD blocks and partial last vectors and the channels_last
#: path's groups: pixels 1, 35, 64, 130, 196; channels per group 2 to 300
SHAPES = [((3, 16, 5, 7), 1), ((2, 32, 8, 8), 4), ((2, 300, 13, 10), 1), ((1, 8, 1, 1), 2),
          ((2, 64, 14, 14), 2), ((4, 6, 1, 35), 3)]


@pytest.mark.parametrize(("shape", "heads"), SHAPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("alpha", [1.0, 2.0, 0.7])
def test_kernel_equals_reference(shape: tuple[int, ...], heads: int, channels_last: bool,
                                 dtype: torch.dtype, alpha: float) -> None:
    x = _rand(shape, dtype, channels_last, seed=sum(shape))
    assert fused_available(x)
    got = _kernel(x, alpha, heads)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got, spsa_reference(x, alpha, heads), atol=tol, rtol=tol)
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)



@pytest.mark.parametrize(("shape", "heads"), [((1, 7, 50, 45), 1), ((2, 14, 47, 47), 2), ((3, 9, 3, 5), 3)])
@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nchw_chunks_and_job_layouts_equal_reference(shape: tuple[int, ...], heads: int, threads: int,
                                                     dtype: torch.dtype) -> None:
    """The NCHW path's work split: pixels in several chunks (over 2048 pixels), chunks split
    further when there are fewer groups than threads, the key taken inside the job when there are
    at least as many groups as threads; channel counts that leave a remainder after the rows are
    taken four at a time."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = _rand(shape, dtype, False, seed=sum(shape) + threads)
        got = _kernel(x, 1.0, heads)
    finally:
        torch.set_num_threads(before)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got, spsa_reference(x, 1.0, heads), atol=tol, rtol=tol)


@pytest.mark.parametrize(("shape", "heads"), [((2, 14, 47, 47), 2), ((3, 37, 7, 7), 1), ((4, 24, 8, 8), 3),
                                              ((2, 9, 3, 5), 3)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_work_split_does_not_change_the_bits(shape: tuple[int, ...], heads: int, channels_last: bool,
                                                 dtype: torch.dtype) -> None:
    """One thread takes each sample's (channels_last) or group's (NCHW) key inside its job; eight
    threads, more than there are samples or groups here, take the keys in a pass of their own
    (several rows' sums reduced together, rows left over one by one) and split the pixels
    further. The sums are the same in the same order either way, so the output is the same to the
    bit; channel counts leave rows over after the blocks of rows, pixel counts leave a tail."""
    x = _rand(shape, dtype, channels_last, seed=sum(shape))
    before = torch.get_num_threads()
    got = {}
    try:
        for threads in (1, 8):
            torch.set_num_threads(threads)
            got[threads] = _kernel(x, 1.0, heads)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[1], got[8])
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got[1], spsa_reference(x, 1.0, heads), atol=tol, rtol=tol)


#: (reverse, similarity) of the three non-default variants (the ablation switches of issue 13)
SWITCHES = [(False, "correlation"), (True, "cosine"), (False, "cosine")]
SWITCH_IDS = ["norev-correlation", "rev-cosine", "norev-cosine"]


@pytest.mark.parametrize(("reverse", "similarity"), SWITCHES, ids=SWITCH_IDS)
@pytest.mark.parametrize(("shape", "heads"), SHAPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_switched_kernel_equals_reference(shape: tuple[int, ...], heads: int, channels_last: bool,
                                          dtype: torch.dtype, reverse: bool, similarity: str) -> None:
    # the seeds of test_kernel_equals_reference: (4, 6, 1, 35) with another seed has a pixel whose
    # two channels differ by 0.2 % of their offset from the key's mean, where the one-pass fp32
    # variance loses ~3 digits in every variant, the default one included
    x = _rand(shape, dtype, channels_last, seed=sum(shape))
    got = cpu.load().forward(x, 1.5, heads, 1e-5, reverse, similarity == "cosine")  # type: ignore[union-attr]
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    expected = spsa_reference(x, 1.5, heads, reverse=reverse, similarity=similarity)  # type: ignore[arg-type]
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # through the op too, in place as well
    torch.testing.assert_close(spsa_fused(x, 1.5, heads, reverse=reverse, similarity=similarity),  # type: ignore[arg-type]
                               expected, atol=tol, rtol=tol)
    y = x.clone()
    torch.ops.spsa_nas.spsa_(y, 1.5, heads, 1e-5, reverse, similarity)
    torch.testing.assert_close(y, got, atol=0, rtol=0)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_cosine_kernel_scale_and_degenerate_cases(channels_last: bool) -> None:
    """Cosine in the kernel: scale-invariant from 1e-30 to 1e30 in fp32; an all-zero pixel vector or
    key gives A = 0.5 ** alpha; a constant pixel vector is an ordinary one; all finite."""
    base = _rand((2, 64, 9, 9), torch.float64, channels_last, seed=5)
    for scale in (1e-30, 1e-3, 1.0, 1e30):
        x = base * scale
        truth = spsa_reference(x, 1.0, 2, similarity="cosine")
        got = cpu.load().forward(x.float(), 1.0, 2, 1e-5, True, True)  # type: ignore[union-attr]
        assert ((got.double() - truth) / x).abs().max().item() < 2e-5, scale
    x = _rand((3, 16, 6, 5), torch.float32, False, seed=6)
    x[0, :, 1, 1] = 0.7
    x[0, :, 2, 2] = 0.0
    x[1] = 0.0
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    got = cpu.load().forward(x, 1.5, 2, 1e-5, False, True)  # type: ignore[union-attr]
    assert torch.isfinite(got).all()
    assert torch.equal(got[1], torch.zeros_like(got[1])) and torch.equal(got[0, :, 2, 2], torch.zeros(16))
    expected = spsa_reference(x, 1.5, 2, reverse=False, similarity="cosine")
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    assert abs(float(got[0, 0, 1, 1]) / 0.7 - 0.5**1.5) > 1e-2  # a constant pixel is not r = 0 here


@pytest.mark.parametrize(("reverse", "similarity"), SWITCHES, ids=SWITCH_IDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_switched_gradcheck_and_opcheck(channels_last: bool, reverse: bool, similarity: str) -> None:
    x = _rand((2, 8, 3, 4), torch.float64, channels_last, seed=8).requires_grad_(True)
    op = torch.ops.spsa_nas.spsa
    assert torch.autograd.gradcheck(lambda t: op(t, 1.3, 2, 1e-5, reverse, similarity), (x,))
    torch.library.opcheck(op.default, (x.float().detach(), 1.5, 2, 1e-5, reverse, similarity))
    torch.library.opcheck(op.default, (x, 1.0, 1, 1e-5, reverse, similarity))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_large_offset_and_scale(channels_last: bool) -> None:
    """The shift by the key's mean keeps the one-pass sums accurate at large offsets."""
    for offset, scale in ((1e3, 1.0), (100.0, 1e-3), (0.0, 1e30), (0.0, 1e-30)):
        x = (_rand((2, 64, 9, 9), torch.float64, channels_last, seed=5) + offset) * scale
        truth = spsa_reference(x, 1.0, 2)
        gate_err = ((_kernel(x.float(), 1.0, 2).double() - truth) / x).abs().max().item()
        assert gate_err < 2e-5, (offset, scale)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_degenerate_pixels_and_keys_are_finite(channels_last: bool) -> None:
    x = _rand((3, 16, 6, 5), torch.float32, channels_last, seed=6)
    x[0, :, 1, 1] = 0.7  # a constant pixel vector
    x[0, :, 2, 2] = 0.0  # an all-zero pixel vector
    x[1] = 0.0  # an all-zero sample (all-zero key)
    x[2] = torch.randn(1, 1, 6, 5).expand(1, 16, 6, 5)  # every pixel constant (constant key)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    got = _kernel(x, 1.5, 2)
    assert torch.isfinite(got).all()
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert got[0, 0, 1, 1] / 0.7 == pytest.approx(0.5 ** 1.5, abs=1e-3)
    xx = x.clone().requires_grad_(True)
    spsa_fused(xx, 1.5, 2).square().sum().backward()
    assert xx.grad is not None and torch.isfinite(xx.grad).all()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_in_place_op_writes_into_x(channels_last: bool) -> None:
    x = _rand((2, 32, 7, 9), torch.float32, channels_last, seed=7)
    expected = _kernel(x, 1.0, 4)
    y = x.clone()
    with torch.no_grad():
        out = SPSA(32, heads=4, inplace=True)(y)
    assert out.data_ptr() == y.data_ptr()
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gradcheck_through_the_op(channels_last: bool) -> None:
    x = _rand((2, 8, 3, 4), torch.float64, channels_last, seed=8).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.spsa_nas.spsa(t, 1.3, 2, 1e-5), (x,))


def test_non_contiguous_input_and_other_dtypes() -> None:
    x = _rand((2, 16, 8, 6), torch.float32, False, seed=9)
    sliced = x[:, :, ::2]  # neither layout: the op makes it contiguous
    torch.testing.assert_close(spsa_fused(sliced, 1.0, 2), spsa_reference(sliced, 1.0, 2),
                               atol=2e-5, rtol=2e-5)
    half = x.to(torch.bfloat16)  # no fused kernel for bf16 on the CPU: the decomposition runs
    assert not fused_available(half)
    torch.testing.assert_close(spsa_fused(half, 1.0, 2).float(), spsa_reference(half.float(), 1.0, 2),
                               atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_opcheck(channels_last: bool) -> None:
    """torch.library's own checks: schema, fake kernel, autograd registration, AOT dispatch."""
    x = _rand((2, 8, 4, 5), torch.float32, channels_last, seed=10)
    torch.library.opcheck(torch.ops.spsa_nas.spsa.default, (x, 1.5, 2, 1e-5))
    torch.library.opcheck(torch.ops.spsa_nas.spsa.default, (x.double().requires_grad_(True), 1.0, 1, 1e-5))


def test_compile_sees_plain_ops_and_export_sees_one_op() -> None:
    """torch.compile gets the decomposition (plain reductions inductor fuses with its neighbours:
    issue 11), torch.export the one custom op (which run_decompositions replaces)."""
    x = _rand((2, 16, 6, 6), torch.float32, False, seed=11)
    module = SPSA(16, alpha=1.5, heads=2).eval()
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example: object) -> object:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(module, backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(got, spsa_reference(x, 1.5, 2), atol=2e-5, rtol=2e-5)
    graph = str(graphs[0].graph)
    assert "spsa_nas" not in graph
    assert "sum" in graph and "sigmoid" in graph and "mean" in graph  # the decomposition's reductions
    program = torch.export.export(module, (x,))
    calls = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert calls == [torch.ops.spsa_nas.spsa.default]
    decomposed = program.run_decompositions(DECOMPOSITIONS)
    assert "spsa_nas" not in str(decomposed.graph)
    torch.testing.assert_close(decomposed.module()(x), got, atol=2e-5, rtol=2e-5)


def test_inductor_compiles_around_the_op() -> None:
    """torch.compile's default backend compiles SPSA's decomposition with its neighbours; grads too."""
    torch._dynamo.reset()
    x = _rand((2, 16, 5, 5), torch.float32, True, seed=12)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 1), SPSA(16, heads=2))
    compiled = torch.compile(model, fullgraph=True)
    xx = x.clone().requires_grad_(True)
    compiled(xx).square().sum().backward()
    ref_x = x.clone().requires_grad_(True)
    ref = spsa_reference(model[0](ref_x), 1.0, 2)
    ref.square().sum().backward()
    torch.testing.assert_close(xx.grad, ref_x.grad, atol=1e-4, rtol=1e-4)


_FALLBACK = """
import json, logging, torch
logging.basicConfig(level=logging.WARNING)
from spsa_nas.attention import SPSA, spsa_reference
from spsa_nas.attention.kernels import cpu, fused_available
x = torch.randn(2, 16, 5, 5)
out = SPSA(16, heads=2)(x)
err = (out - spsa_reference(x, 1.0, 2)).abs().max().item()
print(json.dumps({"module": cpu.load() is not None, "status": cpu.status(), "err": err,
                  "fused": fused_available(x)}))
"""


@pytest.mark.parametrize("case", ["disabled", "no_compiler"])
def test_fallback_without_the_kernel(tmp_path: Path, case: str) -> None:
    env = dict(os.environ, SPSA_NAS_KERNEL_CACHE=str(tmp_path / "cache"))
    if case == "disabled":
        env["SPSA_NAS_NO_CPU_KERNEL"] = "1"
    else:
        env["CXX"] = str(tmp_path / "no-such-compiler")
    run = subprocess.run([sys.executable, "-c", _FALLBACK], env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["module"] is False and result["fused"] is False
    assert result["err"] < 2e-5  # the decomposition runs instead, with the same results
    if case == "disabled":
        assert result["status"] == "disabled by SPSA_NAS_NO_CPU_KERNEL=1"
    else:
        assert "no C++ compiler" in result["status"] and "no-such-compiler" in result["status"]
        assert "falls back to its plain-torch decomposition" in run.stderr  # logged once, with the reason


def test_each_checkout_and_environment_builds_in_its_own_directory(tmp_path: Path) -> None:
    # torch's build file names the source's and the headers' paths: two checkouts (or two
    # environments) sharing one build directory rebuilt the kernel whenever the other had built it
    first, second = tmp_path / "a" / "spsa_cpu.cpp", tmp_path / "b" / "spsa_cpu.cpp"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(cpu.SOURCE.read_bytes())
    torch_dir = Path(torch.__file__).parent
    key = cpu.build_key(first, torch_dir, "/usr/include/python3.11", "c++", "flags: avx2")
    assert key == cpu.build_key(first, torch_dir, "/usr/include/python3.11", "c++", "flags: avx2")
    assert len({key,
                cpu.build_key(second, torch_dir, "/usr/include/python3.11", "c++", "flags: avx2"),
                cpu.build_key(first, tmp_path, "/usr/include/python3.11", "c++", "flags: avx2"),
                cpu.build_key(first, torch_dir, "/opt/include/python3.11", "c++", "flags: avx2"),
                cpu.build_key(first, torch_dir, "/usr/include/python3.11", "clang++", "flags: avx2"),
                cpu.build_key(first, torch_dir, "/usr/include/python3.11", "c++", "flags: avx512f"),
                }) == 6
    before = cpu.build_key(second, torch_dir, "/usr/include/python3.11", "c++", "flags: avx2")
    second.write_bytes(b"// changed\n" + cpu.SOURCE.read_bytes())  # the same path, another source
    assert cpu.build_key(second, torch_dir, "/usr/include/python3.11", "c++", "flags: avx2") != before


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx2", "sse"])
def test_the_narrower_vector_paths_equal_reference(tmp_path: Path, isa: str) -> None:
    """The kernel's other vector paths, built here by turning instruction sets off after
    -march=native: 32-byte vectors with AVX's masked tails (-mno-avx512f) and 16-byte ones with
    lane-by-lane tails (-mno-avx); the build in use takes only this CPU's widest. Rows whose pixel
    count leaves a partial last vector (1 to 15 pixels), allocating and in place."""
    from torch.utils import cpp_extension

    flags = {"avx2": ["-mno-avx512f"], "sse": ["-mno-avx"]}[isa]
    module = cpp_extension.load(
        name=f"spsa_test_{isa}", sources=[str(cpu.SOURCE)], build_directory=str(tmp_path),
        extra_cflags=[*cpu.CFLAGS, *flags],
        extra_ldflags=["-fopenmp"], verbose=False,
    )
    for index, (shape, heads) in enumerate([((2, 16, 7, 9), 2), ((1, 12, 14, 14), 1), ((2, 32, 3, 5), 4),
                                            ((3, 8, 1, 17), 1), ((1, 20, 7, 7), 2)]):
        for dtype in (torch.float32, torch.float64):
            for channels_last in (False, True):
                x = _rand(shape, dtype, channels_last, seed=index, offset=3.0)
                tol = 1e-12 if dtype == torch.float64 else 2e-5
                expected = spsa_reference(x, 2.0, heads)
                torch.testing.assert_close(module.forward(x, 2.0, heads, 1e-5), expected, atol=tol, rtol=tol)
                y = x.clone(memory_format=torch.preserve_format)
                module.forward_out(y, y, 2.0, heads, 1e-5)
                torch.testing.assert_close(y, expected, atol=tol, rtol=tol)
