"""Packaging: what an sdist carries, what a build without torch says, the metadata and the CLI.
The slow install checks (sdist -> wheel -> fresh venv -> import from elsewhere; `pip install .`
with build isolation) are .ci/check_install.sh."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
import torch

import bimi_kernels
from bimi_kernels import _version
from bimi_kernels.__main__ import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _tracked_files(*paths):
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", *paths],
                            cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return [name for name in listed.split("\0") if name and (ROOT / name).exists()]


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    """The working tree's sources without its build outputs, as a fresh clone would have them."""
    copy = tmp_path_factory.mktemp("source")
    for name in _tracked_files():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    return copy


def _run_setup(source, *args, block_torch=False):
    """Run setup.py in `source`; with block_torch, as in pip's isolated build (no torch)."""
    code = "import runpy, sys\n"
    if block_torch:
        code += "sys.modules['torch'] = None\n"
    code += f"sys.argv = ['setup.py', *{list(args)!r}]\nrunpy.run_path('setup.py', run_name='__main__')\n"
    return subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=300)


def test_sdist_carries_every_file_the_build_needs(source_copy, tmp_path):
    # csrc/cpu/*.cpp include ../common/*.h; the CUDA sources are compiled where a toolkit exists;
    # docs/ and examples/ are what the README links to
    done = _run_setup(source_copy, "-q", "sdist", "-d", str(tmp_path), block_torch=True)
    assert done.returncode == 0, done.stderr
    (sdist,) = tmp_path.glob("bimi_kernels-*.tar.gz")
    with tarfile.open(sdist) as archive:
        members = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    needed = set(_tracked_files("csrc", "bimi_kernels", "docs", "examples")) | {
        "setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md", "requirements-cpu.txt"}
    assert any(name.endswith(".h") for name in needed) and any(name.endswith(".cu") for name in needed)
    assert sorted(needed - members) == []
    assert not any(name.startswith("tests/") for name in members)  # they need the repository


def test_a_build_without_torch_stops_and_names_no_build_isolation(source_copy):
    # pip's default isolated build environment has no torch: no silently pure-Python wheel
    done = _run_setup(source_copy, "build_ext", block_torch=True)
    assert done.returncode != 0
    message = done.stdout + done.stderr
    assert "cannot build the C++ extension" in message
    assert "pip install --no-build-isolation ." in message
    assert "https://download.pytorch.org/whl/cpu" in message
    # metadata needs no torch (pip asks for it before building)
    assert _run_setup(source_copy, "-q", "egg_info", block_torch=True).returncode == 0


def test_build_system_requires_only_what_the_build_uses():
    requires = PYPROJECT["build-system"]["requires"]
    names = {re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower() for requirement in requires}
    # torch would be downloaded (CUDA, several GB) into an isolated build environment
    assert "torch" not in names
    assert names == {"setuptools", "ninja"}
    assert "setuptools>=77" in requires  # the SPDX form of `license`


def test_license_is_mit_in_spdx_form_with_the_file():
    assert PYPROJECT["project"]["license"] == "MIT"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_version_is_written_once():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "bimi_kernels._version.__version__"}
    assert bimi_kernels.__version__ == _version.__version__
    holders = [name for name in _tracked_files("bimi_kernels", "setup.py", "pyproject.toml")
               if name.endswith((".py", ".toml"))
               and re.search(rf"""["']{re.escape(_version.__version__)}["']""", (ROOT / name).read_text())]
    assert holders == ["bimi_kernels/_version.py"]


def test_numpy_is_not_a_dependency_of_the_package():
    assert not any(dep.startswith("numpy") for dep in PYPROJECT["project"]["dependencies"])
    assert any(dep.startswith("numpy") for dep in PYPROJECT["project"]["optional-dependencies"]["demo"])
    core = [path for path in (ROOT / "bimi_kernels").rglob("*.py") if "demo" not in path.parts]
    importing = [str(path.relative_to(ROOT)) for path in core
                 if re.search(r"^\s*(import numpy|from numpy)", path.read_text(), re.M)]
    assert importing == []


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"bimi_kernels {_version.__version__}"


def test_info_names_the_extension_file_and_the_cpu_build(capsys):
    """`bimi info` says which compiled file was loaded (another checkout's build can be picked
    up through an editable install), the processor and which build of the CPU loops runs."""
    import bimi_kernels.native as native

    assert cli_main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"processor    {native.processor_name()}" in out
    if native.cpu_isa() is None:
        assert "cpu loops    not built" in out
    else:
        assert f"_C           {sys.modules['bimi_kernels._C'].__file__}" in out
        assert f"cpu loops    {native.cpu_isa()} build" in out


@pytest.mark.parametrize("setting", ["BIMI_BACKEND=cuda", "BIMI_BACKEND=foo", "BIMI_CPU_ISA=avx9"])
def test_info_reports_a_setting_that_cannot_run_instead_of_crashing(setting, monkeypatch, capsys):
    """`bimi info` is what a user runs when a setting breaks the loss: it lists every backend
    and says what backend='auto' would raise, with exit status 1, not a traceback."""
    from bimi_kernels import backends

    name, value = setting.split("=")
    monkeypatch.setenv(name, value)
    backends.reset_cache()
    assert cli_main(["info"]) == 1
    out = capsys.readouterr().out
    assert "auto picks: none" in out
    assert all(f"  {backend:<10} " in out for backend in backends.BACKEND_NAMES)
    assert re.search(r"every call with backend='auto' on cpu tensors raises (ValueError|RuntimeError): .*" + name, out)
    if name == "BIMI_CPU_ISA":
        assert "cpp        unavailable: BIMI_CPU_ISA" in out


def test_processor_name_gives_family_and_model():
    """Results on a CPU depend on the processor (the demo's README shows how much): its name
    comes with the family and model numbers where /proc/cpuinfo has them."""
    from bimi_kernels.native import processor_name

    name = processor_name()
    assert name
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and re.search(r"^cpu family\s*:", cpuinfo.read_text(), re.M):
        assert re.search(r"\(family \d+ model \d+\)$", name), name


def test_cli_stops_quietly_when_its_reader_goes_away():
    """`bimi info | head -1`: no BrokenPipeError traceback once the reader has closed the pipe."""
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-m", "bimi_kernels", "info"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read().decode()
        proc.wait(timeout=120)
        assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_bench_runs_the_checkout_benchmarks_without_the_checkout_on_sys_path(tmp_path):
    # as the `bimi` console script runs: the package importable, the repository root not on
    # sys.path, the current directory elsewhere
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from bimi_kernels.__main__ import main\n"
        f"sys.path[:] = [p for p in sys.path if p not in ({str(ROOT)!r}, '')]\n"
        "sys.exit(main(['bench', '--help']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout and "--quick" in done.stdout


def test_bench_without_a_checkout_says_where_the_benchmarks_are(monkeypatch, capsys):
    monkeypatch.setattr("bimi_kernels.__main__.benchmarks_checkout", lambda: None)
    assert cli_main(["bench"]) == 2
    assert "python -m benchmarks.run" in capsys.readouterr().err
    assert cli_main(["bench", "--help"]) == 0  # asking for help is not an error
    assert "python -m benchmarks.run" in capsys.readouterr().out


def test_bench_without_its_extras_names_them_not_a_traceback(monkeypatch, capsys):
    monkeypatch.setattr("bimi_kernels.demo.packages.missing_packages", lambda names: ["numpy"])
    assert cli_main(["bench", "--help"]) == 2
    err = capsys.readouterr().err
    assert "numpy (is not installed)" in err and "'.[bench]'" in err


def test_bench_extras_are_the_ones_pyproject_declares():
    from bimi_kernels.__main__ import BENCH_PACKAGES

    assert list(BENCH_PACKAGES) == PYPROJECT["project"]["optional-dependencies"]["bench"]


def test_pytest_ignores_only_third_party_warnings():
    filters = PYPROJECT["tool"]["pytest"]["ini_options"]["filterwarnings"]
    for entry in filters:
        action, _message, _category, module = entry.split(":")[:4]
        assert action == "ignore" and module, entry  # always narrowed to a module
        assert module.split("\\")[0] not in ("bimi_kernels", "tests", "benchmarks", ""), entry


def test_an_older_build_without_the_isa_op_is_reported_not_a_crash(monkeypatch):
    import types

    import bimi_kernels.native as native

    if native.cpu_isa() is None:
        pytest.skip("the C++ extension is not built")
    monkeypatch.setattr(torch.ops, "bimi_C", types.SimpleNamespace())  # an old _C: no cpu_isa op
    assert native.cpu_isa().startswith("unknown (an older build")


def test_default_cuda_architectures_are_torchs_own():
    """Without TORCH_CUDA_ARCH_LIST and a visible GPU, setup.py builds for what torch itself runs
    on, the newest also as PTX (sm_80/sm_90 alone left T4 and Blackwell GPUs without a kernel)."""
    import types

    source = (ROOT / "setup.py").read_text()
    start, end = source.index("MIN_CUDA_ARCH = "), source.index("class MissingTorchBuildExt")
    namespace: dict = {"os": os, "subprocess": subprocess}
    exec(source[start:end], namespace)
    default_for, nvcc_archs = namespace["_default_cuda_arch_list"], namespace["_nvcc_archs"]

    def torch_with(flags):
        return types.SimpleNamespace(_C=types.SimpleNamespace(_cuda_getArchFlags=lambda: flags))

    cu130 = torch_with("sm_75 sm_80 sm_86 sm_90 sm_100 sm_120")
    assert default_for(cu130) == "7.5;8.0;8.6;9.0;10.0;12.0+PTX"
    # older GPUs than the kernels support (__grid_constant__), and those the local nvcc lacks, left out
    assert default_for(torch_with("sm_50 sm_60 sm_70 sm_75 sm_80 sm_90")) == "7.5;8.0;9.0+PTX"
    assert default_for(cu130, {(7, 5), (8, 0), (8, 6), (9, 0)}) == "7.5;8.0;8.6;9.0+PTX"
    assert default_for(torch_with("sm_90a sm_80")) == "8.0+PTX"  # arch-specific variants are not portable
    assert default_for(torch_with("")) == "8.0;9.0+PTX"
    assert default_for(types.SimpleNamespace(_C=types.SimpleNamespace())) == "8.0;9.0+PTX"
    assert nvcc_archs("/no/such/toolkit") is None
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        assert (9, 0) in nvcc_archs("/usr/local/cuda")


def test_clang_builds_fuse_multiply_adds_as_written(tmp_path):
    """setup.py tells the compiler it runs apart: clang gets -ffp-contract=on, since with `fast`
    its back end fused the AVX2 and AVX-512 builds' multiply-adds differently (csrc/README.md)."""
    import shlex
    import types

    source = (ROOT / "setup.py").read_text()
    start, end = source.index("def _cxx_is_clang"), source.index("def _build_extension_class")
    namespace: dict = {"os": os, "shlex": shlex, "subprocess": subprocess}
    exec(source[start:end], namespace)
    is_clang = namespace["_cxx_is_clang"]

    def compiler_printing(banner):
        script = tmp_path / f"cxx{len(list(tmp_path.iterdir()))}"
        script.write_text(f"#!/bin/sh\necho '{banner}'\n")
        script.chmod(0o755)
        return types.SimpleNamespace(get_cxx_compiler=lambda: str(script))

    assert is_clang(compiler_printing("Debian clang version 14.0.6"))
    assert is_clang(compiler_printing("Apple clang version 15.0.0 (clang-1500.3.9.4)"))
    assert not is_clang(compiler_printing("g++ (Debian 12.2.0-14+deb12u1) 12.2.0"))
    assert not is_clang(types.SimpleNamespace(get_cxx_compiler=lambda: str(tmp_path / "no-such-compiler")))
    # a launcher in front of the compiler (CXX="ccache clang++") is one command with its arguments
    launcher = compiler_printing("clang version 17.0.1").get_cxx_compiler()
    assert is_clang(types.SimpleNamespace(get_cxx_compiler=lambda: f"/bin/sh {launcher}"))


def test_an_old_setuptools_gets_a_message_not_a_schema_error():
    """pyproject.toml's SPDX licence needs setuptools >= 77; an older one (torch 2.11 allows it)
    stops with the upgrade command instead of "project.license must be valid exactly by one
    definition"."""
    code = (
        "import runpy, sys, setuptools\n"
        "setuptools.__version__ = '65.5.0'\n"
        "sys.argv = ['setup.py', '--version']\n"
        "runpy.run_path('setup.py')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "setuptools 65.5.0 is too old" in done.stderr and "pip install 'setuptools>=77'" in done.stderr
