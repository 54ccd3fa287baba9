"""Builds the optional C++ (CPU) and CUDA extensions in csrc/ (see csrc/README.md).

Two libraries, so that either can be missing or fail to load without taking the other along:

* ``dvae_kernels._C``: the op schemas (csrc/ops.cpp) and the CPU kernels (csrc/cpu/).
* ``dvae_kernels._C_cuda``: the CUDA kernels (csrc/cuda/), registered under the same schemas.

Switches (environment variables):

* ``DVAE_KERNELS_BUILD_CPU=0/1``: the CPU kernels (default 1 when a C++ compiler is found).
* ``DVAE_KERNELS_BUILD_CUDA=0/1``: the CUDA kernels (default 1 when nvcc is found and torch is
  a CUDA build). No GPU is needed to compile them.
* ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0+PTX``), ``CUDA_HOME`` (default /usr/local/cuda
  when nvcc is there), ``MAX_JOBS`` (parallel compile jobs, read by torch's ninja build).

Without torch, without a compiler, or with both switches 0, this is a plain pure-Python
install: the package works through its triton and torch backends. A part asked for with ``=1``
that cannot be built is an error. What was built is recorded in dvae_kernels/_build_info.json,
next to the libraries; dvae_kernels/_csrc.py reads it to explain a library that will not load.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import sys
import time

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
BUILD_INFO = "_build_info.json"


def _switch(name: str) -> bool | None:
    """True/False when the variable is set to 1/0, None when unset (automatic)."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"setup.py: {name} must be 0 or 1, got {value!r}")


def _log(msg: str) -> None:
    print(f"[dvae_kernels build] {msg}", file=sys.stderr)


def _cxx_found() -> str | None:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand.split()[0]):
            return cand
    return None


def _find_nvcc() -> str | None:
    """Sets CUDA_HOME to the toolkit folder (nvcc on PATH may be a wrapper elsewhere)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"
    if not home:
        nvcc = shutil.which("nvcc")
        if nvcc is None:
            return None
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    nvcc = os.path.join(home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        return None
    os.environ["CUDA_HOME"] = home
    return nvcc


def _plan():
    """Decide what to build; returns (ext_modules, cmdclass, record)."""
    record = {"torch": None, "cuda": None, "archs": None, "parts": [], "skipped": {},
              "python": platform.python_version(), "machine": platform.machine()}
    want_cpu, want_cuda = _switch("DVAE_KERNELS_BUILD_CPU"), _switch("DVAE_KERNELS_BUILD_CUDA")
    if want_cpu is False and want_cuda is False:
        record["skipped"]["all"] = "DVAE_KERNELS_BUILD_CPU=0 and DVAE_KERNELS_BUILD_CUDA=0"
        return [], {}, record
    if not glob.glob(os.path.join(HERE, CSRC, "ops.cpp")):
        record["skipped"]["all"] = "no csrc/ sources in this source tree"
        return [], {}, record
    # Before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, at import.
    nvcc = _find_nvcc() if want_cuda is not False else None
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        if want_cpu or want_cuda:
            raise SystemExit(f"setup.py: a C++/CUDA build was asked for but torch is not "
                             f"importable ({exc}); install torch first and use "
                             f"pip install --no-build-isolation") from exc
        record["skipped"]["all"] = (f"torch is not importable at build time ({exc}); install "
                                    "torch first and use pip install --no-build-isolation")
        return [], {}, record
    record["torch"] = torch.__version__
    if _cxx_found() is None:
        if want_cpu or want_cuda:
            raise SystemExit("setup.py: a C++/CUDA build was asked for but no C++ compiler "
                             "(CXX, c++, g++, clang++) was found")
        record["skipped"]["all"] = "no C++ compiler found"
        return [], {}, record

    build_cpu = want_cpu is not False
    build_cuda = want_cuda
    if want_cuda is None:
        build_cuda = nvcc is not None and torch.version.cuda is not None
        if nvcc is None:
            record["skipped"]["cuda"] = "nvcc not found (set CUDA_HOME)"
        elif torch.version.cuda is None:
            record["skipped"]["cuda"] = f"torch {torch.__version__} is not a CUDA build"
    elif want_cuda:
        if nvcc is None:
            raise SystemExit("setup.py: DVAE_KERNELS_BUILD_CUDA=1 but nvcc was not found; set "
                             "CUDA_HOME to the CUDA toolkit")
        if torch.version.cuda is None:
            raise SystemExit(f"setup.py: DVAE_KERNELS_BUILD_CUDA=1 but torch "
                             f"{torch.__version__} is not a CUDA build")
    else:
        record["skipped"]["cuda"] = "DVAE_KERNELS_BUILD_CUDA=0"
    if not build_cpu:
        record["skipped"]["cpu"] = "DVAE_KERNELS_BUILD_CPU=0"

    # -g0: Python's CFLAGS carry -g (a 15 MB library instead of a few hundred KB).
    # -Wno-unknown-pragmas: torch's at::vec headers carry `#pragma unroll`, unknown to gcc.
    cxx = ["-O3", "-g0", "-fopenmp", "-Wno-unknown-pragmas"]
    if platform.machine() in ("x86_64", "AMD64"):
        # at::vec vectorises only with a CPU_CAPABILITY; AVX2+FMA+F16C is the common baseline.
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    link = ["-fopenmp"]
    include = [os.path.join(HERE, CSRC)]

    ext_modules = []
    # The schemas live in _C, so it is built whenever any part is; CPU kernels only if asked.
    sources = [os.path.join(CSRC, "ops.cpp")]
    if build_cpu:
        sources += sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
        record["parts"].append("cpu")
    ext_modules.append(cpp_extension.CppExtension(
        "dvae_kernels._C", sources, include_dirs=include,
        extra_compile_args={"cxx": cxx}, extra_link_args=link))
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        record["cuda"] = torch.version.cuda
        record["nvcc"] = nvcc
        record["archs"] = os.environ["TORCH_CUDA_ARCH_LIST"]
        cuda_sources = (sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))
                        + sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu"))))
        ext_modules.append(cpp_extension.CUDAExtension(
            "dvae_kernels._C_cuda", cuda_sources, include_dirs=include,
            extra_compile_args={"cxx": ["-O3", "-g0", "-Wno-unknown-pragmas"],
                                "nvcc": ["-O3", "-lineinfo"]}))
        record["parts"].append("cuda")
    record["max_jobs"] = os.environ.get("MAX_JOBS")

    class BuildExt(cpp_extension.BuildExtension):
        """torch's ninja build, timed, then the record written beside the libraries."""

        def run(self):
            start = time.time()
            super().run()
            record["build_seconds"] = round(time.time() - start, 1)
            record["built_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            # get_ext_fullpath gives the in-place path for editable installs, else build_lib.
            folders = {os.path.dirname(self.get_ext_fullpath(ext.name))
                       for ext in self.extensions}
            for folder in folders:
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, BUILD_INFO), "w") as f:
                    json.dump(record, f, indent=2)
            _log(f"built {', '.join(record['parts']) or 'schemas only'} in "
                 f"{record['build_seconds']} s; record in {', '.join(sorted(folders))}")

        def copy_extensions_to_source(self):
            # Unlink before the in-place copy: a process that has the old library mapped (a
            # test run of this checkout) keeps its inode instead of crashing on a file
            # rewritten under it.
            for ext in self.extensions:
                target = self.get_ext_fullpath(ext.name)
                if self.inplace and os.path.exists(target):
                    os.remove(target)
            super().copy_extensions_to_source()

        def get_outputs(self):
            # Listed so that wheels (and editable installs) carry the record.
            outputs = super().get_outputs()
            return outputs + sorted({os.path.join(os.path.dirname(p), BUILD_INFO)
                                     for p in outputs})

    return ext_modules, {"build_ext": BuildExt.with_options(use_ninja=True)}, record


ext_modules, cmdclass, _record = _plan()
if not ext_modules:
    _log(f"pure-Python install: {_record['skipped'].get('all')}")
    # Say so beside the package, so that libraries left by an earlier build in this source tree
    # are not loaded (dvae_kernels/_csrc.py honours a record that lists no parts).
    if os.path.isdir(os.path.join(HERE, "dvae_kernels")):
        with open(os.path.join(HERE, "dvae_kernels", BUILD_INFO), "w") as f:
            json.dump(_record, f, indent=2)
setup(ext_modules=ext_modules, cmdclass=cmdclass)
