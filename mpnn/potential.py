"""From a model's per-atom energies to energy, forces, stress and per-atom virials.

The model is a pure function of edge vectors. We differentiate the total energy with
respect to the edge vectors once (one backward pass) and get:

    forces   F_i = Σ_{e: send(e)=i} g_e − Σ_{e: recv(e)=i} g_e,        g_e = ∂E/∂v_e
    virial   W   = −Σ_e v_e ⊗ g_e                (eV)
    stress   σ   = −W / V = (1/V) ∂E/∂ε          (eV/Å³, ASE sign convention)
    per-atom virial: each edge's −v_e ⊗ g_e split half to each of its two atoms.

This holds for periodic cells because a strain ε maps every edge vector v → v(1+ε),
including the cell-shift part.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import ase
import jax
import jax.numpy as jnp
import jraph
import numpy as np

from mpnn.data.frames import Frame
from mpnn.data.graphs import batch_and_pad, frame_to_graph

# How often each jitted function was traced (= compiled) for a new input shape. A number
# that keeps growing in a hot loop means shapes are not bucketed.
TRACE_COUNTS: collections.Counter = collections.Counter()


def edge_vectors(positions, cell, shifts, senders, receivers, n_edge) -> jnp.ndarray:
    """v_e = r[recv] − r[send] + shift_e · cell_(graph of e), [n_edge, 3] Å."""
    edge_graph = jnp.repeat(jnp.arange(n_edge.shape[0]), n_edge, total_repeat_length=senders.shape[0])
    return positions[receivers] - positions[senders] + jnp.einsum("ei,eij->ej", shifts, cell[edge_graph])


def energy_and_derivatives(
    apply_model: Callable,
    variables: dict,
    vectors: jnp.ndarray,
    species: jnp.ndarray,
    senders: jnp.ndarray,
    receivers: jnp.ndarray,
    n_node: jnp.ndarray,
    n_edge: jnp.ndarray,
    cell: jnp.ndarray,
) -> dict[str, jnp.ndarray]:
    """Everything the potential predicts for one padded batch.

    variables: {"model": flax params, "scale": (), "shift": (), "e0": [n_species]} (eV).
    Returns energy [n_graph], node_energy [n_node], forces [n_node, 3], virial [n_graph, 3, 3],
    stress [n_graph, 3, 3] (zero where the cell has no volume), node_virial [n_node, 3, 3].
    """
    num_nodes = species.shape[0]
    num_graphs = n_node.shape[0]

    def total_energy(vectors):
        model_energy = apply_model({"params": variables["model"]}, vectors, species, senders, receivers)
        node_energy = variables["scale"] * model_energy + variables["shift"] + variables["e0"][species]
        return node_energy.sum(), node_energy

    (_, node_energy), grad = jax.value_and_grad(total_energy, has_aux=True)(vectors)
    forces = jax.ops.segment_sum(grad, senders, num_nodes) - jax.ops.segment_sum(grad, receivers, num_nodes)
    node_graph = jnp.repeat(jnp.arange(num_graphs), n_node, total_repeat_length=num_nodes)
    edge_graph = jnp.repeat(jnp.arange(num_graphs), n_edge, total_repeat_length=senders.shape[0])
    edge_virial = -jnp.einsum("ei,ej->eij", vectors, grad)
    edge_virial = 0.5 * (edge_virial + jnp.swapaxes(edge_virial, 1, 2))
    virial = jax.ops.segment_sum(edge_virial, edge_graph, num_graphs)
    node_virial = 0.5 * (
        jax.ops.segment_sum(edge_virial, senders, num_nodes) + jax.ops.segment_sum(edge_virial, receivers, num_nodes)
    )
    volume = jnp.abs(jnp.linalg.det(cell))
    has_volume = volume > 1e-12
    stress = jnp.where(has_volume[:, None, None], -virial / jnp.where(has_volume, volume, 1.0)[:, None, None], 0.0)
    return {
        "energy": jax.ops.segment_sum(node_energy, node_graph, num_graphs),
        "node_energy": node_energy,
        "forces": forces,
        "virial": virial,
        "stress": stress,
        "node_virial": node_virial,
    }


def predict_graph(apply_model: Callable, variables: dict, graph: jraph.GraphsTuple) -> dict[str, jnp.ndarray]:
    """`energy_and_derivatives` for a padded `GraphsTuple` from `mpnn.data.graphs`."""
    vectors = edge_vectors(
        graph.nodes["positions"], graph.globals["cell"], graph.edges["shifts"], graph.senders, graph.receivers, graph.n_edge
    )
    return energy_and_derivatives(
        apply_model,
        variables,
        vectors,
        graph.nodes["species"],
        graph.senders,
        graph.receivers,
        graph.n_node,
        graph.n_edge,
        graph.globals["cell"],
    )


def cast_graph(graph: jraph.GraphsTuple, dtype) -> jraph.GraphsTuple:
    """Floating arrays of a graph to `dtype` (integers untouched)."""

    def cast(x):
        x = np.asarray(x)
        return x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x

    return jax.tree_util.tree_map(cast, graph)


def cast_tree(tree, dtype):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, tree)


@dataclass
class Potential:
    """A model with its parameters and energy scaling, ready to predict.

    `numbers` lists the atomic numbers the model knows; species index k means numbers[k].
    """

    model: Any  # flax module
    variables: dict  # {"model": params, "scale", "shift", "e0"}
    numbers: tuple[int, ...]
    cutoff: float
    dtype: str = "float32"
    config: Any = None  # the resolved mpnn.config.Config it was trained with
    _jitted: Callable | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.dtype == "float64":
            jax.config.update("jax_enable_x64", True)
        self.variables = cast_tree(self.variables, self.np_dtype)

    @property
    def np_dtype(self):
        return np.float64 if self.dtype == "float64" else np.float32

    @property
    def species_index(self) -> dict[int, int]:
        return {z: k for k, z in enumerate(self.numbers)}

    def predict_graph(self, graph: jraph.GraphsTuple) -> dict[str, jnp.ndarray]:
        """Jitted prediction on a padded graph (see `mpnn.data.graphs`)."""
        if self._jitted is None:

            def predict(variables, graph):
                TRACE_COUNTS["predict_graph"] += 1  # runs only when tracing, i.e. compiling
                return predict_graph(self.model.apply, variables, graph)

            self._jitted = jax.jit(predict)
        return self._jitted(self.variables, cast_graph(graph, self.np_dtype))

    def to_graph(self, atoms: ase.Atoms | Frame) -> jraph.GraphsTuple:
        frame = atoms if isinstance(atoms, Frame) else Frame.from_atoms(atoms)
        unknown = sorted(set(frame.numbers.tolist()) - set(self.numbers))
        if unknown:
            raise ValueError(f"{frame.source}: elements {unknown} are not known to this model (knows {list(self.numbers)})")
        return frame_to_graph(frame, self.cutoff, self.species_index)

    def predict(self, structures: Sequence[ase.Atoms | Frame], batch_size: int = 16) -> list[dict[str, np.ndarray]]:
        """Energy (eV), forces (eV/Å), per-atom energies (eV), and for periodic cells
        stress (eV/Å³, ASE sign) and virial (eV), one dict per structure."""
        if isinstance(structures, (ase.Atoms, Frame)):
            structures = [structures]
        results = []
        for start in range(0, len(structures), batch_size):
            chunk = list(structures[start : start + batch_size])
            graphs = [self.to_graph(a) for a in chunk]
            # Power-of-two buckets: few distinct shapes, so few compilations across calls.
            padded = batch_and_pad(graphs, n_graph=batch_size + 1, per_doubling=1)
            out = jax.device_get(self.predict_graph(padded))
            offset = 0
            for k, (structure, graph) in enumerate(zip(chunk, graphs)):
                n = int(graph.n_node[0])
                pbc = structure.pbc
                result = {
                    "energy": float(out["energy"][k]),
                    "forces": np.asarray(out["forces"][offset : offset + n], dtype=np.float64),
                    "energies": np.asarray(out["node_energy"][offset : offset + n], dtype=np.float64),
                }
                if np.any(pbc):
                    result["stress"] = np.asarray(out["stress"][k], dtype=np.float64)
                    result["virial"] = np.asarray(out["virial"][k], dtype=np.float64)
                    result["virials"] = np.asarray(out["node_virial"][offset : offset + n], dtype=np.float64)
                results.append(result)
                offset += n
        return results


def init_potential(
    model_config,
    numbers: Sequence[int],
    avg_num_neighbors: float,
    e0: Sequence[float] | None = None,
    scale: float = 1.0,
    shift: float = 0.0,
    seed: int = 0,
    config: Any = None,
) -> Potential:
    """A freshly initialised potential for a `ModelConfig` and the elements `numbers`."""
    from mpnn.models import build_model

    numbers = tuple(int(z) for z in numbers)
    model = build_model(model_config, len(numbers), avg_num_neighbors)
    # Two atoms, one edge each way: enough to create every parameter.
    vectors = jnp.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    params = jax.jit(model.init)(
        jax.random.PRNGKey(seed), vectors, jnp.zeros(2, jnp.int32), jnp.array([0, 1]), jnp.array([1, 0])
    )["params"]
    variables = {
        "model": params,
        "scale": jnp.asarray(scale),
        "shift": jnp.asarray(shift),
        "e0": jnp.asarray(np.zeros(len(numbers)) if e0 is None else np.asarray(e0, dtype=np.float64)),
    }
    return Potential(model, variables, numbers, model_config.cutoff, model_config.dtype, config)
