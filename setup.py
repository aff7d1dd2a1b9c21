"""Build megatron_jp.

CPU helpers (csrc/helpers/*.cpp, pybind11) are always built, and so is megatron_jp._host_kernels: the
csrc/ CUDA kernels compiled for the host (csrc/host/), which the CPU tests run. The fused CUDA kernels (one extension
per folder of csrc/ holding .cu files) are built only where a CUDA build of torch and nvcc exist;
`MEGATRON_JP_SKIP_CUDA_BUILD=1` skips them and `MAX_JOBS` bounds the parallel compile.
"""

import glob
import os
import sys

from pybind11.setup_helpers import Pybind11Extension
from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_extensions():
    sources = sorted(glob.glob("csrc/helpers/*.cpp"))
    if not sources:
        return []
    return [Pybind11Extension("megatron_jp._helpers", sources, cxx_std=17, extra_compile_args=["-O3"]),
            host_kernels_extension()]


def host_kernels_extension():
    """The same .cu kernel bodies built by the host compiler, csrc/host/include/ standing in for the
    CUDA headers (tests/unit/test_kernels_on_host.py); pybind11 only, no torch headers."""
    return Pybind11Extension(
        "megatron_jp._host_kernels", ["csrc/host/host_kernels.cpp"], cxx_std=17,
        include_dirs=["csrc/host/include", "csrc"],
        # no strict aliasing: the kernels read tensors through 16-byte Pack<T, N> views, as on the GPU
        extra_compile_args=["-O2", "-fno-strict-aliasing", "-Wno-unknown-pragmas"])


def cuda_extensions():
    """One CUDAExtension `megatron_jp.ops._<family>` per csrc/<family>/ that holds .cu files."""
    if os.environ.get("MEGATRON_JP_SKIP_CUDA_BUILD", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("megatron_jp: torch not importable at build time; skipping CUDA kernels "
              "(use `pip install --no-build-isolation -e .` to build them)", file=sys.stderr)
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print("megatron_jp: CPU build of torch or no CUDA toolkit; skipping CUDA kernels", file=sys.stderr)
        return [], {}
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    nvcc_flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
    if arch is None:
        nvcc_flags += ["-gencode", "arch=compute_90a,code=sm_90a", "-gencode", "arch=compute_80,code=sm_80"]
    extensions = []
    for family in sorted(os.listdir(os.path.join(HERE, "csrc"))):
        folder = os.path.join("csrc", family)
        cu = sorted(glob.glob(os.path.join(folder, "*.cu")))
        if not cu:
            continue
        sources = sorted(glob.glob(os.path.join(folder, "*.cpp"))) + cu
        extensions.append(CUDAExtension(
            f"megatron_jp.ops._{family}", sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": nvcc_flags},
        ))
    return extensions, {"build_ext": BuildExtension.with_options(use_ninja=True)}


cuda_ext, cmdclass = cuda_extensions()

setup(
    name="megatron_jp",
    version="0.1.0",
    description="Megatron-style 3D-parallel pretraining of Japanese BERT-style encoders",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_jp", "megatron_jp.*"]),
    package_data={"megatron_jp": ["py.typed"]},
    ext_modules=cpu_extensions() + cuda_ext,
    cmdclass=cmdclass,
    install_requires=[
        # tested: 2.13 (CI, the pinned CPU build); the device check targets 2.11. Private torch APIs are
        # reached only through megatron_jp/torch_compat.py, which names a missing one.
        "torch>=2.11",
        "numpy",
        "pyyaml",
        "safetensors",
        "sentencepiece",
        "tokenizers",
        "transformers>=4.48",
        "fugashi",
        "unidic-lite",
        "einops",
        "tqdm",
        "tensorboard",
        "pyarrow",  # preprocess_data reads .parquet corpora
        "zstandard",  # ... and .jsonl.zst
    ],
    extras_require={
        # megatron-core: reference reader of our shards; pybind11: in-place rebuilds (--no-build-isolation,
        # as bench/gpu_check.sh does)
        "test": ["pytest", "megatron-core==0.16.1", "pybind11>=2.12"],
        "plot": ["matplotlib"],
        # tools/evaluate.py: metrics, and the sentence-transformers export (keeps the installed torch)
        "eval": ["scipy", "scikit-learn", "sentence-transformers>=3"],
        "sudachi": ["sudachipy", "sudachidict-core"],
        # train.precision fp8: torchao's float8 training (tested: 0.18.0 with torch 2.13, CPU emulation)
        "fp8": ["torchao>=0.18"],
    },
)
