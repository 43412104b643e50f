"""Build settings shared by ``setup.py`` (ahead of time) and the just-in-time loader.

Importable on its own (no package-relative imports), so ``setup.py`` can load it by path.
"""

from __future__ import annotations

import glob
import os
import shutil

# Ampere and Hopper machine code, and Hopper PTX that the driver compiles for newer GPUs on first
# use (without it their first CUDA op fails: no kernel image); TORCH_CUDA_ARCH_LIST overrides.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def prepare_cuda_environment() -> None:
    """Fix what torch's auto-detection gets wrong on a machine without a GPU.

    Must run before ``torch.utils.cpp_extension`` is imported: it reads CUDA_HOME at import.
    """
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        nvcc = shutil.which("nvcc")
        if os.path.exists("/usr/local/cuda/bin/nvcc"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"
        elif nvcc:
            os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)


def want_cuda() -> bool:
    """Compile the .cu kernels: torch is a CUDA build, nvcc exists, GRADVAR_EXT_NO_CUDA unset."""
    import torch

    if os.environ.get("GRADVAR_EXT_NO_CUDA", "") not in ("", "0"):
        return False
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return torch.version.cuda is not None and bool(home) and os.path.exists(os.path.join(home, "bin", "nvcc"))


def sources(csrc_dir: str, with_cuda: bool) -> list[str]:
    found = sorted(glob.glob(os.path.join(csrc_dir, "*.cpp")) + glob.glob(os.path.join(csrc_dir, "cpu", "*.cpp")))
    if with_cuda:
        found += sorted(glob.glob(os.path.join(csrc_dir, "cuda", "*.cu")))
    return found


def compile_args(with_cuda: bool) -> dict[str, list[str]]:
    cxx = ["-O3"]
    if not with_cuda:
        return {"cxx": cxx}
    return {"cxx": cxx + ["-DGRADVAR_WITH_CUDA"], "nvcc": ["-O3", "-DGRADVAR_WITH_CUDA"]}


def include_dirs() -> list[str]:
    """nvidia/cu13/include from the torch wheel's CUDA packages, when present (cusparse.h etc.)."""
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    return [d for d in glob.glob(os.path.join(site, "nvidia", "cu*", "include")) if os.path.isdir(d)]
