"""jax-md's own NequIP (jax_md._nn.nequip, jax-md 0.2.29) for benchmarks/speed.py.

Model: `jax_md.nn.nequip.model_from_config(cfg)` on jax-md's default ConfigDict, with HYPER mapped as
    num_layers 2                 -> graph_net_steps = 2
    num_features 64, hidden_l_max 1 -> hidden_irreps = "64x0e + 64x1o"
    l_max 2                      -> sh_irreps = "1x0e + 1x1o + 1x2e"
    num_radial 8                 -> num_basis = 8
    radial_mlp (64, 64, 64)      -> radial_net_n_layers = 3, radial_net_n_hidden = 64
    cutoff 5                     -> r_max = 5.0 (also the neighbor-list cutoff)
    envelope_p 5                 -> no counterpart (jax-md multiplies the Bessel basis by its
                                    smooth switch energy.multiplicative_isotropic_cutoff, 4.5 -> 5 Å)
    average number of neighbors  -> n_neighbors, counted on the workload's neighbor lists
plus n_elements = the workload's elements (one-hot), shift -3 eV / scale 0.05 per atom (as ours),
jax-md's defaults elsewhere (use_sc, swish/tanh gates, scalar_mlp_std 4). float32, PRNGKey(0).

Graphs: the body of `jax_md.energy.nequip_neighbor_list` (partition.neighbor_list in Sparse
format -> nn.util.neighbor_list_featurizer -> jraph graph -> model), keeping every graph's energy:
  * molecules (no cell): all molecules of a workload are one jax-md system in free space, each
    shifted 100 Å from the previous; one neighbor list (no cell list); the jraph graph gets one
    n_node entry per molecule, so the model returns one energy per molecule.
  * periodic cells: space.periodic_general(cell, fractional coordinates), neighbor list with a
    cell list when the box allows it; forces and stress from one value_and_grad over the
    fractional positions and the box perturbation ε (the derivative quantity.stress takes;
    stress = -dU/dε / V, jax-md's sign).
Train: optax.adam(1e-3), loss mse(E) + mse(F) over all structures of the batch (5 ethanol: one
system, 5 graphs; 2 × Cu108: two systems in the same jit), jitted value_and_grad over the params,
neighbor lists prebuilt. MD: simulate.nve, 1 fs, 300 K,
neighbor list updated every step inside one jitted fori_loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax_md import nn, partition, simulate, space

GAP = 100.0  # Å between molecules of one batch (≫ cutoff)


def _strong(tree):
    """Drop weak types (jax-md's Bessel frequencies are weak-typed): a jitted step that returns the
    tree it takes would otherwise recompile when it sees its own, strongly typed, output."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), tree)


NOTE = (
    "jax_md._nn.nequip; envelope_p: none (jax-md's C2 switch 4.5-5 Å on the Bessel basis); "
    "molecules batched as one free-space system, 100 Å apart, one graph per molecule; "
    "stress = -dU/dε/V (jax-md sign) in the same grad as forces; Adam lr 1e-3"
)


class _System:
    """One jax-md system: positions, displacement, sparse neighbor list, molecule sizes."""

    def __init__(self, structures, numbers, cutoff):
        index = {z: k for k, z in enumerate(numbers)}
        z = np.concatenate([a.numbers for a in structures])
        self.one_hot = jnp.asarray(np.eye(len(numbers), dtype=np.float32)[[index[int(n)] for n in z]])
        self.masses = jnp.asarray(np.concatenate([a.get_masses() for a in structures]), jnp.float32)
        self.structures, self.sizes = structures, [len(a) for a in structures]
        if structures[0].pbc.any():
            assert len(structures) == 1, "one periodic cell per system"
            atoms = structures[0]
            self.box = jnp.asarray(atoms.cell.array.T, jnp.float32)  # columns = lattice vectors
            self.volume = float(atoms.get_volume())
            self.displacement, self.shift = space.periodic_general(self.box, fractional_coordinates=True)
            self.positions = jnp.asarray(atoms.get_scaled_positions() % 1.0, jnp.float32)
            self.neighbor_fn = partition.neighbor_list(
                self.displacement, self.box, cutoff, format=partition.Sparse, fractional_coordinates=True
            )
        else:
            self.box = None
            self.displacement, self.shift = space.free()
            r = [a.positions - a.positions.min(0) + [k * GAP, 0, 0] for k, a in enumerate(structures)]
            self.positions = jnp.asarray(np.concatenate(r), jnp.float32)
            extent = float(np.ptp(np.asarray(self.positions), axis=0).max()) + cutoff
            self.neighbor_fn = partition.neighbor_list(
                self.displacement, extent, cutoff, format=partition.Sparse, disable_cell_list=True
            )
        self.nbrs = self.neighbor_fn.allocate(self.positions)
        self.n_edges = int(np.sum(np.asarray(partition.neighbor_list_mask(self.nbrs, True))))
        self.featurize = nn.util.neighbor_list_featurizer(self.displacement)
        self.n_node = jnp.asarray(self.sizes + [1])  # + the padding node of partition.to_jraph

    def graph(self, positions, nbrs, **kwargs):
        graph = self.featurize(self.one_hot, positions, nbrs, **kwargs)
        return graph._replace(n_node=self.n_node)


class Bench:
    def __init__(self, hyper: dict, structures):
        self.cutoff = float(hyper["cutoff"])
        self.numbers = sorted({int(z) for a in structures for z in a.numbers})
        systems = self.systems(structures)
        n_neighbors = sum(s.n_edges for s in systems) / sum(sum(s.sizes) for s in systems)
        cfg = nn.nequip.default_config()
        cfg.graph_net_steps = hyper["num_layers"]
        f = hyper["num_features"]
        cfg.hidden_irreps = " + ".join(f"{f}x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(hyper["hidden_l_max"] + 1))
        cfg.sh_irreps = " + ".join(f"1x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(hyper["l_max"] + 1))
        cfg.num_basis = hyper["num_radial"]
        cfg.radial_net_n_layers = len(hyper["radial_mlp"])
        assert len(set(hyper["radial_mlp"])) == 1, "jax-md's radial MLP has one width"
        cfg.radial_net_n_hidden = hyper["radial_mlp"][0]
        cfg.r_max = self.cutoff
        cfg.n_elements = len(self.numbers)
        cfg.n_neighbors = float(n_neighbors)
        cfg.shift, cfg.scale = -3.0, 0.05
        self.cfg = cfg
        self.model = nn.nequip.model_from_config(cfg)
        s = systems[0]
        init = jax.jit(lambda key, positions, nbrs: self.model.init(key, s.graph(positions, nbrs)))
        self.params = _strong(init(jax.random.PRNGKey(0), s.positions, s.nbrs))
        dtypes = {x.dtype for x in jax.tree_util.tree_leaves(self.params)}
        assert dtypes == {jnp.dtype(jnp.float32)}, dtypes
        self.n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.params))
        self.note = NOTE + f"; n_neighbors {n_neighbors:.2f}"

    def systems(self, structures):
        periodic = [a for a in structures if a.pbc.any()]
        molecules = [a for a in structures if not a.pbc.any()]
        systems = [_System([a], self.numbers, self.cutoff) for a in periodic]
        return systems + ([_System(molecules, self.numbers, self.cutoff)] if molecules else [])

    def total(self, positions, params, system, nbrs, **kwargs):
        """(sum, one energy per molecule / cell) in eV; differentiate the sum."""
        energies = self.model.apply(params, system.graph(positions, nbrs, **kwargs))[:-1, 0]
        return energies.sum(), energies

    def energy_forces(self, structures):
        (system,) = self.systems(structures)

        def total(positions, eps, params, nbrs):
            kwargs = {} if system.box is None else {"perturbation": jnp.eye(3) + eps}
            return self.total(positions, params, system, nbrs, **kwargs)

        @jax.jit
        def predict(params, positions, nbrs):
            (_, e), (g_r, g_eps) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
                positions, jnp.zeros((3, 3), positions.dtype), params, nbrs
            )
            out = {"energy": e, "forces": -g_r}
            if system.box is not None:
                out["stress"] = -g_eps / system.volume
            return out

        return lambda: jax.block_until_ready(predict(self.params, system.positions, system.nbrs))

    def train_step(self, structures):
        systems = self.systems(structures)
        group = [a for s in systems for a in s.structures]
        e_ref = jnp.asarray([a.info["energy"] for a in group], jnp.float32)
        f_ref = jnp.asarray(np.concatenate([a.arrays["forces"] for a in group]), jnp.float32)
        tx = optax.adam(1e-3)

        def loss_fn(params):
            es, fs = [], []
            for s in systems:
                (_, e), grad = jax.value_and_grad(self.total, has_aux=True)(s.positions, params, s, s.nbrs)
                es.append(e)
                fs.append(-grad)
            return jnp.mean((jnp.concatenate(es) - e_ref) ** 2) + jnp.mean((jnp.concatenate(fs) - f_ref) ** 2)

        @jax.jit
        def step(params, opt_state):
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        holder = [self.params, _strong(tx.init(self.params))]

        def fn():
            holder[0], holder[1], loss = step(*holder)
            jax.block_until_ready(loss)

        return fn

    def md(self, atoms, steps):
        from ase import units

        (s,) = self.systems([atoms])
        params = self.params

        def energy(positions, neighbor, **kwargs):
            return self.total(positions, params, s, neighbor, **kwargs)[0]

        init_fn, apply_fn = simulate.nve(energy, s.shift, 1.0 * units.fs)
        state = init_fn(jax.random.PRNGKey(0), s.positions, units.kB * 300.0, mass=s.masses, neighbor=s.nbrs)

        @jax.jit
        def chunk(state, nbrs):
            def body(_, carry):
                state, nbrs = carry
                nbrs = nbrs.update(state.position)
                return apply_fn(state, neighbor=nbrs), nbrs

            return jax.lax.fori_loop(0, steps, body, (state, nbrs))

        holder = [_strong(state), s.nbrs]

        def fn():
            holder[0], holder[1] = jax.block_until_ready(chunk(*holder))
            if holder[1].did_buffer_overflow:
                raise RuntimeError("jax-md neighbor list overflowed during MD")

        return fn


def build(model: str, hyper: dict, structures) -> Bench:
    if model != "nequip":
        raise NotImplementedError("jax-md's NequIP only")
    return Bench(hyper, structures)
