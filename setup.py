"""Ahead-of-time build: ``pip install --no-build-isolation .`` (or ``python setup.py build_ext --inplace``).

Builds ``gradvar_ext._C`` from ``csrc/``: the C++ kernels always, the CUDA kernels too when torch
is a CUDA build and nvcc is found (GRADVAR_EXT_NO_CUDA=1 skips them). GRADVAR_EXT_SKIP_BUILD=1
installs the Python package and the sources only; the kernels are then compiled at first import.
"""

import importlib.util
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("_gradvar_build", os.path.join(HERE, "gradvar_ext", "_build.py"))
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)
SKIP_BUILD = os.environ.get("GRADVAR_EXT_SKIP_BUILD", "") not in ("", "0")


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package (gradvar_ext/_csrc) so a JIT build works from an install too."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "gradvar_ext", "_csrc")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(os.path.join(HERE, "csrc"), target)


def extensions():
    """The compiled module, and the build_ext command for it (torch is imported only to build)."""
    if SKIP_BUILD:
        return [], {}
    _build.prepare_cuda_environment()  # before torch.utils.cpp_extension reads CUDA_HOME
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = _build.want_cuda()
    kind = CUDAExtension if with_cuda else CppExtension
    module = kind(
        name="gradvar_ext._C",
        sources=[os.path.relpath(s, HERE) for s in _build.sources(os.path.join(HERE, "csrc"), with_cuda)],
        extra_compile_args=_build.compile_args(with_cuda),
        include_dirs=_build.include_dirs() if with_cuda else [],
    )
    return [module], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


EXT_MODULES, EXT_COMMANDS = extensions()


setup(
    name="gradvar_ext",
    version="0.1.0",
    description="Fused, differentiable statistics of per-sample gradients (variance, second moment, norms) for PyTorch",
    packages=find_packages(include=["gradvar_ext", "gradvar_ext.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    ext_modules=EXT_MODULES,
    cmdclass={**EXT_COMMANDS, "build_py": BuildPyWithSources},
    zip_safe=False,
)
