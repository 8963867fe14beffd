"""Build (on first use) and load SPSA's fused C++ CPU kernel; a clear reason when it cannot be built.

The kernel (`spsa_cpu.cpp`) is compiled with torch.utils.cpp_extension.load (ninja and a C++
compiler with OpenMP, e.g. g++) for the CPU it runs on (-march=native), into a cache directory
keyed by the source and where it lies, torch's version and where it is installed, Python's
headers, the compiler and the CPU's flags: `$SPSA_NAS_KERNEL_CACHE` or `~/.cache/spsa_nas/kernels`.
The first build takes ~30-60 s; later processes load the cached library. (Two checkouts or two
virtual environments get two build directories: torch's build file names the source's and the
headers' paths, so sharing one made each rebuild the kernel whenever the other had built it.)
`SPSA_NAS_NO_CPU_KERNEL=1` disables it (SPSA then runs its plain-torch decomposition). A failed
build is logged once, with the reason, and SPSA falls back.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sysconfig
import threading
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("spsa_cpu.cpp")
#: the kernel's compiler flags: optimised for the CPU it runs on, with OpenMP
CFLAGS = ["-O3", "-fopenmp", "-march=native", "-fno-math-errno"]
_LOCK = threading.Lock()
_state: dict[str, object] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_key(source: Path, torch_dir: Path, python_include: str, compiler: str, cpu_flags: str) -> str:
    """16 hex digits naming one build: everything torch's build file for it depends on - the
    source's bytes and resolved path, torch's version and install directory (its headers and
    libraries), Python's headers, the compiler - and the CPU's flags (-march=native)."""
    parts = [source.read_bytes(), str(source.resolve()).encode(), torch.__version__.encode(),
             str(torch_dir.resolve()).encode(), python_include.encode(), compiler.encode(),
             cpu_flags.encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


@cache
def _cache_dir() -> Path:
    root = Path(os.environ.get("SPSA_NAS_KERNEL_CACHE") or Path.home() / ".cache" / "spsa_nas" / "kernels")
    digest = build_key(SOURCE, Path(torch.__file__).parent, sysconfig.get_paths()["include"],
                       os.environ.get("CXX", "c++"), _cpu_flags())
    return root / f"spsa_cpu_{digest}"


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None and not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} is not on PATH; install g++ or set CXX)")
    build_dir = _cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=f"spsa_nas_cpu_{build_dir.name[-16:]}", sources=[str(SOURCE)], build_directory=str(build_dir),
        extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], verbose=False,
    )


def load() -> ModuleType | None:
    """The compiled kernel module, building it on the first call; None (reason logged once) if it
    cannot be built or is disabled by SPSA_NAS_NO_CPU_KERNEL=1."""
    if "module" in _state:
        return _state["module"]  # type: ignore[return-value]
    with _LOCK:
        if "module" not in _state:
            module: ModuleType | None = None
            if os.environ.get("SPSA_NAS_NO_CPU_KERNEL") == "1":
                _state["reason"] = "disabled by SPSA_NAS_NO_CPU_KERNEL=1"
            else:
                try:
                    module = _build()
                    _state["reason"] = f"built in {_cache_dir()}"
                except Exception as exc:  # a compiler error, a missing toolchain: fall back
                    _state["reason"] = f"could not build the fused SPSA CPU kernel: {exc}"
                    log.warning("%s; SPSA falls back to its plain-torch decomposition "
                                "(slower, same results)", _state["reason"])
            _state["module"] = module
    return _state["module"]  # type: ignore[return-value]


def status() -> str:
    """Why the kernel is (not) in use, after `load()` was called."""
    return str(_state.get("reason", "not loaded yet"))
