"""After `mpnn.keep_freed_memory()`, repeated compiled calls reuse their temporary buffers'
pages (mpnn/host_memory.py)."""

import os
import subprocess
import sys

import pytest

from mpnn.host_memory import ENV_SWITCH, is_glibc

# A jitted call with a 64 MiB temporary (sin(x) feeds a dot, so it is materialised):
# prints the page faults of 5 calls after 6 warm-up calls.
SCRIPT = """
import resource
import mpnn
mpnn.keep_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w: jnp.tanh(jnp.sin(x) @ w).sum())
x, w = jnp.ones((4096, 4112), jnp.float32), jnp.ones((4112, 8), jnp.float32)
for _ in range(6):
    jax.block_until_ready(f(x, w))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    jax.block_until_ready(f(x, w))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_PER_TEMPORARY = 4096 * 4112 * 4 // 4096


def page_faults(switch: str) -> int:
    env = {**os.environ, ENV_SWITCH: switch, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or not is_glibc(), reason="glibc's malloc settings")
def test_repeated_calls_reuse_temporary_memory():
    # glibc's defaults hand the block back and fault it in again on every call; after
    # keep_freed_memory() at most an occasional call grows the heap.
    assert page_faults("1") < 2 * PAGES_PER_TEMPORARY
    assert page_faults("0") > 4 * PAGES_PER_TEMPORARY


def test_late_call_says_it_is_too_late():
    script = (
        "import jax, jax.numpy as jnp, mpnn; jnp.ones(3).block_until_ready(); "
        "print(mpnn.keep_freed_memory(), jax.config.read('jax_cpu_enable_async_dispatch'))"
    )
    env = {**os.environ, ENV_SWITCH: "1", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "after JAX's first computation changes nothing" in done.stderr
    assert done.stdout.split() == ["False", "True"]  # nothing applied
