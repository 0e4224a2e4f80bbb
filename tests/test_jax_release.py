"""Guard against a known-bad JAX release: CI fails if the installed JAX miscompiles on CPU.

jax/jaxlib 0.10.2 (JAX issue 39103) return wrong values on CPU for ``jit`` of a vmapped
matrix-vector product followed by a reduction, once there are ~16k rows: the last row's
``sum((M @ row) ** 2)`` comes out as 266342400 instead of 2**28 = 268435456 (float64,
16385 rows). Eager evaluation and 0.10.1 are correct. pyproject.toml excludes 0.10.2; this
test catches the bug if that release (or a later one with the same miscompile) is installed.

Both dtypes are run explicitly: float32 at 32769 rows and float64 at 16385 rows (inside
``jax.enable_x64``), so the check does not depend on the session's x64 setting.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def _rowwise_sq_norm(x, matrix):
    return jax.vmap(lambda row: jnp.sum((matrix @ row) ** 2))(x)


@pytest.mark.parametrize("dtype, n_rows", [(np.float32, 32_769), (np.float64, 16_385)])
def test_jit_vmap_matvec_reduction_matches_eager(dtype, n_rows):
    with jax.enable_x64(dtype == np.float64):
        cpu = jax.devices("cpu")[0]  # the miscompile is in XLA:CPU
        i = np.arange(n_rows, dtype=dtype)
        x = jax.device_put(np.stack((i, np.zeros_like(i), np.zeros_like(i)), axis=1), cpu)
        matrix = jax.device_put(np.eye(3, dtype=dtype), cpu)
        assert x.dtype == dtype

        expected = i * i  # exact in float64; correctly rounded (as XLA computes it) in float32
        eager = np.asarray(_rowwise_sq_norm(x, matrix))
        jitted = np.asarray(jax.jit(_rowwise_sq_norm)(x, matrix))

    np.testing.assert_array_equal(eager, expected)
    np.testing.assert_array_equal(
        jitted, expected,
        err_msg=f"jax {jax.__version__}: jit(vmap(matvec)+sum) is wrong on CPU (JAX issue 39103)",
    )
