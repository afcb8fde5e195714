"""jaxtl.core.compiler: a model's programs on a CPU run convolutions through XLA's own kernels, not YNNPACK's."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from jaxtl.core import compiler
from tests.conftest import REPO, SUITE_XLA, suite_xla_options, xla_accepts


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.fixture
def fresh_options():
    compiler._options.cache_clear()
    yield
    compiler._options.cache_clear()


def _operands():
    rng = np.random.default_rng(0)
    return rng.normal(size=(2, 16, 16, 32)).astype(np.float32), rng.normal(size=(3, 3, 32, 32)).astype(np.float32)


def test_cpu_convolutions_leave_ynnpack_and_give_the_same_numbers(fresh_options, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    x, w = _operands()
    assert compiler.compiler_options() == compiler.CPU_OPTIONS
    ours = compiler.jit(_conv).lower(x, w).compile()
    assert "__ynn_fusion" in jax.jit(_conv).lower(x, w).compile().as_text()  # XLA's default: a YNNPACK fusion
    assert "__ynn_fusion" not in ours.as_text()  # jaxtl's: XLA's own convolution
    np.testing.assert_allclose(np.asarray(ours(x, w)), np.asarray(jax.jit(_conv)(x, w)), rtol=1e-5, atol=1e-4)


def test_xla_flags_that_set_the_fusions_win(fresh_options, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", f"--{compiler.FUSIONS}=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION")
    assert compiler.compiler_options() is None


def test_a_jaxlib_without_the_option_compiles_with_defaults(fresh_options, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setattr(compiler, "CPU_OPTIONS", {"xla_cpu_no_such_option_in_any_jaxlib": "1"})
    assert compiler.compiler_options() is None
    x, w = _operands()
    np.testing.assert_allclose(np.asarray(compiler.jit(_conv)(x, w)), np.asarray(jax.jit(_conv)(x, w)), rtol=1e-6)


LEVEL = "xla_backend_optimization_level"
_suite_level_0 = pytest.mark.skipif(suite_xla_options().get(LEVEL) != "0",
                                    reason="XLA_FLAGS set the optimisation level before the tests")


def test_the_suite_compiles_with_its_xla_options():
    """tests/conftest.py: the session's XLA_FLAGS carry the suite's options (and so the processes tests start); jaxtl's
    compiler options leave them alone."""
    for name, value in suite_xla_options().items():
        assert f"--{name}={value}" in os.environ["XLA_FLAGS"] and name not in (compiler.compiler_options() or {})


@pytest.mark.optimized
def test_an_optimized_test_compiles_with_xla_s_defaults_and_starts_processes_without_the_suite_s_options():
    suite = suite_xla_options()
    options = compiler.compiler_options() or {}
    assert {name: options.get(name) for name in suite} == {name: SUITE_XLA[name][1] for name in suite}
    assert not any(name in os.environ.get("XLA_FLAGS", "") for name in suite)


@pytest.mark.slow
def test_an_option_this_jaxlib_does_not_know_is_left_out():
    assert not xla_accepts("--xla_cpu_no_such_option_in_any_jaxlib=false")


def _gelu_levels():
    """GELU on a fixed input compiled with this process's backend default, and at levels 0 and 3 (its FMA
    contraction rounds differently at the two levels)."""
    x = np.random.default_rng(0).normal(size=(64, 257)).astype(np.float32)
    compiled = {level: np.asarray(jax.jit(jax.nn.gelu).lower(x).compile({LEVEL: level})(x)) for level in (0, 3)}
    return np.asarray(jax.jit(jax.nn.gelu)(x)), compiled


@_suite_level_0
@pytest.mark.optimized
def test_an_optimized_test_that_starts_the_backend_leaves_it_at_level_0():
    """The first of a pair run in order by the test below: JAX's backend started inside an optimized test."""
    _, compiled = _gelu_levels()
    assert not np.array_equal(compiled[0], compiled[3])  # the check below can tell the levels apart


@_suite_level_0
def test_this_process_compiles_at_level_0_whichever_test_started_the_backend():
    default, compiled = _gelu_levels()
    np.testing.assert_array_equal(default, compiled[0])


@_suite_level_0
@pytest.mark.slow
def test_a_backend_started_in_an_optimized_test_still_compiles_at_level_0(tmp_path):
    """In a process whose first JAX computation is an optimized test's, later tests compile at the suite's level
    (a run trained here and resumed in another process must match the uninterrupted one bit for bit)."""
    import subprocess
    import sys

    tests = [f"{__file__}::{name}" for name in ("test_an_optimized_test_that_starts_the_backend_leaves_it_at_level_0",
                                                "test_this_process_compiles_at_level_0_whichever_test_started_the_backend")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "JAXTL_TESTS_"))}
    env["XLA_FLAGS"] = os.environ.get("JAXTL_TESTS_USER_XLA_FLAGS", "")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])  # `tests.conftest`
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *tests],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0 and "2 passed" in result.stdout, result.stdout[-3000:]
