"""sparselm's C++ sparse kernels (csrc/): compiled with the system compiler at first use, cached, loaded; or absent.

The extension is not built at install time: `pip install` would then need torch inside an isolated build
environment (which downloads a CUDA build). Instead the first call compiles csrc/sparse_kernels.cpp against the
running torch (one g++ command, about 15–40 s) into the sparselm cache directory, keyed by the sources' hash, the
torch version and the CPU's capability, so a changed kernel, torch or machine rebuilds and nothing else does.
Without a compiler (or when the build fails) every caller keeps torch's own kernels and `status()` carries one note.

The code path inside the kernels (portable, AVX2+FMA, AVX-512F, AVX-512 with bf16 dot products: avx512_bf16 and
avx512_vbmi2, as on AMD Zen 4 and Intel Sapphire Rapids) is chosen from the CPU's features; SPARSELM_KERNEL_PATH
(portable|avx2|avx512|avx512bf16) forces one, and SPARSELM_NO_EXTENSION=1 disables the extension altogether.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SparselmError
from ..sources import cache_dir

SOURCE_DIR = Path(__file__).parent / "csrc"
SOURCES = ("sparse_kernels.cpp", "sparse_body.inc")
LIBRARY = "sparselm_kernels"
PATHS = {"auto": 0, "portable": 1, "avx2": 2, "avx512": 3, "avx512bf16": 4}
PATH_ENV = "SPARSELM_KERNEL_PATH"
DISABLE_ENV = "SPARSELM_NO_EXTENSION"
BUILD_TIMEOUT_S = 600


@dataclass(frozen=True)
class Status:
    """Whether the extension is loaded, the code path it runs, and the one note to show when it is not."""

    available: bool
    path: str
    note: str | None


def source_digest() -> str:
    """A short hash of the kernels' sources: what a build, and every speed measured with it, was made from."""
    return _digest_of(SOURCE_DIR)


@functools.cache
def _digest_of(directory: Path) -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((directory / name).read_bytes())
    return digest.hexdigest()[:16]


def build_key() -> str:
    """The cache key of a build: sources, torch version, CPU capability, machine and Python ABI."""
    cpu = torch.backends.cpu.get_cpu_capability()
    python = f"py{sys.version_info[0]}{sys.version_info[1]}"
    return f"{source_digest()}-torch{torch.__version__}-{cpu}-{platform.machine()}-{python}"


def kernels_id() -> str:
    """Which kernels a measurement ran: the loaded extension's source hash and code path, or "torch" without it."""
    state = status()
    return f"{source_digest()}-{state.path}" if state.available else "torch"


def compile_command(source: Path, target: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    compiler = os.environ.get("CXX", "c++")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        compiler, "-O3", "-std=gnu++20", "-ffp-contract=fast", "-fPIC", "-shared", "-fopenmp", "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{p}" for p in include_paths()), str(source),
        *(f"-L{p}" for p in library_paths()), "-lc10", "-ltorch_cpu",
        *(f"-Wl,-rpath,{p}" for p in library_paths()), "-o", str(target),
    ]


def library_path() -> Path:
    return cache_dir() / "kernels" / build_key() / f"{LIBRARY}.so"


def will_compile() -> bool:
    """Whether the next `status()` compiles the kernels (they are neither loaded nor cached, nor disabled)."""
    return loaded.cache_info().currsize == 0 and os.environ.get(DISABLE_ENV) != "1" and not library_path().is_file()


def built_library() -> Path:
    """The compiled library, built now unless this key's build is cached; raises on a failed build."""
    target = library_path()
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            raise RuntimeError(f"no C++ compiler ('{os.environ.get('CXX', 'c++')}') on PATH")
        done = subprocess.run(
            compile_command(SOURCE_DIR / SOURCES[0], partial), capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"the compiler failed: {last}")
        os.replace(partial, target)  # atomic: a concurrent build of the same key writes the same bytes
    return target


@functools.cache
def loaded() -> Status:
    """Load (building first if needed) the extension once per process; never raises."""
    if os.environ.get(DISABLE_ENV) == "1":
        return Status(False, "torch", f"sparselm's C++ kernels are disabled ({DISABLE_ENV}=1): torch's kernels only")
    try:
        torch.ops.load_library(str(built_library()))
    except Exception as exc:  # no compiler, failed build, unloadable library: torch's kernels still work
        return Status(False, "torch", f"sparselm's C++ kernels are unavailable ({exc}); using torch's kernels only")
    return Status(True, chosen_path(), None)


def chosen_path() -> str:
    """The code path the kernels run: SPARSELM_KERNEL_PATH if set (checked against the CPU), else the best one."""
    forced = os.environ.get(PATH_ENV, "auto").lower()
    if forced not in PATHS:
        raise SparselmError(f"{PATH_ENV}={forced!r} is not a kernel path; choose one of: {', '.join(PATHS)}")
    if forced == "auto":
        best = int(torch.ops.sparselm_kernels.best_path())
        return next(name for name, code in PATHS.items() if code == best)
    if not torch.ops.sparselm_kernels.supports(PATHS[forced]):
        raise SparselmError(f"{PATH_ENV}={forced}: this CPU lacks the instructions that path needs; unset it")
    return forced


def status() -> Status:
    return loaded()


def path_code(path: str | None = None) -> int:
    """The kernels' integer code of a path name (default: the one `status()` chose)."""
    return PATHS[path or status().path]


def supported_paths() -> list[str]:
    """Every code path this CPU can run (empty without the extension)."""
    if not status().available:
        return []
    return [name for name, code in PATHS.items() if code and torch.ops.sparselm_kernels.supports(code)]
