"""Builds torchpool._C: the CPU kernels always, the CUDA kernels when they can be built.

CUDA is built when nvcc and a CUDA build of torch are present, or when TORCHPOOL_CUDA=1 (or
FORCE_CUDA=1) asks for it; TORCHPOOL_CUDA=0 forces a CPU-only build. TORCH_CUDA_ARCH_LIST picks
the GPU architectures (default: sm_80 and sm_90).
"""
import glob
import os
import shutil

from setuptools import setup

import torch
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda():
    flag = os.environ.get("TORCHPOOL_CUDA", os.environ.get("FORCE_CUDA"))
    if flag is not None and flag.strip() != "":
        return flag.strip() not in ("0", "false", "False", "no")
    has_nvcc = CUDA_HOME is not None or shutil.which("nvcc") is not None
    return has_nvcc and torch.version.cuda is not None


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


# The stable ABI's version: torch's BuildExtension (2.7 on) defines Py_LIMITED_API for extensions
# built with py_limited_api=True, at its own minimum Python; older versions leave it to us. One
# definition only, and the wheel tagged for the version the code is built against.
_TORCH_LIMITED_API = getattr(cpp_extension, "min_supported_cpython", None)
LIMITED_API = int(_TORCH_LIMITED_API, 16) if _TORCH_LIMITED_API else 0x03090000
WHEEL_ABI = f"cp3{(LIMITED_API >> 16) & 0xFF}"


def extension():
    with_cuda = _want_cuda()
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    # -fopenmp: at::parallel_for is inlined into our code and runs serially without it.
    cxx = ["-O3", "-g0", "-fopenmp"]
    if _TORCH_LIMITED_API is None:
        cxx.append(f"-DPy_LIMITED_API={LIMITED_API:#010x}")
    link = ["-fopenmp"]
    if with_cuda:
        sources += _sources("csrc/cuda/*.cu")
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        # C++20 for the CUDA sources whatever the torch version defaults to (one -std only: nvcc
        # rejects two, and torch adds none when one is given).
        nvcc = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]
        print(f"torchpool: building CPU + CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}")
        return CUDAExtension(
            "torchpool._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx + ["-DTORCHPOOL_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=link,
            py_limited_api=True,
        )
    print("torchpool: building CPU kernels only")
    return CppExtension(
        "torchpool._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx}, extra_link_args=link, py_limited_api=True,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": WHEEL_ABI}},
)
