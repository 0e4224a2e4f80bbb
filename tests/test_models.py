"""The lower rungs of the ladder and Allegro, beyond the shared physics battery
(tests/test_physics.py runs that on every registered model):

- BPNN's symmetry functions equal a plain loop over neighbor triplets (Behler's G2/G5
  formulas), with both cutoff functions; its standardisation uses training statistics;
- receptive fields: Allegro and BPNN are strictly local (an atom's energy ignores atoms
  beyond its own cutoff), message-passing models see layers × cutoff;
- each new model trains through the training loop, saves, loads, and gives the same
  energies and forces through `Potential.predict` (the ASE path) and jax-md.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import ase
import ase.io
import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk, molecule

import mpnn
from mpnn.data.frames import Frame
from mpnn.data.graphs import frame_to_graph
from mpnn.models import bpnn
from mpnn.models.nequip import gated_irreps, hidden_irreps
from mpnn.potential import build_potential, cast_graph, edge_vectors
from mpnn.training.loop import train
from tests.conftest import tiny_model_config, tiny_train_config

NUMBERS = [1, 6, 8, 29]


def brute_force_symmetry_functions(positions, senders, receivers, vectors, species, n_species, module) -> np.ndarray:
    """Behler's G2 and G5 by explicit loops over neighbors and neighbor pairs (numpy)."""

    def fc(r):
        if module.cutoff_function == "cosine":
            return 0.5 * (math.cos(math.pi * r / module.cutoff) + 1.0) if r < module.cutoff else 0.0
        x, p = r / module.cutoff, module.envelope_p
        return 1 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2) if x < 1 else 0.0

    pairs = [(a, b) for a in range(n_species) for b in range(a, n_species)]
    out = []
    for i in range(len(positions)):
        edges = [e for e in range(len(senders)) if receivers[e] == i]
        g2 = np.zeros((n_species, len(module.radial_etas)))
        for e in edges:
            r = np.linalg.norm(vectors[e])
            for k, (eta, rs) in enumerate(zip(module.radial_etas, module.radial_shifts)):
                g2[species[senders[e]], k] += math.exp(-eta * (r - rs) ** 2) * fc(r)
        g5 = np.zeros((len(pairs), len(module.angular_etas), len(module.zetas) * len(module.lambdas)))
        for e in edges:
            for f in edges:
                if e == f:
                    continue
                a, b = species[senders[e]], species[senders[f]]
                if a > b:
                    continue  # channel (a, b), a ≤ b: pairs with j ∈ a, k ∈ b
                rij, rik = np.linalg.norm(vectors[e]), np.linalg.norm(vectors[f])
                cos = vectors[e] @ vectors[f] / (rij * rik)
                for m, eta in enumerate(module.angular_etas):
                    radial = math.exp(-eta * (rij**2 + rik**2)) * fc(rij) * fc(rik)
                    z = 0
                    for zeta in module.zetas:
                        for lam in module.lambdas:
                            g5[pairs.index((a, b)), m, z] += 2 ** (1 - zeta) * (1 + lam * cos) ** zeta * radial
                            z += 1
        out.append(np.concatenate([g2.ravel(), g5.ravel()]))
    return np.array(out)


@pytest.mark.parametrize("cutoff_function", ["polynomial", "cosine"])
def test_symmetry_functions_match_a_triplet_loop(cutoff_function):
    config = tiny_model_config("bpnn", zetas=(1, 2, 4), cutoff_function=cutoff_function)
    module = bpnn.build(config, len(NUMBERS), 1.0)
    cell = bulk("CuO", "rocksalt", a=4.3).repeat((1, 1, 2))  # lattice vectors < cutoff: self-images
    cell.rattle(0.1, seed=1)
    mol = molecule("CH3CH2OH")
    mol.rattle(0.05, seed=2)
    for atoms in (mol, cell):
        graph = frame_to_graph(Frame.from_atoms(atoms), config.cutoff, {z: k for k, z in enumerate(NUMBERS)})
        vectors = np.asarray(
            edge_vectors(
                jnp.asarray(graph.nodes["positions"]), jnp.asarray(graph.globals["cell"]), jnp.asarray(graph.edges["shifts"]),
                graph.senders, graph.receivers, graph.n_edge,
            )
        )
        species = graph.nodes["species"]
        ours = bpnn.symmetry_functions(
            vectors, graph.edges["mask"], species[graph.senders], graph.receivers, len(species), len(NUMBERS),
            module.cutoff, module.radial_shifts, module.radial_etas, module.angular_etas, module.zetas, module.lambdas,
            module.cutoff_function, module.envelope_p,
        )
        reference = brute_force_symmetry_functions(
            graph.nodes["positions"], graph.senders, graph.receivers, vectors, species, len(NUMBERS), module
        )
        assert np.abs(reference).max() > 0.1
        np.testing.assert_allclose(np.asarray(ours), reference, rtol=1e-9, atol=1e-11)


def test_default_grids_follow_imbalzano():
    shifts, etas = bpnn.shifted_grid(5.0, 4)
    # r_s = r_c / n^(k/n) for k = 1..n, ascending; η from neighbouring spacings.
    assert np.allclose(shifts, [5.0 / 4, 5.0 / 4**0.75, 5.0 / 4**0.5, 5.0 / 4**0.25])
    assert np.allclose(etas[-1], 1.0 / (5.0 - 5.0 / 4**0.25) ** 2)
    _, centered = bpnn.centered_grid(5.0, 3)
    assert np.allclose(centered, [(1 / 5.0) ** 2, (2**0.5 / 5.0) ** 2, (2 / 5.0) ** 2])


def test_bpnn_standardises_with_training_statistics(cu_file):
    frames = [Frame.from_atoms(a) for a in ase.io.read(cu_file, index=":8")]
    config = tiny_model_config("bpnn")
    potential = build_potential(config, [29], avg_num_neighbors=8.0, seed=0)
    graphs = [frame_to_graph(f, config.cutoff, {29: 0}) for f in frames]
    params = bpnn.fit_statistics(potential.model, potential.variables["model"], graphs, batch_size=3)
    g = np.concatenate([np.asarray(bpnn.graph_descriptors(potential.model, params, cast_graph(x, np.float64))) for x in graphs])
    standardised = (g - np.asarray(params["descriptor_mean"][0])) * np.asarray(params["descriptor_inv_std"][0])
    varying = g.std(0) > 1e-6
    assert varying.sum() > 5
    assert np.abs(standardised.mean(0)).max() < 1e-8
    assert np.allclose(standardised[:, varying].std(0), 1.0, atol=1e-8)
    # Cu-only data: channels of absent elements stay at mean 0, scale 1 (nothing to standardise).
    assert np.all(np.asarray(params["descriptor_inv_std"])[0, ~varying] == 1.0)


@pytest.mark.parametrize("name", ["allegro", "bpnn", "schnet", "nequip"])
def test_receptive_field(name):
    """A chain O–Cu ... Cu–H: the H atom is within the cutoff of the middle Cu only.
    Moving it changes the O atom's energy through messages (2 layers) but never in a
    strictly local model (Allegro, BPNN)."""
    potential = build_potential(tiny_model_config(name), NUMBERS, avg_num_neighbors=2.0, seed=3)
    cutoff = potential.cutoff
    chains = []
    for dy in (0.0, 0.3):
        chains.append(
            ase.Atoms("OCuH", positions=[[0, 0, 0], [0.8 * cutoff, 0, 0], [1.6 * cutoff, dy, 0]])
        )
    a, b = potential.predict(chains)
    change = abs(a["energies"][0] - b["energies"][0])
    assert abs(a["energies"][1] - b["energies"][1]) > 1e-6  # the middle atom sees H
    if name in ("allegro", "bpnn"):
        assert change == 0.0
    else:
        assert change > 1e-8


@pytest.mark.parametrize("l_max", [1, 2])
@pytest.mark.parametrize("parity", [False, True])
def test_nequip_gate_gives_the_hidden_irreps(l_max, parity):
    """Each NequIP layer ends in a gate: its output must carry the hidden irreps the
    config asks for (with parity: 0o and 1e pseudo-tensors too), which holds only if the
    gates are the last, even scalars of the gate's input."""
    hidden = hidden_irreps(4, l_max, parity)
    gated = e3nn.gate(e3nn.normal(gated_irreps(hidden), jax.random.PRNGKey(0), (3,)))
    assert gated.irreps == hidden


@pytest.fixture(scope="module", params=["bpnn", "schnet", "allegro"])
def trained(request, cu_file, tmp_path_factory):
    """A few epochs of each new model through the training loop (in-process), float32."""
    run_dir = tmp_path_factory.mktemp(f"run_{request.param}") / "run"
    config = tiny_train_config(cu_file, run_dir, **{"train.max_epochs": 4, "data.max_frames": 24})
    smaller = {"l_max": 1} if request.param == "allegro" else {}  # its l ≤ 2 train step compiles for a minute
    config = dataclasses.replace(config, model=tiny_model_config(request.param, "float32", **smaller))
    results = train(config)
    return request.param, run_dir, results


def test_new_models_train_and_run_everywhere(trained, cu_file):
    name, run_dir, results = trained
    history = list(csv.DictReader(open(run_dir / "metrics.csv")))
    first, last = float(history[0]["valid_forces_mae_mev_A"]), float(history[-1]["valid_forces_mae_mev_A"])
    assert last < first  # it learns
    assert json.loads((run_dir / "results.json").read_text())["test"]["n_frames"] == 3
    potential = mpnn.load(run_dir / "model")
    assert potential.config.model.name == name
    if name == "bpnn":  # training statistics were fitted and saved with the model
        assert float(np.abs(np.asarray(potential.variables["model"]["descriptor_mean"])).max()) > 0
    atoms = ase.io.read(cu_file, index=3)
    predicted = potential.predict([atoms])[0]  # the ASE calculator's path (tests/test_training.py)
    import mpnn.jaxmd as J

    system = J.system_from_atoms(atoms)
    nbrs = J.neighbor_list(potential, system.displacement_fn, system.box).allocate(system.positions)
    energy = J.energy_fn(potential, system.displacement_fn, system.numbers, box=system.box)
    e, g = jax.jit(jax.value_and_grad(lambda R: energy(R, neighbor=nbrs)))(system.positions)
    assert float(e) == pytest.approx(predicted["energy"], rel=1e-5)
    assert np.allclose(system.to_original_frame(-np.asarray(g)), predicted["forces"], atol=1e-4)
