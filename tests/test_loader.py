"""Loading: prebuilt module, just-in-time build, and the reference fallback with one warning.

Each scenario runs in a fresh interpreter, since ops are registered once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import gradvar_ext
from gradvar_ext import _loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prints a JSON summary: backend, warnings raised at import, and checks of the loaded ops.
PROBE = textwrap.dedent(
    """
    import json, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch, gradvar_ext
        from gradvar_ext import reference
    torch.manual_seed(0)
    x = torch.randn(5, 2, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    loop = torch.stack([g[n].T @ x[n] for n in range(5)])  # per-sample gradients, by hand
    var = torch.ops.gradvar.linear_variance(x, g)
    try:
        torch.ops.gradvar.linear_variance(x[0, 0], g)
        error = None
    except ValueError as e:
        error = str(e)
    print(json.dumps({
        "backend": gradvar_ext.backend(),
        "warnings": [str(w.message) for w in caught if "gradvar_ext" in str(w.message)],
        "variance_matches_loop": torch.allclose(var, loop.var(0, unbiased=False)),
        "gradgradcheck": torch.autograd.gradgradcheck(torch.ops.gradvar.linear_variance, (x, g)),
        "error": error,
    }))
    """
)


def run_probe(env_updates: dict, timeout: float = 600) -> tuple[dict, str]:
    env = dict(os.environ, **env_updates)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr


def test_forced_reference_backend_computes_the_same_numbers():
    result, _ = run_probe({"GRADVAR_EXT_BACKEND": "reference"})
    assert result["backend"] == "reference"
    assert result["variance_matches_loop"] and result["gradgradcheck"]
    assert "gradvar.linear_variance: input must have shape" in result["error"]


def test_build_failure_falls_back_with_exactly_one_warning(tmp_path):
    # A compiler that always fails: the JIT build breaks, the package must still work.
    result, _ = run_probe(
        {
            "GRADVAR_EXT_BACKEND": "jit",
            "GRADVAR_EXT_NO_CUDA": "1",
            "CXX": "false",
            "GRADVAR_EXT_BUILD_DIR": str(tmp_path),
        }
    )
    assert result["backend"] == "reference"
    assert len(result["warnings"]) == 1, result["warnings"]
    assert "pure-torch reference" in result["warnings"][0]
    assert result["variance_matches_loop"] and result["gradgradcheck"]


def test_jit_build_from_source_checkout(tmp_path):
    """The just-in-time path: compiles csrc/ (C++ only, to keep it short) into a fresh cache directory."""
    env = {
        "GRADVAR_EXT_BACKEND": "jit",
        "GRADVAR_EXT_NO_CUDA": "1",
        "GRADVAR_EXT_BUILD_DIR": str(tmp_path),
        "MAX_JOBS": "2",
    }
    result, output = run_probe(env, timeout=900)
    assert result["backend"] == "jit"
    assert result["warnings"] == []
    assert "compiling the C++ kernels" in output
    assert result["variance_matches_loop"] and result["gradgradcheck"]
    assert "gradvar.linear_variance: input must have shape" in result["error"]
    # Second import: cached, no compile message.
    result, output = run_probe(env)
    assert result["backend"] == "jit" and "compiling" not in output


def test_invalid_backend_setting_is_rejected():
    env = dict(os.environ, GRADVAR_EXT_BACKEND="cuda-please", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", "import gradvar_ext"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "GRADVAR_EXT_BACKEND must be 'reference' or 'jit'" in proc.stderr


@pytest.mark.skipif(gradvar_ext.backend() == "reference", reason="compiled schemas needed")
def test_fallback_schemas_match_the_compiled_ones():
    for name, schema in _loader.SCHEMAS.items():
        assert str(getattr(torch.ops.gradvar, name).default._schema) == f"gradvar::{name}{schema}"


def test_this_test_session_uses_compiled_kernels():
    """The suite must exercise the kernels, not silently the fallback (set GRADVAR_EXT_BACKEND to opt out)."""
    if os.environ.get("GRADVAR_EXT_BACKEND") == "reference":
        pytest.skip("reference backend requested")
    assert gradvar_ext.backend() in ("prebuilt", "jit")
