import pytest


@pytest.fixture(autouse=True)
def _fresh_kernel_trace_cache():
    """Tests swap the kernel functions (interpret mode) under ``ops._kernel_forward``, a
    jitted function: drop its traces so no test reuses another test's kernels."""
    from pallas_kernels import ops

    ops._kernel_forward.clear_cache()
    yield
    ops._kernel_forward.clear_cache()
