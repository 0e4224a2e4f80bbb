"""mpnn's MACE and NequIP for benchmarks/speed.py (see speed_impls/__init__.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jraph
import numpy as np

from mpnn.config import Config, loss_weights, model_config
from mpnn.host_memory import keep_freed_memory
from mpnn.data.frames import frame_from_atoms
from mpnn.data.graphs import batch_and_pad, fixed_batch_shape, frame_to_graph, iterate_batches
from mpnn.data.statistics import average_num_neighbors
from mpnn.potential import build_potential, cast_graph
from mpnn.training.loop import TrainState, make_train_step
from mpnn.training.optimizer import make_optimizer


# As mpnn's command-line tools do, before anything computes (MPNN_KEEP_FREED_MEMORY=0: off).
keep_freed_memory()


def _config(model: str, hyper: dict):
    shared = dict(
        num_layers=hyper["num_layers"],
        num_features=hyper["num_features"],
        l_max=hyper["l_max"],
        num_radial=hyper["num_radial"],
        radial_mlp=tuple(hyper["radial_mlp"]),
        cutoff=hyper["cutoff"],
        envelope_p=hyper["envelope_p"],
        dtype="float32",
    )
    if model == "mace":
        return model_config("mace", max_L=hyper["hidden_l_max"], correlation=hyper["correlation"], **shared)
    return model_config("nequip", hidden_l_max=hyper["hidden_l_max"], parity=False, **shared)


def _block(tree):
    return jax.block_until_ready(tree)


class Bench:
    def __init__(self, model: str, hyper: dict, structures):
        self.config = _config(model, hyper)
        self.numbers = sorted({int(z) for atoms in structures for z in atoms.numbers})
        index = {z: k for k, z in enumerate(self.numbers)}
        graphs = [frame_to_graph(frame_from_atoms(a, "bench"), self.config.cutoff, index) for a in structures]
        self.potential = build_potential(
            self.config, self.numbers, average_num_neighbors(graphs), e0=[-3.0] * len(self.numbers), scale=0.05
        )
        params = self.potential.variables["model"]
        self.n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
        self.note = ""

    def graphs(self, structures):
        index = {z: k for k, z in enumerate(self.numbers)}
        return [frame_to_graph(frame_from_atoms(a, f"bench[{k}]"), self.config.cutoff, index) for k, a in enumerate(structures)]

    def energy_forces(self, structures):
        # The padding Potential.predict uses (bucketed sizes), graph already on the device.
        padded = batch_and_pad(self.graphs(structures), n_graph=len(structures) + 1, per_doubling=4)
        graph = jax.device_put(cast_graph(padded, self.potential.np_dtype))
        virials = any(atoms.pbc.any() for atoms in structures)  # stress for cells only, as the peers
        return lambda: _block(self.potential.predict_graph(graph, virials=virials))

    def train_step(self, structures):
        config = Config(model=self.config)
        graphs = self.graphs(structures)
        shape = fixed_batch_shape(graphs, len(structures))
        batch = next(iter(iterate_batches(graphs, len(structures), shape=shape)))
        batch = jax.device_put(cast_graph(batch, self.potential.np_dtype))
        params = self.potential.variables["model"]
        tx = make_optimizer(config.train, 1, params)
        state = jax.tree_util.tree_map(jnp.array, TrainState(params, tx.init(params), params, params, jnp.array(0)))
        step = make_train_step(self.potential, tx, config)
        lr_scale = jnp.ones((), jnp.float32)
        weights = {k: jnp.asarray(v, jnp.float32) for k, v in loss_weights(config.train, 1).items()}
        holder = [state]

        def fn():
            holder[0], loss, _ = step(holder[0], batch, lr_scale, weights)
            _block(loss)

        return fn

    def md(self, atoms, steps):
        from ase import units
        from jax_md import simulate

        from mpnn.calculators import jaxmd as J

        system = J.system_from_atoms(atoms, dtype=np.float32)
        energy = J.energy_fn(self.potential, system.displacement_fn, system.numbers, box=system.box)
        nbr_fns = J.neighbor_list(self.potential, system.displacement_fn, system.box)
        init_fn, apply_fn = simulate.nve(energy, system.shift_fn, 1.0 * units.fs)
        nbrs = nbr_fns.allocate(system.positions)
        state = init_fn(jax.random.PRNGKey(0), system.positions, units.kB * 300.0, mass=jnp.asarray(system.masses, jnp.float32), neighbor=nbrs)

        @jax.jit
        def chunk(state, nbrs):
            def body(_, carry):
                state, nbrs = carry
                nbrs = nbrs.update(state.position)
                return apply_fn(state, neighbor=nbrs), nbrs

            return jax.lax.fori_loop(0, steps, body, (state, nbrs))

        holder = [state, nbrs]

        def fn():
            holder[0], holder[1] = _block(chunk(holder[0], holder[1]))

        return fn


def build(model: str, hyper: dict, structures) -> Bench:
    return Bench(model, hyper, structures)
