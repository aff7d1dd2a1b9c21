"""Build megatron_jp.

CPU helpers (csrc/helpers/*.cpp, pybind11) are always built. The fused CUDA kernels (one extension
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
    return [Pybind11Extension("megatron_jp._helpers", sources, cxx_std=17, extra_compile_args=["-O3"])]


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
        "torch>=2.5",
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
    ],
    extras_require={
        "test": ["pytest", "megatron-core==0.16.1"],  # megatron-core: reference reader of our shards
        "plot": ["matplotlib"],
        # tools/evaluate.py: metrics, and the sentence-transformers export (keeps the installed torch)
        "eval": ["scipy", "scikit-learn", "sentence-transformers>=3"],
        "sudachi": ["sudachipy", "sudachidict-core"],
        # train.precision fp8: torchao's float8 training (tested: 0.18.0 with torch 2.13, CPU emulation)
        "fp8": ["torchao>=0.18"],
    },
)
