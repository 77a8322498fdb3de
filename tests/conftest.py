"""Shared pytest configuration.

(The autouse fixture that cleared ``pallas_kernels.ops._kernel_forward``'s jit cache is
gone with ``ops.py``: the kernels now take their tuning, interpret mode included, as a
frozen config that is a static jit argument, so a test that runs a kernel interpreted
gets its own trace instead of swapping module functions under a shared jitted wrapper.)
"""
