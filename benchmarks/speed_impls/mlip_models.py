"""instadeep's mlip (JAX) MACE and NequIP for benchmarks/speed.py (see speed_impls/__init__.py).

Runs in its own interpreter (mlip pins its own jax/flax/e3nn-jax stack):
    python speed.py --python mlip-mace=/path/bench-mlip/bin/python --python mlip-nequip=...

What is built, all from mlip's public modules (random weights, seed 0, float32):
    model     mlip.models.Mace / Nequip wrapped in mlip.models.ForceField (ConservativePredictor:
              forces and stress are derivatives of the energy w.r.t. positions and strain).
              HYPER maps onto the configs as
                MACE    num_layers, num_channels = num_features, l_max (edge harmonics and
                        interaction irreps), node_symmetry = hidden_l_max (so the hidden
                        features are 64x0e+64x1o), correlation, num_rbf, radial_mlp_hidden,
                        polynomial envelope (mlip's is p = 5, fixed); readout 16x0e -> 0e.
                NequIP  target_irreps = f"{F}x0e + {F}x1o" (hidden_l_max 1, even parity only),
                        l_max, num_rbf, radial_mlp_hidden, polynomial envelope (p = 5).
              DatasetInfo: cutoff, E0 = -3 eV per element, avg_num_neighbors = edges / atoms
              of the workload's graphs.
    ef        Graph.from_chemical_system (mlip's neighbour list) per structure, batch_graphs,
              pad_with_graphs (one padding graph, +1 node), on the device; jit of
              predictor.apply with the parameters as arguments; stress for periodic cells.
    train     mlip.training.training_step.make_train_step (grad, optimiser update, EMA 0.99 as
              in mlip's TrainingLoop) with mlip's MSELoss (energy 1, forces 1, stress 0) and
              mlip's optimiser chain (clip 500, constant lr 0.01) around optax.adam instead of
              its default amsgrad; labelled batch pre-built and on the device.
    md        mlip's JaxMDSimulationEngine, NVE velocity Verlet, 1 fs, 300 K (its jax_md sparse
              neighbour list, all-pairs update every step, and its per-step episode log); `steps` of its
              simulation step in one jitted fori_loop (its run() loops un-jitted per episode).
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from mlip.data import DatasetInfo
from mlip.data.chemical_system import ChemicalSystem
from mlip.data.helpers.dummy_init_graph import get_dummy_graph_for_model_init
from mlip.graph import Graph
from mlip.graph.batching_helpers import batch_graphs, pad_with_graphs
from mlip.models import ForceField, Mace, Nequip
from mlip.models.loss import MSELoss
from mlip.training.ema import exponentially_moving_average
from mlip.training.optimizer import get_mlip_optimizer_chain_with_flexible_base_optimizer
from mlip.training.optimizer_config import OptimizerConfig
from mlip.training.training_state import init_training_state
from mlip.training.training_step import make_train_step
from mlip.typing.properties import Properties


def _network_config(model: str, hyper: dict):
    shared = dict(
        num_layers=hyper["num_layers"],
        l_max=hyper["l_max"],
        num_rbf=hyper["num_radial"],
        radial_mlp_hidden=list(hyper["radial_mlp"]),
    )
    if model == "mace":
        return Mace, Mace.Config(
            num_channels=hyper["num_features"],
            node_symmetry=hyper["hidden_l_max"],
            correlation=hyper["correlation"],
            **shared,
        )
    irreps = " + ".join(f"{hyper['num_features']}x{l}{'eo'[l % 2]}" for l in range(hyper["hidden_l_max"] + 1))
    return Nequip, Nequip.Config(target_irreps=irreps, **shared)


def _graph(atoms, cutoff: float) -> Graph:
    """mlip's graph of one structure (its neighbour list), with the training labels."""
    system = ChemicalSystem(
        atomic_numbers=np.asarray(atoms.numbers),
        positions=atoms.get_positions(),
        energy=float(atoms.info["energy"]) if "energy" in atoms.info else None,
        forces=np.asarray(atoms.arrays["forces"]) if "forces" in atoms.arrays else None,
        cell=np.array(atoms.get_cell()) if atoms.pbc.any() else None,
        pbc=tuple(bool(p) for p in atoms.pbc),
    )
    return Graph.from_chemical_system(system, cutoff)


def _float32(tree):
    return jax.tree.map(lambda x: x.astype(np.float32) if np.issubdtype(np.asarray(x).dtype, np.floating) else x, tree)


def _init_force_field(network) -> ForceField:
    """ForceField.from_mlip_network(network, seed=0), but initialised by a jitted energy-only
    predictor (same parameter tree): mlip runs the init op by op under jax.grad, minutes on
    one core. Same key, same parameters (checked: equal to 1e-7)."""
    dummy = get_dummy_graph_for_model_init()
    init = ForceField.get_predictor_class(Properties(), network.config)(
        mlip_network=network, required_properties=Properties(forces=False)
    ).init
    params = jax.jit(lambda key: init(key, dummy))(jax.random.key(0))
    properties = Properties()
    predictor = ForceField.get_predictor_class(properties, network.config)(
        mlip_network=network,
        required_properties=properties,
        energy_head=ForceField.get_energy_head(network.config, properties, network),
    )
    return ForceField(predictor=predictor, params=params)


class Bench:
    def __init__(self, model: str, hyper: dict, structures):
        self.cutoff = float(hyper["cutoff"])
        graphs = [_graph(a, self.cutoff) for a in structures]
        avg_neighbors = sum(len(g.senders) for g in graphs) / sum(len(a) for a in structures)
        numbers = sorted({int(z) for a in structures for z in a.numbers})
        info = DatasetInfo(
            atomic_energies_map={z: -3.0 for z in numbers},
            graph_cutoff_angstrom=self.cutoff,
            avg_num_neighbors=avg_neighbors,
        )
        network_cls, config = _network_config(model, hyper)
        self.network = network_cls(config=config, dataset_info=info)
        self.force_field = _init_force_field(self.network)
        self.n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(self.force_field.params))
        self.note = (
            "mlip 0.2.5 on jax " + jax.__version__ + "; envelope p=5 fixed in mlip; "
            + ("readout 16x0e->0e; " if model == "mace" else f"target_irreps {config.target_irreps}; ")
            + "train: mlip make_train_step, MSELoss(E 1, F 1), mlip optimiser chain (clip 500, lr 0.01) "
            "around optax.adam, EMA 0.99; md: mlip JaxMDSimulationEngine NVE (jax_md sparse neighbour "
            "list, no cell list: all pairs each step), steps in one jitted fori_loop"
        )

    def _batch(self, structures) -> Graph:
        graphs = [_graph(a, self.cutoff) for a in structures]
        n_node = sum(len(a) for a in structures) + 1
        n_edge = sum(len(g.senders) for g in graphs)
        padded = pad_with_graphs(batch_graphs(graphs), n_node=n_node, n_edge=n_edge, n_graph=len(graphs) + 1)
        return jax.device_put(_float32(padded))

    def energy_forces(self, structures):
        periodic = all(a.pbc.all() for a in structures)
        predictor = self.force_field.replace_required_properties(Properties(stress=periodic)).predictor
        graph = self._batch(structures)
        params = self.force_field.params
        predict = jax.jit(lambda params, graph: predictor.apply(params, graph).to_prediction())
        return lambda: jax.block_until_ready(predict(params, graph))

    def train_step(self, structures):
        graph = self._batch(structures)
        loss = MSELoss(
            energy_weight_schedule=lambda _: 1.0,
            forces_weight_schedule=lambda _: 1.0,
            stress_weight_schedule=lambda _: 0.0,
        )
        optimizer = get_mlip_optimizer_chain_with_flexible_base_optimizer(optax.adam, OptimizerConfig())
        ema = exponentially_moving_average(0.99)
        step = make_train_step(self.force_field.predictor, loss, optimizer, ema, float(len(structures)))
        state = jax.device_put(init_training_state(self.force_field.params, optimizer, ema))
        holder = [state]

        def fn():
            holder[0], metrics = step(holder[0], graph, 0)
            jax.block_until_ready((holder[0], metrics))

        return fn

    def md(self, atoms, steps):
        from mlip.simulation.enums import MDIntegrator, SimulationType
        from mlip.simulation.jax_md.jax_md_simulation_engine import JaxMDSimulationEngine

        config = JaxMDSimulationEngine.Config(
            simulation_type=SimulationType.MD,
            md_integrator=MDIntegrator.NVE_VELOCITY_VERLET,
            num_steps=steps,
            num_episodes=1,
            timestep_fs=1.0,
            temperature_kelvin=300.0,
            random_seed=0,
        )
        atoms = atoms.copy()
        engine = JaxMDSimulationEngine(atoms, self.force_field, config)
        chunk = jax.jit(lambda state: jax.lax.fori_loop(0, steps, engine._pure_simulation_step_fun, state))
        holder = [engine._internal_state]

        def fn():
            new = jax.block_until_ready(chunk(holder[0]))
            if engine._did_neighbor_buffer_overflow(new):
                raise RuntimeError("mlip's neighbour list overflowed during the timed chunk")
            holder[0] = new

        return fn


def build(model: str, hyper: dict, structures) -> Bench:
    return Bench(model, hyper, structures)
