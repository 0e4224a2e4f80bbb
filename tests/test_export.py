"""`python -m mpnn.export`: the serialised StableHLO function, loaded in a fresh process that
imports only JAX (no mpnn, flax or e3nn), matches the live model: energy, forces, virial,
per-atom energies and virials, for a periodic cell (with padding) and a molecule."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk, molecule

from mpnn.export import graph_inputs  # noqa: E402
from mpnn.export import main as export_main  # noqa: E402
from mpnn.saved_model import load_model, save_model  # noqa: E402
from tests.conftest import random_potential  # noqa: E402

BUCKET = (40, 1024)

# Runs in a fresh interpreter: only jax + numpy + the standard library.
CONSUMER = textwrap.dedent(
    """
    import json, sys, zipfile
    import numpy as np
    import jax  # the only non-standard import besides numpy
    jax.config.update("jax_enable_x64", True)
    archive = zipfile.ZipFile(sys.argv[1])
    manifest = json.loads(archive.read("manifest.json"))
    inputs = np.load(sys.argv[2])
    results = {}
    for case in ("cell", "molecule"):
        args = [inputs[f"{case}_{entry['name']}"] for entry in manifest["inputs"]]
        n_node, n_edge = len(args[0]), len(args[2])
        bucket = next(b for b in manifest["buckets"] if (b["n_node"], b["n_edge"]) == (n_node, n_edge))
        fn = jax.export.deserialize(bytearray(archive.read(bucket["file"])))
        outputs = fn.call(*args)
        for entry, value in zip(manifest["outputs"], outputs):
            results[f"{case}_{entry['name']}"] = np.asarray(value)
    assert not any(m == "mpnn" or m.startswith(("mpnn.", "flax", "e3nn")) for m in sys.modules), "model code imported"
    np.savez(sys.argv[3], **results)
    """
)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A tiny float64 NequIP for H, C, O, Cu with random weights (exactness does not need training)."""
    potential = random_potential([1, 6, 8, 29], [-13.6, -1030.0, -2040.0, -3.5], scale=0.7, seed=2)
    return save_model(potential, tmp_path_factory.mktemp("export") / "model")


def test_export_round_trip_in_fresh_process(saved_model, tmp_path):
    out = tmp_path / "model.mpnnx"
    # What `python -m mpnn.export` runs (in-process: the fresh process is the consumer's).
    argv = ["--model", str(saved_model), "--out", str(out), "--bucket", f"{BUCKET[0]}:{BUCKET[1]}", "--bucket", "16:256"]
    assert export_main(argv) == 0
    with zipfile.ZipFile(out) as archive:
        manifest = json.loads(archive.read("manifest.json"))
    assert [entry["name"] for entry in manifest["inputs"]] == ["positions", "species", "senders", "receivers", "shifts", "cell"]
    assert [entry["name"] for entry in manifest["outputs"]] == ["energy", "forces", "virial", "energies", "virials"]
    assert [(b["n_node"], b["n_edge"]) for b in manifest["buckets"]] == [(16, 256), BUCKET]
    assert manifest["numbers"] == [1, 6, 8, 29] and manifest["cutoff"] == 3.5 and manifest["dtype"] == "float64"
    assert manifest["buckets"][0]["platforms"] == ["cpu", "cuda"]  # portable by default

    potential = load_model(saved_model)
    cell = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)  # 32 atoms in a 40-node bucket: padding
    cell.rattle(0.1, seed=3)
    mol = molecule("CH3CH2OH")
    mol.rattle(0.1, seed=4)
    inputs = {}
    # Both fit the larger bucket (one XLA compilation in the consumer); the molecule
    # leaves most of it as padding.
    for case, atoms, bucket in (("cell", cell, BUCKET), ("molecule", mol, BUCKET)):
        for entry, value in zip(manifest["inputs"], graph_inputs(potential, atoms, *bucket)):
            inputs[f"{case}_{entry['name']}"] = value
    np.savez(tmp_path / "inputs.npz", **inputs)

    consumer = subprocess.run(
        [sys.executable, "-c", CONSUMER, str(out), str(tmp_path / "inputs.npz"), str(tmp_path / "outputs.npz")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert consumer.returncode == 0, consumer.stderr[-3000:]
    got = np.load(tmp_path / "outputs.npz")

    reference = potential.predict([cell, mol])
    for case, atoms, ref in (("cell", cell, reference[0]), ("molecule", mol, reference[1])):
        n = len(atoms)
        assert abs(got[f"{case}_energy"] - ref["energy"]) <= 1e-10 * abs(ref["energy"])
        assert np.abs(got[f"{case}_forces"][:n] - ref["forces"]).max() <= 1e-10 * np.abs(ref["forces"]).max()
        assert np.all(got[f"{case}_forces"][n:] == 0) and np.all(got[f"{case}_energies"][n:] == 0)
        assert np.abs(got[f"{case}_energies"][:n] - ref["energies"]).max() <= 1e-10 * np.abs(ref["energies"]).max()
        assert np.abs(got[f"{case}_virials"].sum(0) - got[f"{case}_virial"]).max() <= 1e-10 * np.abs(got[f"{case}_virial"]).max()
    stress = -got["cell_virial"] / cell.get_volume()
    assert np.abs(stress - reference[0]["stress"]).max() <= 1e-10 * np.abs(reference[0]["stress"]).max()
    assert np.abs(got["cell_virials"][: len(cell)] - reference[0]["virials"]).max() <= 1e-10 * np.abs(reference[0]["virials"]).max()
