"""Builds the BLPA custom-op library against the installed TensorFlow (and,
in `jax_library`, the XLA custom calls for JAX).

`python -m keras_blpa.build_ops` builds explicitly and prints what it built and
where (`__main__.py`). `ensure_built()` builds on first use into a cache directory keyed by the
TensorFlow version and a hash of the sources and flags, by default
`~/.cache/keras_blpa/<key>/` (override with `KERAS_BLPA_CACHE_DIR`).

The C++ sources are looked up in `custom_ops/` next to the package (a source
checkout) and in `keras_blpa/_custom_ops/` (package data of an install).

The CUDA kernels are built only when `nvcc` is found and `KERAS_BLPA_BUILD_CUDA`
is not "0"; if that fails the CPU-only library is built instead. Bazel is not
needed: everything is plain g++/nvcc against `tf.sysconfig`'s flags.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

LIB_NAME = "libblpa_ops.so"
# Paths under custom_ops/: shared/ holds what the TF op and the JAX custom calls
# share (the per-element math and the CPU loops), tf_op/ the TF op, jax_ffi/ the
# XLA FFI handlers, cuda/ the CUDA kernels. Includes are relative to custom_ops/.
SOURCES = (
    "tf_op/blpa_ops.cc",
    "tf_op/blpa_kernels.cc",
    "tf_op/row_codes.cc",
    "shared/blpa_cpu.cc",
    "shared/blpa_cpu.h",
    "shared/blpa_kernels.h",
    "cuda/blpa_kernels.cu.cc",
)
CPU_SOURCES = ("tf_op/blpa_ops.cc", "tf_op/blpa_kernels.cc", "tf_op/row_codes.cc",
               "shared/blpa_cpu.cc")
CUDA_SOURCE = "cuda/blpa_kernels.cu.cc"

# -ffp-contract=off: no FMA, so results match the pure-TF quantizer bit for bit.
# -fno-trapping-math lets GCC if-convert (vectorize) the selects; it changes no
# value. The -U flags make g++ agree with the clang-built TF on Eigen alignment.
CXX_FLAGS = (
    "-shared",
    "-fPIC",
    "-O3",
    "-ffp-contract=off",
    "-fno-trapping-math",
    "-U__GCC_DESTRUCTIVE_SIZE",
    "-U__GCC_CONSTRUCTIVE_SIZE",
    "-Wno-deprecated-declarations",
)
# --fmad=false: the CUDA twin of -ffp-contract=off.
NVCC_FLAGS = (
    "-c",
    "-x",
    "cu",
    "-std=c++17",
    "-O3",
    "--fmad=false",
    "-Xcompiler",
    "-fPIC",
    "-Xcompiler",
    "-ffp-contract=off",
    "--expt-relaxed-constexpr",
    "-DGOOGLE_CUDA=1",
)
# SASS for Turing..Hopper (CUDA 13 dropped < sm_75) plus PTX for newer GPUs.
DEFAULT_CUDA_ARCHS = "75;80;86;89;90"
CUDA_LINK = ("-l:libcudart_static.a", "-ldl", "-lrt", "-lpthread", "-Wl,--exclude-libs,ALL")


class BuildError(RuntimeError):
    """The op library could not be built."""


_last_error: str | None = None


def last_error() -> str | None:
    """Why the last `ensure_built()` returned None (None if it did not fail)."""
    return _last_error


def source_dir() -> Path:
    """The directory holding the C++ sources (checkout first, then package data)."""
    package = Path(__file__).resolve().parent.parent  # keras_blpa/
    candidates = [package.parent / "custom_ops", package / "_custom_ops"]
    for cand in candidates:
        if all((cand / name).is_file() for name in SOURCES):
            return cand
    raise BuildError(
        "custom-op sources not found; looked in " + ", ".join(str(c) for c in candidates)
    )


def cache_root() -> Path:
    """`KERAS_BLPA_CACHE_DIR`, else `~/.cache/keras_blpa`."""
    env = os.environ.get("KERAS_BLPA_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "keras_blpa"


def find_nvcc() -> str | None:
    """nvcc if CUDA should be built (found, and KERAS_BLPA_BUILD_CUDA != "0")."""
    if os.environ.get("KERAS_BLPA_BUILD_CUDA", "1") == "0":
        return None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def _cuda_root(nvcc: str) -> Path:
    # nvcc may be a wrapper script (/usr/local/bin/nvcc), so check for headers.
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    candidates += [str(Path(nvcc).resolve().parent.parent), "/usr/local/cuda"]
    for cand in candidates:
        if cand and (Path(cand) / "include" / "cuda_runtime.h").is_file():
            return Path(cand)
    raise BuildError(f"CUDA headers (cuda_runtime.h) not found for {nvcc}")


def _cuda_lib_dir(root: Path) -> Path:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        if (root / sub / "libcudart_static.a").is_file():
            return root / sub
    raise BuildError(f"libcudart_static.a not found under {root}")


def _gencode_flags() -> list[str]:
    archs = [a for a in os.environ.get("KERAS_BLPA_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).split(";") if a]
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


def _tf_flags() -> tuple[str, list[str], list[str]]:
    import tensorflow as tf

    return (
        tf.__version__,
        list(tf.sysconfig.get_compile_flags()),
        list(tf.sysconfig.get_link_flags()),
    )


def build_key(src: Path | None = None, cuda: bool | None = None) -> str:
    """Cache key: TF version, CPU/CUDA mode and a hash of sources and flags."""
    src = src or source_dir()
    cuda = find_nvcc() is not None if cuda is None else cuda
    version, cflags, lflags = _tf_flags()
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update(name.encode() + b"\0" + (src / name).read_bytes() + b"\0")
    flags = [*cflags, *lflags, *CXX_FLAGS, sys.platform]
    if cuda:
        flags += [*NVCC_FLAGS, *_gencode_flags(), *CUDA_LINK]
    digest.update("\0".join(flags).encode())
    return f"tf{version}-{'cuda' if cuda else 'cpu'}-{digest.hexdigest()[:16]}"


def default_library_path() -> Path:
    """Where `ensure_built()` puts (or finds) the library for this setup."""
    return cache_root() / build_key() / LIB_NAME


def _run(cmd: list[str], log: list[str], verbose: bool) -> None:
    line = " ".join(cmd)
    log.append(line)
    if verbose:
        print(f"[keras_blpa.build_ops] {line}", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BuildError(f"{cmd[0]} failed to run: {err}") from err
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-25:])
        raise BuildError(f"command failed ({proc.returncode}): {line}\n{tail}")


def _compile_cpu(src: Path, out: Path, log: list[str], verbose: bool) -> None:
    _, cflags, lflags = _tf_flags()
    cxx = os.environ.get("CXX", "g++")
    cmd = [cxx, *cflags, f"-I{src}", *CXX_FLAGS, *(str(src / s) for s in CPU_SOURCES)]
    cmd += ["-o", str(out)]
    _run([*cmd, *lflags], log, verbose)


def _compile_cuda(
    src: Path, out: Path, nvcc: str, tmp: Path, log: list[str], verbose: bool
) -> None:
    _, cflags, lflags = _tf_flags()
    root = _cuda_root(nvcc)
    lib_dir = _cuda_lib_dir(root)
    obj = tmp / "blpa_kernels.cu.o"
    nvcc_cmd = [nvcc, *NVCC_FLAGS, *_gencode_flags(), f"-I{src}", str(src / CUDA_SOURCE)]
    _run([*nvcc_cmd, "-o", str(obj)], log, verbose)
    cxx = os.environ.get("CXX", "g++")
    # cudart is linked statically: the library loads on machines without CUDA
    # and does not depend on which libcudart TF itself loads.
    cmd = [cxx, *cflags, f"-I{src}", "-DGOOGLE_CUDA=1", f"-I{root / 'include'}", *CXX_FLAGS]
    cmd += [*(str(src / s) for s in CPU_SOURCES), str(obj), "-o", str(out), *lflags]
    _run([*cmd, f"-L{lib_dir}", *CUDA_LINK], log, verbose)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build(
    out_dir: str | Path | None = None,
    cuda: bool | None = None,
    force: bool = False,
    verbose: bool = True,
) -> Path:
    """Builds the op library and returns its path.

    Args:
      out_dir: target directory; default `cache_root() / build_key()`.
      cuda: build the CUDA kernels too; default: when nvcc is found and
        `KERAS_BLPA_BUILD_CUDA != "0"`. A failed CUDA build falls back to CPU.
      force: rebuild even if the library already exists.
      verbose: print the commands and outcome to stderr.

    Raises:
      BuildError: if not even the CPU-only library could be built.
    """
    src = source_dir()
    nvcc = find_nvcc()
    if cuda is None:
        cuda = nvcc is not None
    elif cuda and nvcc is None:
        raise BuildError("cuda=True but nvcc was not found")
    out_dir = Path(out_dir) if out_dir is not None else cache_root() / build_key(src, cuda)
    target = out_dir / LIB_NAME
    with _locked(out_dir):
        if target.is_file() and not force:
            return target
        log: list[str] = []
        kind = "CUDA+CPU" if cuda else "CPU"
        print(
            f"[keras_blpa.build_ops] building the BLPA op library ({kind}, one-time, "
            f"about half a minute) into {out_dir}",
            file=sys.stderr,
            flush=True,
        )
        with tempfile.TemporaryDirectory(prefix="blpa_build_", dir=out_dir) as tmp_name:
            tmp = Path(tmp_name)
            partial = tmp / LIB_NAME
            mode = "cpu"
            if cuda:
                try:
                    _compile_cuda(src, partial, str(nvcc), tmp, log, verbose)
                    mode = "cpu+cuda"
                except BuildError as err:
                    print(
                        f"[keras_blpa.build_ops] CUDA build failed, building CPU-only: {err}",
                        file=sys.stderr,
                        flush=True,
                    )
            if mode == "cpu":
                _compile_cpu(src, partial, log, verbose)
            (out_dir / "build.log").write_text(
                f"mode: {mode}\nsources: {src}\n" + "\n".join(log) + "\n"
            )
            os.replace(partial, target)  # atomic: readers never see a partial file
    if verbose:
        print(f"[keras_blpa.build_ops] built {target} ({mode})", file=sys.stderr, flush=True)
    return target


def build_or_raise(verbose: bool = False) -> Path:
    """The cached library, built on first use; raises BuildError on failure."""
    return build(verbose=verbose)


def ensure_built() -> Path | None:
    """The cached library path, built on first use; None if it cannot be built."""
    global _last_error
    try:
        path = build_or_raise()
    except (BuildError, OSError, ImportError) as err:
        _last_error = str(err)
        return None
    _last_error = None
    return path


def main(argv: list[str] | None = None) -> int:
    """Builds the libraries the installed frameworks can load: the TensorFlow
    op when TensorFlow is installed, the JAX custom calls when jax is."""
    import importlib.util

    parser = argparse.ArgumentParser(
        prog="python -m keras_blpa.build_ops", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out-dir", help="build here instead of the cache directory")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--cpu-only", action="store_true", help="skip the CUDA kernels")
    parser.add_argument(
        "--only", choices=("tensorflow", "jax"), help="build for this framework only"
    )
    args = parser.parse_args(argv)
    builders = []
    if args.only in (None, "tensorflow") and importlib.util.find_spec("tensorflow"):
        builders.append(build)
    if args.only in (None, "jax") and importlib.util.find_spec("jax"):
        from keras_blpa.build_ops.jax_library import build_jax

        builders.append(build_jax)
    if not builders:
        print("keras_blpa: neither tensorflow nor jax is installed", file=sys.stderr)
        return 1
    for builder in builders:
        try:
            path = builder(
                out_dir=args.out_dir,
                cuda=False if args.cpu_only else None,
                force=args.force,
                verbose=True,
            )
        except BuildError as err:
            print(f"keras_blpa: build failed: {err}", file=sys.stderr)
            return 1
        log = path.parent / "build.log"
        info = log.read_text() if log.is_file() else ""
        mode = info.splitlines()[0] if info else "mode: unknown (cached)"
        print(f"{path}\n{mode}")
    return 0
