"""Builds the faceptor C++/CUDA extension (heatmap -> coordinates op, see ops.py and csrc/).

    python setup.py build_ext --inplace      # leaves _faceptor_ops*.so next to ops.py

The CPU kernel always builds. The CUDA kernel (csrc/heatmap_cuda.cu) builds too when torch is a CUDA build and a
CUDA toolkit is found (CUDA_HOME); otherwise the extension is CPU-only. Set FACEPTOR_CPU_ONLY=1 to force CPU-only.
Ninja is used when installed.
"""
import os

from setuptools import setup
from torch.utils import cpp_extension

CSRC = "csrc"
CXX_FLAGS = ["-O3", "-fopenmp"]   # -fopenmp: at::parallel_for is header code on the OpenMP backend
LINK_FLAGS = ["-fopenmp"]       # resolves to the libgomp.so.1 torch already loaded
NVCC_FLAGS = ["-O3", "--use_fast_math"]


def extension_sources(with_cuda: bool):
    """Sources and macros of the extension; shared with the test build in tests/test_ops.py."""
    sources = [os.path.join(CSRC, "faceptor_ops.cpp"), os.path.join(CSRC, "heatmap_cpu.cpp")]
    macros = []
    if with_cuda:   # the .cu registers the CUDA kernels itself (TORCH_LIBRARY_IMPL(faceptor, CUDA, ...))
        sources.append(os.path.join(CSRC, "heatmap_cuda.cu"))
    return sources, macros


def cuda_available() -> bool:
    import torch
    return (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
            and os.environ.get("FACEPTOR_CPU_ONLY", "0") != "1")


def make_extension():
    with_cuda = cuda_available()
    sources, macros = extension_sources(with_cuda)
    if with_cuda:
        return cpp_extension.CUDAExtension(
            "_faceptor_ops", sources, define_macros=macros,
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS}, extra_link_args=LINK_FLAGS)
    return cpp_extension.CppExtension("_faceptor_ops", sources, define_macros=macros,
                                      extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=LINK_FLAGS)


if __name__ == "__main__":
    setup(
        name="faceptor-ops",
        ext_modules=[make_extension()],
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    )
