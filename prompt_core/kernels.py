"""The project's C kernels: compiled for this machine on first use, kept under the cache directory, loaded by ctypes.

One helper for every kernel (csrc/*.c beside its Python module): the build is keyed by the source, the flags, the
compiler and the CPU, so a changed kernel or a new machine builds afresh, and concurrent processes building the
same kernel wait for one another instead of writing one file twice.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import platform
import subprocess
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")

_LOADED: dict[Path, ctypes.CDLL] = {}


def cache_dir() -> Path:
    from prompt_core.model import cache_root

    return cache_root() / "kernels"


def _build_key(source: Path, flags: tuple[str, ...]) -> str:
    try:
        compiler = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        compiler = ""
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    blob = "\n".join([source.read_text(), " ".join(flags), compiler, cpu, platform.machine()])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build(source: Path, into: Path | None = None, flags: tuple[str, ...] = FLAGS) -> Path:
    """Compile `source` for this machine once (a few seconds) and keep it under `into` (the cache directory); later
    calls return the kept file. Raises RuntimeError with the compiler's message when there is no C compiler."""
    target_dir = (into or cache_dir()) / _build_key(source, flags)
    target = target_dir / f"{source.stem}.so"
    if target.is_file():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with open(target_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)       # another process building the same kernel: wait for it
        if target.is_file():
            return target
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        try:
            subprocess.run(["gcc", *flags, "-o", str(tmp), str(source)], capture_output=True, text=True, check=True)
        except FileNotFoundError as e:
            raise RuntimeError(f"the {source.stem} kernel needs a C compiler (gcc) on this machine") from e
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"compiling the {source.stem} kernel failed:\n{e.stderr.strip()}") from e
        os.replace(tmp, target)
    return target


def load(source: Path, functions: tuple[str, ...]) -> ctypes.CDLL:
    """The compiled library of `source` (built on first use), with `functions` declared as returning nothing."""
    lib = _LOADED.get(source)
    if lib is None:
        lib = ctypes.CDLL(str(build(source)))
        for name in functions:
            getattr(lib, name).restype = None
        _LOADED[source] = lib
    return lib
