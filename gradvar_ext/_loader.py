"""Makes the ``torch.ops.gradvar`` ops exist, by the best means available.

Order: (1) the module ``setup.py`` built into the package (``gradvar_ext/_C*.so``);
(2) a just-in-time build of ``csrc/`` with ``torch.utils.cpp_extension.load`` + ninja into a
cache directory; (3) the pure-torch reference implementations registered as the kernels of
the same ops, with one warning. ``GRADVAR_EXT_BACKEND`` = ``reference`` | ``jit`` forces (3)
or (2); ``GRADVAR_EXT_BUILD_DIR`` sets the JIT cache directory.
"""

from __future__ import annotations

import glob
import os
import warnings

import torch

from . import _build, reference

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

_CONV = "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int groups"
# Same schemas as csrc/torch_bindings.cpp (a test checks they agree); used only by the fallback.
SCHEMAS = {
    "linear_second_moment": "(Tensor input, Tensor grad_output) -> Tensor",
    "linear_variance": "(Tensor input, Tensor grad_output) -> Tensor",
    "linear_batch_l2": "(Tensor input, Tensor grad_output) -> Tensor",
    "linear_moments": "(Tensor input, Tensor grad_output) -> (Tensor, Tensor)",
    "linear_cross_moment": "(Tensor input, Tensor grad_output, Tensor other_input, Tensor other_grad_output) -> Tensor",
    "weighted_gradient_product": "(Tensor left, Tensor input, Tensor grad_output, Tensor weight, "
    "Tensor? center=None) -> Tensor",
    "weighted_gradient_products": "(Tensor left_grad_output, Tensor left_input, Tensor input, Tensor grad_output, "
    "Tensor weight, Tensor? center) -> (Tensor, Tensor)",
    **{
        f"conv2d_{stat}": f"(Tensor input, Tensor grad_output, {_CONV}) -> Tensor"
        for stat in ("second_moment", "variance", "batch_l2")
    },
    "conv2d_moments": f"(Tensor input, Tensor grad_output, {_CONV}) -> (Tensor, Tensor)",
    "conv2d_cross_moment": "(Tensor input, Tensor grad_output, Tensor other_input, Tensor other_grad_output, "
    f"{_CONV}) -> Tensor",
    "conv2d_weighted_gradient_product": "(Tensor left, Tensor input, Tensor grad_output, Tensor weight, "
    f"{_CONV}, bool to_input, Tensor? center=None) -> Tensor",
    "conv2d_weighted_gradient_products": "(Tensor left_grad_output, Tensor left_input, Tensor input, "
    f"Tensor grad_output, Tensor weight, Tensor? center, {_CONV}) -> (Tensor, Tensor)",
}

_state: dict[str, object] = {"backend": None, "reason": None, "library": None}


def csrc_dir() -> str | None:
    """The C++/CUDA sources: inside an installed package, or beside it in a source checkout."""
    for candidate in (os.path.join(_PACKAGE_DIR, "_csrc"), os.path.join(os.path.dirname(_PACKAGE_DIR), "csrc")):
        if os.path.exists(os.path.join(candidate, "torch_bindings.cpp")):
            return candidate
    return None


def _load_prebuilt() -> bool:
    built = sorted(glob.glob(os.path.join(_PACKAGE_DIR, "_C*.so")) + glob.glob(os.path.join(_PACKAGE_DIR, "_C*.pyd")))
    if not built:
        return False
    torch.ops.load_library(built[0])
    return True


def _load_jit() -> None:
    src = csrc_dir()
    if src is None:
        raise RuntimeError("no C++ sources found next to the package (csrc/ or gradvar_ext/_csrc/)")
    _build.prepare_cuda_environment()
    from torch.utils import cpp_extension  # after prepare_cuda_environment: it reads CUDA_HOME at import

    with_cuda = _build.want_cuda()
    name = "gradvar_ext_jit_cuda" if with_cuda else "gradvar_ext_jit_cpu"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    build_dir = os.environ.get("GRADVAR_EXT_BUILD_DIR") or os.path.join(
        cache, "gradvar_ext", f"torch-{torch.__version__}", name
    )
    os.makedirs(build_dir, exist_ok=True)
    if not os.path.exists(os.path.join(build_dir, f"{name}.so")):
        print(
            f"gradvar_ext: compiling the C++{'/CUDA' if with_cuda else ''} kernels into {build_dir} (first import only)"
        )
    args = _build.compile_args(with_cuda)
    cpp_extension.load(
        name=name,
        sources=_build.sources(src, with_cuda),
        extra_cflags=args["cxx"],
        extra_cuda_cflags=args.get("nvcc"),
        extra_include_paths=_build.include_dirs() if with_cuda else None,
        build_directory=build_dir,
        with_cuda=with_cuda,
        is_python_module=False,
    )


def _register_reference() -> None:
    library = torch.library.Library("gradvar", "DEF")
    for name, schema in SCHEMAS.items():
        library.define(name + schema)
        for key in ("CPU", "CUDA"):
            library.impl(name, reference.OPS[name], key)
    _state["library"] = library  # the registrations live as long as this object


def load() -> str:
    """Load the ops once; return the active backend: 'prebuilt', 'jit' or 'reference'."""
    if _state["backend"] is not None:
        return _state["backend"]  # type: ignore[return-value]
    forced = os.environ.get("GRADVAR_EXT_BACKEND", "").strip().lower()
    if forced not in ("", "reference", "jit"):
        raise ValueError(f"GRADVAR_EXT_BACKEND must be 'reference' or 'jit' (or unset), got {forced!r}")
    backend, reason = "reference", "forced by GRADVAR_EXT_BACKEND=reference"
    if forced != "reference":
        try:
            if forced != "jit" and _load_prebuilt():
                backend, reason = "prebuilt", None
            else:
                _load_jit()
                backend, reason = "jit", None
        except Exception as error:  # no compiler, build error, ABI mismatch: fall back, loudly
            reason = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
            warnings.warn(
                "gradvar_ext: the compiled kernels could not be built or loaded, so the pure-torch reference "
                f"implementations (which materialise per-sample gradients: slow, O(N*out*in) memory) are used. "
                f"Cause: {reason}",
                RuntimeWarning,
                stacklevel=3,
            )
    if backend == "reference":
        _register_reference()
    _state["backend"], _state["reason"] = backend, reason
    return backend


def backend() -> str:
    """The active kernels: 'prebuilt' (built by setup.py), 'jit' (compiled at import) or 'reference'."""
    return load()
