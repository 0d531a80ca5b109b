"""Builds the BLPA XLA custom-call library for JAX (`jax.ffi` handlers).

The same kernels as the TensorFlow op (`custom_ops/shared/blpa_cpu.cc`, and with
nvcc `custom_ops/cuda/blpa_kernels.cu.cc`), wrapped by `custom_ops/jax_ffi/jax_ffi.cc`
against the XLA FFI headers that jaxlib ships (`jax.ffi.include_dir()`):
plain g++/nvcc, no TensorFlow, no Bazel. Cached like the op library, under
`cache_root() / "jax<jaxlib version>-<cpu|cuda>-<hash>"`.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

from keras_blpa.build_ops import (
    CUDA_LINK,
    CUDA_SOURCE,
    CXX_FLAGS,
    NVCC_FLAGS,
    BuildError,
    _cuda_lib_dir,
    _cuda_root,
    _gencode_flags,
    _locked,
    _run,
    cache_root,
    find_nvcc,
    source_dir,
)

JAX_LIB_NAME = "libblpa_jax.so"
JAX_SOURCES = (
    "jax_ffi/jax_ffi.cc", "shared/blpa_cpu.cc", "shared/blpa_cpu.h", "shared/blpa_kernels.h",
    CUDA_SOURCE,
)
JAX_CPU_SOURCES = ("jax_ffi/jax_ffi.cc", "shared/blpa_cpu.cc")
# The FFI headers trip two harmless GCC warnings.
JAX_CXX_FLAGS = (*CXX_FLAGS, "-std=c++17", "-Wno-attributes", "-Wno-return-type")


def _jax_include() -> tuple[str, str]:
    import jax
    import jaxlib

    return getattr(jaxlib, "__version__", jax.__version__), jax.ffi.include_dir()


def jax_build_key(src: Path | None = None, cuda: bool | None = None) -> str:
    """Cache key: jaxlib version, CPU/CUDA mode, a hash of sources and flags."""
    src = src or source_dir()
    cuda = find_nvcc() is not None if cuda is None else cuda
    version, include = _jax_include()
    digest = hashlib.sha256()
    for name in JAX_SOURCES:
        digest.update(name.encode() + b"\0" + (src / name).read_bytes() + b"\0")
    flags = [*JAX_CXX_FLAGS, include, sys.platform]
    if cuda:
        flags += [*NVCC_FLAGS, *_gencode_flags(), *CUDA_LINK]
    digest.update("\0".join(flags).encode())
    return f"jax{version}-{'cuda' if cuda else 'cpu'}-{digest.hexdigest()[:16]}"


def _compile(src: Path, out: Path, nvcc: str | None, tmp: Path, log: list[str],
             verbose: bool) -> None:
    _, include = _jax_include()
    cxx = os.environ.get("CXX", "g++")
    cmd = [cxx, f"-I{src}", f"-I{include}", *JAX_CXX_FLAGS]
    cmd += [str(src / s) for s in JAX_CPU_SOURCES]
    if nvcc is None:
        _run([*cmd, "-o", str(out)], log, verbose)
        return
    root = _cuda_root(nvcc)
    obj = tmp / "blpa_kernels.cu.o"
    nvcc_cmd = [nvcc, *NVCC_FLAGS, *_gencode_flags(), f"-I{src}", str(src / CUDA_SOURCE)]
    _run([*nvcc_cmd, "-o", str(obj)], log, verbose)
    # cudart statically, as for the op: loads on machines without CUDA.
    cmd += ["-DBLPA_JAX_CUDA=1", str(obj), "-o", str(out)]
    _run([*cmd, f"-L{_cuda_lib_dir(root)}", *CUDA_LINK], log, verbose)


def build_jax(
    out_dir: str | Path | None = None,
    cuda: bool | None = None,
    force: bool = False,
    verbose: bool = True,
) -> Path:
    """Builds the custom-call library and returns its path (as `build_ops.build`).

    Raises:
      BuildError: if not even the CPU-only library could be built.
    """
    src = source_dir()
    nvcc = find_nvcc()
    if cuda is None:
        cuda = nvcc is not None
    elif cuda and nvcc is None:
        raise BuildError("cuda=True but nvcc was not found")
    out_dir = Path(out_dir) if out_dir is not None else cache_root() / jax_build_key(src, cuda)
    target = out_dir / JAX_LIB_NAME
    with _locked(out_dir):
        if target.is_file() and not force:
            return target
        log: list[str] = []
        print(
            f"[keras_blpa.build_ops] building the BLPA custom calls for JAX "
            f"({'CUDA+CPU' if cuda else 'CPU'}, one-time) into {out_dir}",
            file=sys.stderr,
            flush=True,
        )
        with tempfile.TemporaryDirectory(prefix="blpa_build_", dir=out_dir) as tmp_name:
            tmp = Path(tmp_name)
            partial = tmp / JAX_LIB_NAME
            mode = "cpu"
            if cuda:
                try:
                    _compile(src, partial, str(nvcc), tmp, log, verbose)
                    mode = "cpu+cuda"
                except BuildError as err:
                    print(
                        f"[keras_blpa.build_ops] CUDA build failed, building CPU-only: {err}",
                        file=sys.stderr,
                        flush=True,
                    )
            if mode == "cpu":
                _compile(src, partial, None, tmp, log, verbose)
            (out_dir / "build.log").write_text(
                f"mode: {mode}\nsources: {src}\n" + "\n".join(log) + "\n"
            )
            os.replace(partial, target)
    if verbose:
        print(f"[keras_blpa.build_ops] built {target} ({mode})", file=sys.stderr, flush=True)
    return target
