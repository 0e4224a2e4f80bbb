"""Precision is chosen at entry points: nothing in mpnn switches JAX to 64 bits behind the
user's back. This test process has x64 on (conftest), so the float32 checks run in a
fresh Python process that never enables it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from ase.build import bulk, molecule
    import mpnn, mpnn.jaxmd
    from mpnn.config import model_config
    from mpnn.data.graphs import pad_graph

    config = model_config("nequip", cutoff=3.5, num_layers=2, num_features=4, l_max=1, num_radial=4,
                          radial_mlp=(8,), readout_mlp=4, pair_repulsion="zbl")
    potential = mpnn.build_potential(config, [1, 6, 8, 29], avg_num_neighbors=8.0)
    # One padded shape for both calls: one compilation.
    results = potential.predict([molecule("CH3CH2OH"), bulk("Cu", "fcc", a=3.61, cubic=True)], shape=(64, 512))
    assert all(np.isfinite(r["energy"]) for r in results)
    out = potential.predict_graph(pad_graph(potential.to_graph(molecule("H2O")), 64, 512, 17))
    assert out["forces"].dtype == jnp.float32, out["forces"].dtype
    system = mpnn.jaxmd.system_from_atoms(bulk("Cu", "fcc", a=3.61, cubic=True))
    assert system.positions.dtype == jnp.float32
    assert jnp.arange(3.0).dtype == jnp.float32
    # A float64 potential is refused clearly instead of silently running in 32 bits.
    try:
        mpnn.build_potential(model_config("nequip", dtype="float64"), [1])
    except mpnn.PrecisionError as e:
        assert "enable_x64" in str(e)
    else:
        raise AssertionError("float64 potential accepted without x64")
    assert not jax.config.jax_enable_x64, "something switched x64 on"
    print("ok")
    """
)


def test_float32_process_never_enables_x64():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
