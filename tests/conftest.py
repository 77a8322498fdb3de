"""Shared pytest configuration.

One persistent JAX compilation cache for the whole run, shared by the xdist workers (and the
subprocesses some tests start): the tests build the same tiny models many times, through
fresh closures each time, and identical programs then compile once.  The directory is new for
every run (nothing carries over between runs, so timings and results stay those of a clean
state) and removed at the end.  ``JAXDQ_TEST_JIT_CACHE=0`` turns it off.

(The autouse fixture that cleared ``pallas_kernels.ops._kernel_forward``'s jit cache is
gone with ``ops.py``: the kernels now take their tuning, interpret mode included, as a
frozen config that is a static jit argument, so a test that runs a kernel interpreted
gets its own trace instead of swapping module functions under a shared jitted wrapper.)
"""
import os
import shutil
import tempfile

_ENV = "JAXDQ_TEST_JIT_CACHE_DIR"


def pytest_configure(config):
    if os.environ.get("JAXDQ_TEST_JIT_CACHE", "1") == "0":
        return
    if _ENV not in os.environ:  # the controller (or a run without xdist): make it; workers inherit it
        os.environ[_ENV] = tempfile.mkdtemp(prefix="jaxdq-test-jit-cache-")
        config._jaxdq_jit_cache_owner = True
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ[_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    if getattr(config, "_jaxdq_jit_cache_owner", False):
        shutil.rmtree(os.environ.pop(_ENV), ignore_errors=True)
