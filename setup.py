"""Build script: the Python package plus its native kernels.

- `bimi_kernels._C` (C++ CPU kernels, the `cpp` backend) is always built. It is compiled against
  the torch of the environment running the build, so the build needs torch importable:
  `pip install --no-build-isolation .` (or `-e .`). Without torch (pip's default isolated build
  environment) the build stops with a message that says so, rather than producing a package
  that silently runs the slow reference backend.
- `bimi_kernels._C_cuda` (CUDA kernels, the `cuda` backend) is built only with a CUDA build of
  torch and a CUDA toolkit (CUDA_HOME or nvcc on PATH). BIMI_BUILD_CUDA=1 insists on it (and fails
  loudly when it cannot be built), BIMI_BUILD_CUDA=0 skips it. TORCH_CUDA_ARCH_LIST picks the GPU
  architectures; without it and without a visible GPU it defaults to the ones torch was built for
  from sm_75 on that nvcc knows, the newest also as PTX ("7.5;8.0;8.6;9.0;10.0;12.0+PTX" for a
  cu130 torch).

Re-builds are incremental: ninja keeps its objects in build/ (also for editable installs, whose
build folder pip would otherwise make new each time), so only changed sources are recompiled.
"""
import glob
import os
import platform
import shlex
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as setuptools_build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"

NO_TORCH_MESSAGE = """
bimi_kernels: cannot build the C++ extension: {where} ({error}).

The extension is compiled against the torch it will run with, so torch must be installed first
and the build must see it:

    pip install torch     # CPU-only machine: pip install torch --index-url https://download.pytorch.org/whl/cpu
    pip install ninja     # parallel, incremental compilation
    pip install --no-build-isolation .     # or, in a source checkout: pip install --no-build-isolation -e .
"""


def _sources(*patterns):
    files = []
    for pattern in patterns:
        files.extend(sorted(glob.glob(os.path.join(CSRC, pattern), recursive=True)))
    return files


# Headers are not compiled on their own. With ninja (the usual case) its dependency files track
# them; listed as `depends`, they also make a build without ninja redo a library that is older.
CPU_DEPENDS = _sources("common/*.h", "cpu/*.h", "cpu/simd/*.h") + ["setup.py"]
CUDA_DEPENDS = CPU_DEPENDS + _sources("cuda/*.cuh", "cuda/*.h")


# The oldest GPU the CUDA kernels support: sm_75 (T4); __grid_constant__ needs sm_70 at least.
MIN_CUDA_ARCH = (7, 5)


def _nvcc_archs(cuda_home):
    """The (major, minor) architectures the toolkit's nvcc can compile for, or None if unknown."""
    try:
        listed = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"],
                                capture_output=True, text=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError, TypeError):
        return None
    archs = {divmod(int(name[8:]), 10) for name in listed if name.startswith("compute_") and name[8:].isdigit()}
    return archs or None


def _default_cuda_arch_list(torch, nvcc_archs=None) -> str:
    """Without a visible GPU (a CI job, an image build): the architectures torch itself runs on,
    from sm_75 on and those the local nvcc knows (`nvcc_archs`, None: not known), the newest also
    as PTX for GPUs newer than torch; else sm_80 and sm_90 + PTX. (torch's own default is the
    visible GPUs' architectures only.)"""
    try:
        flags = torch._C._cuda_getArchFlags().split()
    except Exception:  # a private function: gone or failing in some torch
        flags = []
    archs = sorted({divmod(int(flag[3:]), 10) for flag in flags if flag.startswith("sm_") and flag[3:].isdigit()})
    archs = [a for a in archs if a >= MIN_CUDA_ARCH and (nvcc_archs is None or a in nvcc_archs)]
    names = [f"{major}.{minor}" for major, minor in archs] or ["8.0", "9.0"]
    names[-1] += "+PTX"
    return ";".join(names)


class MissingTorchBuildExt(setuptools_build_ext):
    """Stands in for torch's BuildExtension when torch cannot be imported: metadata and sdists
    need no torch, but compiling does, so building a wheel stops here with the fix."""

    torch_error = ""

    def run(self):
        if any("pip-build-env-" in path for path in sys.path):
            where = ("pip is building in an isolated environment (its default), which does not "
                     "see the torch you installed")
        else:
            where = f"torch is not importable by {sys.executable}"
        raise SystemExit(NO_TORCH_MESSAGE.format(where=where, error=self.torch_error))


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


def _cxx_is_clang(cpp_extension) -> bool:
    """Whether the C++ compiler the build will run (torch's choice: $CXX, else c++) is clang."""
    get_compiler = getattr(cpp_extension, "get_cxx_compiler", lambda: os.environ.get("CXX", "c++"))
    try:
        command = shlex.split(get_compiler()) + ["--version"]
        banner = subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
    except (OSError, ValueError, subprocess.SubprocessError):
        return False
    return "clang" in banner.lower()


def _build_extension_class(cpp_extension):
    class BuildExtension(cpp_extension.BuildExtension):
        def finalize_options(self):
            super().finalize_options()
            if getattr(self, "editable_mode", False):
                # pip gives every editable build a new temporary folder, which would recompile
                # everything each time; keep ninja's objects where `build_ext --inplace` keeps them.
                self.build_temp = os.path.join(
                    ROOT, "build", f"temp.{self.plat_name}-{sys.implementation.cache_tag}"
                )

    return BuildExtension


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        # Enough for metadata and sdists; building the wheel stops with NO_TORCH_MESSAGE.
        MissingTorchBuildExt.torch_error = f"{type(exc).__name__}: {exc}"
        placeholder = Extension("bimi_kernels._C", sources=_sources("bimi.cpp", "cpu/*.cpp"))
        return [placeholder], {"build_ext": MissingTorchBuildExt}

    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    # -fno-trapping-math: the loops over windows may compute both sides of a select, so the
    # compiler vectorises them (no code relies on floating-point exception flags).
    # -g0: Python's own CFLAGS carry -g, which made the library 9.6 MB of mostly debug info.
    # -Wno-psabi: silences GCC's note that passing 32-byte vectors changed ABI in GCC 4.6; the
    # functions concerned are internal to one library built with one compiler.
    # -ffp-contract: GCC fuses multiplies and adds the same way for every target, as the AVX2 and
    # AVX-512 builds' bitwise agreement needs (csrc/README.md); clang's back end, told `fast`,
    # fuses across statements by target-specific patterns (it fused the boundary coefficients'
    # scalar loop differently in the two builds), so clang gets `on`: each expression's
    # multiply-adds fused where the source writes them, the same for every target.
    contract = "-ffp-contract=on" if _cxx_is_clang(cpp_extension) else "-ffp-contract=fast"
    cxx_flags = ["-O3", contract, "-fno-trapping-math", "-DNDEBUG", "-g0", "-Wno-psabi"] + openmp
    if platform.machine().lower() in ("x86_64", "amd64"):
        # the AVX-512 build of the CPU loops stays on 32-byte vectors, also in the loops the
        # compiler vectorises by itself (a target attribute cannot say so on clang; csrc/README.md)
        cxx_flags.append("-mprefer-vector-width=256")
    extensions = [
        cpp_extension.CppExtension(
            name="bimi_kernels._C",
            sources=_sources("bimi.cpp", "cpu/*.cpp"),
            depends=CPU_DEPENDS,
            include_dirs=[os.path.join(ROOT, CSRC)],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=openmp,
        )
    ]

    build_cuda, reason = _want_cuda(torch, cpp_extension)
    if build_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = _default_cuda_arch_list(
                torch, _nvcc_archs(cpp_extension.CUDA_HOME))
        extensions.append(
            cpp_extension.CUDAExtension(
                name="bimi_kernels._C_cuda",
                sources=_sources("cuda/*.cpp", "cuda/*.cu"),
                depends=CUDA_DEPENDS,
                include_dirs=[os.path.join(ROOT, CSRC)] + _nvidia_include_dirs(),
                extra_compile_args={"cxx": ["-O3", "-DNDEBUG", "-g0"], "nvcc": ["-O3", "-DNDEBUG"]},
            )
        )
    else:
        print(f"bimi_kernels: not building the CUDA extension ({reason})", file=sys.stderr)
    return extensions, {"build_ext": _build_extension_class(cpp_extension)}


OLD_SETUPTOOLS_MESSAGE = """
bimi_kernels: setuptools {version} is too old to read pyproject.toml: its SPDX `license = "MIT"`
needs setuptools >= 77 (a build with pip's default isolation gets it by itself). Upgrade it in
this environment, then build again:

    pip install 'setuptools>=77'
"""


def _check_setuptools():
    """A clear message instead of setuptools' own "project.license must be valid exactly by one
    definition" (an environment can hold an older setuptools: torch 2.11 asks only for < 82)."""
    import re

    import setuptools

    major = int(re.match(r"\d+", setuptools.__version__).group())
    with open(os.path.join(ROOT, "pyproject.toml")) as handle:
        spdx_license = re.search(r'^license = "', handle.read(), re.MULTILINE) is not None
    if major < 77 and spdx_license:
        raise SystemExit(OLD_SETUPTOOLS_MESSAGE.format(version=setuptools.__version__))


_check_setuptools()
ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
