"""Build script: the Python package plus its native kernels.

- `bimi_kernels._C` (C++ CPU kernels, the `cpp` backend) is always built when torch is importable.
- `bimi_kernels._C_cuda` (CUDA kernels, the `cuda` backend) is built only with a CUDA build of
  torch and a CUDA toolkit (CUDA_HOME or nvcc on PATH). BIMI_BUILD_CUDA=1 insists on it (and fails
  loudly when it cannot be built), BIMI_BUILD_CUDA=0 skips it. TORCH_CUDA_ARCH_LIST picks the GPU
  architectures; without it and without a visible GPU it defaults to "8.0;9.0".

Build against the torch already installed: `pip install --no-build-isolation --no-deps -e .`
(torch is deliberately not a build requirement; isolation would download a multi-GB torch).
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _sources(*patterns):
    files = []
    for pattern in patterns:
        files.extend(sorted(glob.glob(os.path.join(CSRC, pattern))))
    return files


def _nvidia_include_dirs():
    """Headers shipped by torch's nvidia-* pip packages (cuBLAS, cuSPARSE, ... for CUDA 13 under
    nvidia/cu13/include), which a bare toolkit may lack."""
    dirs = []
    for site in sys.path:
        base = os.path.join(site, "nvidia")
        if not os.path.isdir(base):
            continue
        dirs.extend(sorted(glob.glob(os.path.join(base, "*", "include"))))
        dirs.extend(sorted(glob.glob(os.path.join(base, "*", "*", "include"))))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _want_cuda(torch, cpp_extension):
    flag = os.environ.get("BIMI_BUILD_CUDA", "").strip()
    if flag == "0":
        return False, "BIMI_BUILD_CUDA=0"
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    if cpp_extension.CUDA_HOME is None:
        reasons.append("no CUDA toolkit found (set CUDA_HOME)")
    if reasons:
        if flag == "1":
            raise RuntimeError("BIMI_BUILD_CUDA=1 but the CUDA extension cannot be built: " + "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, ""


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("bimi_kernels: torch is not importable, building no native extension", file=sys.stderr)
        return [], {}

    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    # -fno-trapping-math: the loops over windows may compute both sides of a select, so the
    # compiler vectorises them (no code relies on floating-point exception flags).
    cxx_flags = ["-O3", "-ffp-contract=fast", "-fno-trapping-math", "-DNDEBUG"] + openmp
    extensions = [
        cpp_extension.CppExtension(
            name="bimi_kernels._C",
            sources=_sources("bimi.cpp", "cpu/*.cpp"),
            include_dirs=[os.path.join(ROOT, CSRC)],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=openmp,
        )
    ]

    build_cuda, reason = _want_cuda(torch, cpp_extension)
    if build_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        extensions.append(
            cpp_extension.CUDAExtension(
                name="bimi_kernels._C_cuda",
                sources=_sources("cuda/*.cpp", "cuda/*.cu"),
                include_dirs=[os.path.join(ROOT, CSRC)] + _nvidia_include_dirs(),
                extra_compile_args={"cxx": ["-O3", "-DNDEBUG"], "nvcc": ["-O3", "-DNDEBUG"]},
            )
        )
    else:
        print(f"bimi_kernels: not building the CUDA extension ({reason})", file=sys.stderr)
    return extensions, {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
