"""The total energy, made of terms, and everything derived from it.

    E = Σ_i [scale · ε_i + shift + E0(Z_i)]      learned local model, per atom
      + Σ_(i,j) V_pair(r_ij)                      pair terms on edges (ZBL repulsion)
      + Σ_k E_k(positions, cell, per-atom outputs) global terms (electrostatics of learned charges)

This module is the one place that formula lives: training, evaluation, the ASE
calculator, jax-md and export all call `graph_energies` / `energy_and_derivatives`.

Derivatives come from one backward pass. Local and pair terms are functions of the edge
vectors v_e = r[recv] − r[send] + shift_e·cell; with g_e = ∂E/∂v_e

    forces   F_i = Σ_{e: send(e)=i} g_e − Σ_{e: recv(e)=i} g_e
    virial   W   = −Σ_e v_e ⊗ g_e                 (eV)
    per-atom virial: each edge's −v_e ⊗ g_e split half to each of its two atoms.

This holds for periodic cells because a strain ε maps every edge vector v → v(1+ε),
including the cell-shift part. A global term is not a function of edge vectors alone,
so it sees positions and cells under a strain ε (r → r(1+ε), cell → cell(1+ε)) and
adds −∂E/∂r to the forces and −∂E/∂ε to the virial; its per-atom energies are whatever
the term defines, and per-atom virials cover local and pair terms only.

    stress   σ = −W / V = (1/V) ∂E/∂ε             (eV/Å³, ASE sign convention)

Padding is explicit: graphs carry `nodes["mask"]` and `edges["mask"]` (False = padding),
and every term uses them; nothing relies on padding edges having zero length.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import ase
import jax
import jax.numpy as jnp
import jraph
import numpy as np

from mpnn.data.frames import Frame
from mpnn.data.graphs import batch_and_pad, frame_to_graph, pad_graph
from mpnn.nn.radial import masked_edge_vectors, safe_norm

# A cell with a smaller |det| (Å³) has no volume (molecules: zeros): no stress.
MIN_CELL_VOLUME = 1e-12


class CountedJit:
    """`jax.jit(fun)` that counts its traces in `n_compiles` (a trace happens exactly when
    XLA compiles for a new input shape or dtype). A number that keeps growing in a hot loop
    means shapes are not bucketed."""

    def __init__(self, fun: Callable, **jit_kwargs):
        self.n_compiles = 0

        @functools.wraps(fun)
        def traced(*args, **kwargs):
            self.n_compiles += 1  # runs only while tracing
            return fun(*args, **kwargs)

        self._jitted = jax.jit(traced, **jit_kwargs)

    def __call__(self, *args, **kwargs):
        return self._jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._jitted.lower(*args, **kwargs)


class PrecisionError(RuntimeError):
    """A float64 potential in a process where JAX runs in 32 bits."""


def enable_x64() -> None:
    """Switch JAX to 64-bit floats for this process. Call it once, at the start of a
    program that uses float64 potentials (the command-line tools do it for
    `model.dtype: float64`); mpnn never switches it behind your back."""
    jax.config.update("jax_enable_x64", True)


# --- energy terms -----------------------------------------------------------------------


class PairTerm(Protocol):
    """A pair potential on the edges of the neighbor list (e.g. `mpnn.terms.zbl.ZBLRepulsion`)."""

    def edge_energies(self, lengths, z_senders, z_receivers, edge_mask) -> jnp.ndarray:
        """lengths [n_edge] Å (padding edges hold a safe dummy length), atomic numbers of
        both ends [n_edge], edge_mask [n_edge] → eV per directed edge [n_edge], zero on
        padding edges; the two directions of a pair sum to its pair energy."""


class GlobalTerm(Protocol):
    """An energy term of whole frames (e.g. `mpnn.terms.electrostatics.Electrostatics`)."""

    def __call__(self, positions, cell, numbers, node_mask, node_graph, n_graph, node_outputs, total_charge) -> dict:
        """positions [n_node, 3] Å, cell [n_graph, 3, 3] Å (rows; zeros where not
        periodic), atomic numbers [n_node], node_mask [n_node], node_graph [n_node] (frame
        of each node), n_graph (static int), node_outputs (dict of per-atom model outputs
        besides the energy, e.g. "charge"), total_charge [n_graph] e
        → {"energy": [n_graph] eV, "node_energy": [n_node] eV or None, and any other
        per-atom or per-frame results it wants reported (e.g. "charges", "dipole")}.
        Must be differentiable in positions, cell and node_outputs. A term with a
        `covering(cells)` method is given the chance to adapt static sizes to the cells
        it will see (on the host, before tracing)."""


def init_model_params(model, seed: int = 0) -> dict:
    """Fresh parameters of a model module (flax params). Two atoms with one edge each way
    create every parameter; `jax.eval_shape(init_model_params, model)` gives the shapes
    without compiling anything."""
    vectors = jnp.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    species, senders, receivers, edge_mask = jnp.zeros(2, jnp.int32), jnp.array([0, 1]), jnp.array([1, 0]), jnp.ones(2, bool)
    return model.init(jax.random.PRNGKey(seed), vectors, species, senders, receivers, edge_mask)["params"]


def one_graph(
    positions, species, node_mask, senders, receivers, edge_mask, cell, shifts=None, total_charge=0.0
) -> jraph.GraphsTuple:
    """One structure as the (traceable) graph `energy_and_derivatives` takes: cell [3, 3]
    (zeros without periodicity), shifts [n_edge, 3] (zeros when the edge vectors are given),
    total_charge in e."""
    shifts = jnp.zeros((senders.shape[0], 3), positions.dtype) if shifts is None else shifts
    return jraph.GraphsTuple(
        nodes={"positions": positions, "species": species, "mask": node_mask},
        edges={"shifts": shifts, "mask": edge_mask},
        globals={"cell": cell[None], "charge": jnp.reshape(jnp.asarray(total_charge, positions.dtype), (1,))},
        senders=senders,
        receivers=receivers,
        n_node=jnp.array([species.shape[0]]),
        n_edge=jnp.array([senders.shape[0]]),
    )


def edge_vectors(positions, cell, shifts, senders, receivers, n_edge) -> jnp.ndarray:
    """v_e = r[recv] − r[send] + shift_e · cell_(graph of e), [n_edge, 3] Å."""
    edge_graph = jnp.repeat(jnp.arange(n_edge.shape[0]), n_edge, total_repeat_length=senders.shape[0])
    return positions[receivers] - positions[senders] + jnp.einsum("ei,eij->ej", shifts, cell[edge_graph])


@dataclass
class Potential:
    """A model with its parameters, energy scaling and extra energy terms, ready to predict.

    `numbers` lists the atomic numbers the model knows; species index k means numbers[k].
    variables: {"model": flax params, "scale": (), "shift": (), "e0": [n_species]} (eV).
    Build one with `mpnn.build_potential` (fresh) or `mpnn.load` (saved).
    """

    model: Any  # flax module: the learned local term (None: the fixed terms and E0 alone)
    variables: dict
    numbers: tuple[int, ...]
    cutoff: float
    dtype: str = "float32"
    config: Any = None  # the resolved mpnn.config.Config it was trained with
    pair_terms: tuple = ()  # PairTerm instances
    global_terms: tuple = ()  # GlobalTerm instances
    _jitted: CountedJit | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.dtype == "float64" and not jax.config.jax_enable_x64:
            raise PrecisionError(
                "this potential is float64 but JAX runs in 32 bits: call mpnn.enable_x64() at the start "
                "of your program (before creating arrays), or use dtype='float32' (mpnn.load(path, dtype='float32'))"
            )
        self.variables = cast_tree(self.variables, self.np_dtype)

    @property
    def np_dtype(self):
        return np.float64 if self.dtype == "float64" else np.float32

    @property
    def species_index(self) -> dict[int, int]:
        return {z: k for k, z in enumerate(self.numbers)}

    @property
    def n_compiles(self) -> int:
        """Compilations of `predict_graph` so far."""
        return 0 if self._jitted is None else self._jitted.n_compiles

    def replace(self, **changes) -> "Potential":
        """A copy with some fields changed (e.g. variables=...)."""
        return dataclasses.replace(self, _jitted=None, **changes)

    # --- the energy -------------------------------------------------------------------

    def local_terms(self, variables, vectors, species, senders, receivers, node_mask, edge_mask):
        """(per-atom energies [n_node] eV of the local model and the pair terms, 0 on
        padding; per-atom model outputs for the global terms: {"charge": raw charges
        [n_node] e} when the model predicts them).

        vectors [n_edge, 3] Å; species [n_node]; senders, receivers [n_edge]; masks bool.
        """
        energy = variables["shift"] + variables["e0"][species]
        outputs = {}
        if self.model is not None:
            model_out = self.model.apply({"params": variables["model"]}, vectors, species, senders, receivers, edge_mask)
            if model_out.ndim == 2:  # [n_node, 2]: energy and raw charge (models with num_outputs=2)
                model_out, outputs["charge"] = model_out[:, 0], model_out[:, 1]
            energy = energy + variables["scale"] * model_out
        if self.pair_terms:
            numbers = jnp.asarray(self.numbers, jnp.int32)[species]
            lengths = safe_norm(masked_edge_vectors(vectors, edge_mask))
            for term in self.pair_terms:
                per_edge = term.edge_energies(lengths, numbers[senders], numbers[receivers], edge_mask)
                # Half of a pair's energy rides on each direction: each atom gets half of its pairs.
                energy = energy + jax.ops.segment_sum(per_edge, receivers, species.shape[0])
        return jnp.where(node_mask, energy, 0.0), outputs

    def global_energies(self, positions, cell, species, node_mask, node_graph, n_graph, node_outputs, total_charge):
        """Σ over global terms: (energy per frame [n_graph] eV, per-atom energies [n_node]
        eV, other results of the terms, e.g. {"charges", "dipole"})."""
        numbers = jnp.asarray(self.numbers, jnp.int32)[species]
        graph_energy = jnp.zeros(n_graph, positions.dtype)
        node_energy = jnp.zeros(species.shape[0], positions.dtype)
        extras = {}
        for term in self.global_terms:
            out = dict(term(positions, cell, numbers, node_mask, node_graph, n_graph, node_outputs, total_charge))
            graph_energy = graph_energy + out.pop("energy")
            term_node = out.pop("node_energy", None)
            if term_node is not None:
                node_energy = node_energy + jnp.where(node_mask, term_node, 0.0)
            extras.update(out)
        return graph_energy, node_energy, extras

    def covering(self, cells, margin: float = 1.0) -> "Potential":
        """This potential with global terms sized for the cells [.., 3, 3] Å it will see
        (e.g. the reciprocal grid of Ewald sums); itself if nothing changes."""
        terms = tuple(t.covering(cells, margin) if hasattr(t, "covering") else t for t in self.global_terms)
        return self if terms == self.global_terms else self.replace(global_terms=terms)

    # --- prediction -------------------------------------------------------------------

    def predict_graph(self, graph: jraph.GraphsTuple, virials: bool | None = None) -> dict[str, jnp.ndarray]:
        """Jitted `energy_and_derivatives` on a padded graph (see `mpnn.data.graphs`).

        `virials`: also compute virial, stress and per-atom virials; by default only when
        a cell of the batch has a volume (molecules skip them: fewer operations per call,
        which is most of a small molecule's time)."""
        cells = np.asarray(graph.globals["cell"]) if virials is None or self.global_terms else None
        if virials is None:
            virials = bool(np.any(np.abs(np.linalg.det(cells)) > MIN_CELL_VOLUME))
        if self.global_terms:
            covered = self.covering(cells)
            if covered is not self:  # a term grew (e.g. a larger Ewald grid): recompile
                self.global_terms, self._jitted = covered.global_terms, None
        if self._jitted is None:
            n_compiles = self.n_compiles
            self._jitted = CountedJit(
                lambda variables, graph, virials: energy_and_derivatives(self, variables, graph, virials=virials),
                static_argnames="virials",
            )
            self._jitted.n_compiles = n_compiles
        return self._jitted(self.variables, cast_graph(graph, self.np_dtype), virials=virials)

    def to_graph(self, atoms: ase.Atoms | Frame) -> jraph.GraphsTuple:
        frame = atoms if isinstance(atoms, Frame) else Frame.from_atoms(atoms)
        unknown = sorted(set(frame.numbers.tolist()) - set(self.numbers))
        if unknown:
            raise ValueError(f"{frame.source}: elements {unknown} are not known to this model (knows {list(self.numbers)})")
        if self.global_terms and frame.pbc.any() and not frame.pbc.all():
            raise ValueError(
                f"{frame.source}: pbc={frame.pbc.tolist()}: the long-range term needs a cell periodic in all "
                "three directions or none (for a slab, make it 3D-periodic with enough vacuum)"
            )
        return frame_to_graph(frame, self.cutoff, self.species_index)

    def predict(
        self, structures: Sequence[ase.Atoms | Frame], batch_size: int = 16, shape: tuple[int, int] | None = None
    ) -> list[dict[str, np.ndarray]]:
        """Energy (eV), forces (eV/Å), per-atom energies (eV), and for periodic cells
        stress (eV/Å³, ASE sign), virial (eV) and per-atom virials, one dict per structure.
        With electrostatics also "charges" (e; they sum to `atoms.info["charge"]`, default
        0) and, for molecules, "dipole" (e·Å).

        Batches are padded to bucketed sizes; `shape` = (n_node, n_edge) pads every batch
        to exactly that instead: one compilation for structures of any size that fit."""
        if isinstance(structures, (ase.Atoms, Frame)):
            structures = [structures]
        results = []
        for start in range(0, len(structures), batch_size):
            chunk = list(structures[start : start + batch_size])
            graphs = [self.to_graph(a) for a in chunk]
            # Bucketed sizes, 4 per doubling (≤ 25 % padding): cost is linear in padded edges
            # (108-atom Cu E+F: 481 ms at the next power of two, 265 ms here), and a bounded
            # set of shapes keeps compilations few across calls.
            if shape is None:
                padded = batch_and_pad(graphs, n_graph=batch_size + 1, per_doubling=4)
            else:
                n_node, n_edge = sum(int(g.n_node[0]) for g in graphs), sum(int(g.n_edge[0]) for g in graphs)
                if n_node + 1 > shape[0] or n_edge > shape[1]:
                    raise ValueError(f"predict: a batch of {n_node} atoms and {n_edge} edges does not fit shape={shape}")
                padded = pad_graph(jraph.batch_np(graphs), shape[0], shape[1], batch_size + 1)
            out = jax.device_get(self.predict_graph(padded, virials=any(np.any(s.pbc) for s in chunk)))
            offset = 0
            for k, (structure, graph) in enumerate(zip(chunk, graphs)):
                n = int(graph.n_node[0])
                result = {
                    "energy": float(out["energy"][k]),
                    "forces": np.asarray(out["forces"][offset : offset + n], dtype=np.float64),
                    "energies": np.asarray(out["node_energy"][offset : offset + n], dtype=np.float64),
                }
                if "charges" in out:
                    result["charges"] = np.asarray(out["charges"][offset : offset + n], dtype=np.float64)
                    if not np.any(structure.pbc):  # the dipole of a periodic cell is not defined
                        result["dipole"] = np.asarray(out["dipole"][k], dtype=np.float64)
                if np.any(structure.pbc):
                    result["stress"] = np.asarray(out["stress"][k], dtype=np.float64)
                    result["virial"] = np.asarray(out["virial"][k], dtype=np.float64)
                    result["virials"] = np.asarray(out["node_virial"][offset : offset + n], dtype=np.float64)
                results.append(result)
                offset += n
        return results


def graph_energies(potential: Potential, variables: dict, graph: jraph.GraphsTuple, vectors, positions=None, strain=None):
    """The total energy and its parts, without derivatives: (energy per frame [n_graph] eV,
    per-atom energies [n_node] eV, what global terms report, e.g. {"charges", "dipole"}).

    vectors [n_edge, 3] Å feed the local and pair terms; global terms see `positions`
    (default: the graph's) and the cells, both under `strain` [n_graph, 3, 3] (default 0).
    """
    species, node_mask = graph.nodes["species"], graph.nodes["mask"]
    num_nodes, num_graphs = species.shape[0], graph.n_node.shape[0]
    node_graph = jnp.repeat(jnp.arange(num_graphs), graph.n_node, total_repeat_length=num_nodes)
    node_energy, node_outputs = potential.local_terms(
        variables, vectors, species, graph.senders, graph.receivers, node_mask, graph.edges["mask"]
    )
    graph_energy = jax.ops.segment_sum(node_energy, node_graph, num_graphs)
    if not potential.global_terms:
        return graph_energy, node_energy, {}
    positions = graph.nodes["positions"] if positions is None else positions
    cell = graph.globals["cell"]
    if strain is not None:
        positions = positions + jnp.einsum("ni,nij->nj", positions, strain[node_graph])
        cell = cell + jnp.einsum("gki,gij->gkj", cell, strain)
    total_charge = graph.globals.get("charge") if isinstance(graph.globals, dict) else None
    total_charge = jnp.zeros(num_graphs, positions.dtype) if total_charge is None else total_charge
    global_graph, global_node, extras = potential.global_energies(
        positions, cell, species, node_mask, node_graph, num_graphs, node_outputs, total_charge
    )
    return graph_energy + global_graph, node_energy + global_node, extras


def energy_and_derivatives(
    potential: Potential,
    variables: dict,
    graph: jraph.GraphsTuple,
    vectors: jnp.ndarray | None = None,
    virials: bool = True,
) -> dict[str, jnp.ndarray]:
    """Everything the potential predicts for one padded batch, from one backward pass.

    graph: nodes {"positions" [n_node, 3], "species", "mask"}, edges {"shifts", "mask"},
    globals {"cell" [n_graph, 3, 3]}, senders, receivers, n_node, n_edge. `vectors`
    overrides the edge vectors computed from positions, shifts and cells (jax-md passes
    its displacements).
    Returns energy [n_graph], node_energy [n_node], forces [n_node, 3], virial
    [n_graph, 3, 3], stress [n_graph, 3, 3] (zero where the cell has no volume),
    node_virial [n_node, 3, 3] (local and pair terms), and what global terms report
    (electrostatics: charges [n_node] e, dipole [n_graph, 3] e·Å). A frame's total
    charge is read from globals["charge"] (e; 0 when absent). With `virials=False` the
    virial, stress and node_virial entries are left out (and not computed).
    """
    species, positions, senders, receivers = graph.nodes["species"], graph.nodes["positions"], graph.senders, graph.receivers
    num_nodes, num_graphs = species.shape[0], graph.n_node.shape[0]
    node_mask, cell = graph.nodes["mask"], graph.globals["cell"]
    if vectors is None:
        vectors = edge_vectors(positions, cell, graph.edges["shifts"], senders, receivers, graph.n_edge)
    has_global = bool(potential.global_terms)

    def total_energy(vectors, positions, strain):
        graph_energy, node_energy, extras = graph_energies(potential, variables, graph, vectors, positions, strain)
        return jnp.sum(graph_energy), (graph_energy, node_energy, extras)

    strain = jnp.zeros((num_graphs, 3, 3), vectors.dtype)
    argnums = ((0, 1, 2) if virials else (0, 1)) if has_global else (0,)
    (_, (energy, node_energy, extras)), grads = jax.value_and_grad(total_energy, argnums, has_aux=True)(
        vectors, positions, strain
    )
    grad = grads[0]
    forces = jax.ops.segment_sum(grad, senders, num_nodes) - jax.ops.segment_sum(grad, receivers, num_nodes)
    if has_global:
        forces = forces - grads[1]
    results = {"energy": energy, "node_energy": node_energy, "forces": jnp.where(node_mask[:, None], forces, 0.0)}
    if not virials:
        return {**results, **extras}
    edge_graph = jnp.repeat(jnp.arange(num_graphs), graph.n_edge, total_repeat_length=senders.shape[0])
    edge_virial = -jnp.einsum("ei,ej->eij", vectors, grad)
    edge_virial = 0.5 * (edge_virial + jnp.swapaxes(edge_virial, 1, 2))
    virial = jax.ops.segment_sum(edge_virial, edge_graph, num_graphs)
    node_virial = 0.5 * (
        jax.ops.segment_sum(edge_virial, senders, num_nodes) + jax.ops.segment_sum(edge_virial, receivers, num_nodes)
    )
    if has_global:
        strain_virial = -grads[2]
        virial = virial + 0.5 * (strain_virial + jnp.swapaxes(strain_virial, 1, 2))
    volume = jnp.abs(jnp.linalg.det(cell))
    has_volume = volume > MIN_CELL_VOLUME
    stress = jnp.where(has_volume[:, None, None], -virial / jnp.where(has_volume, volume, 1.0)[:, None, None], 0.0)
    return {
        **results,
        "virial": virial,
        "stress": stress,
        "node_virial": node_virial,
        **extras,  # from global terms: e.g. "charges" [n_node] e, "dipole" [n_graph, 3] e·Å
    }


def graph_cells(graphs: Sequence[jraph.GraphsTuple]) -> np.ndarray:
    """All cells [n, 3, 3] Å of a list of graphs (for `Potential.covering`)."""
    return np.concatenate([np.asarray(g.globals["cell"]).reshape(-1, 3, 3) for g in graphs]) if graphs else np.zeros((0, 3, 3))


def cast_graph(graph: jraph.GraphsTuple, dtype) -> jraph.GraphsTuple:
    """Floating arrays of a graph to `dtype` (integers and masks untouched)."""

    def cast(x):
        if not isinstance(x, jax.Array):  # one already on the device stays there (no round trip)
            x = np.asarray(x)
        # dtype.kind, not issubdtype: this runs on every leaf of every prediction call, and
        # issubdtype's ~1 µs per leaf is a visible part of a small molecule's latency.
        return x.astype(dtype) if x.dtype.kind == "f" and x.dtype != dtype else x

    return jax.tree_util.tree_map(cast, graph)


def cast_tree(tree, dtype):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, tree)


def energy_terms(model_config) -> tuple[tuple, tuple]:
    """(pair_terms, global_terms) that a model config switches on."""
    pair_terms, global_terms = [], []
    if model_config.pair_repulsion == "zbl":
        from mpnn.terms.zbl import ZBLRepulsion

        pair_terms.append(ZBLRepulsion(model_config.zbl_r_inner, model_config.zbl_r_outer))
    if model_config.long_range == "electrostatics":
        from mpnn.terms.electrostatics import Electrostatics

        global_terms.append(Electrostatics(sigma=model_config.charge_sigma, method=model_config.electrostatics_method))
    return tuple(pair_terms), tuple(global_terms)


def build_potential(
    model_config,
    numbers: Sequence[int],
    avg_num_neighbors: float = 1.0,
    e0: Sequence[float] | None = None,
    scale: float = 1.0,
    shift: float = 0.0,
    seed: int = 0,
    config: Any = None,
) -> Potential:
    """A freshly initialised potential for a model config and the elements `numbers`.

    model_config: a model config (`mpnn.config.model_config("mace", num_features=64)`),
    or a dict such as {"name": "mace", "num_features": 64}. avg_num_neighbors divides
    neighbor sums (training sets it from the data); e0 [len(numbers)] eV per element;
    energy = scale · model + shift + E0. No data set needed (benchmarks, notebooks).
    """
    from mpnn.config import Config, model_config as make_model_config
    from mpnn.models import build_model

    if isinstance(model_config, dict):
        model_config = make_model_config(**model_config)
    numbers = tuple(int(z) for z in numbers)
    model = build_model(model_config, len(numbers), avg_num_neighbors)
    params = jax.jit(init_model_params, static_argnums=(0, 1))(model, seed)
    variables = {
        "model": params,
        "scale": jnp.asarray(scale),
        "shift": jnp.asarray(shift),
        "e0": jnp.asarray(np.zeros(len(numbers)) if e0 is None else np.asarray(e0, dtype=np.float64)),
    }
    pair_terms, global_terms = energy_terms(model_config)
    config = config if config is not None else Config(model=model_config)
    return Potential(model, variables, numbers, model_config.cutoff, model_config.dtype, config, pair_terms, global_terms)

