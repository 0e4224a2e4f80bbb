"""Weighted loss and error sums on padded batches (padding and missing labels weigh 0)."""

from __future__ import annotations

import jax.numpy as jnp
import jraph
import numpy as np


def _node_graph(graph: jraph.GraphsTuple) -> jnp.ndarray:
    n_nodes = graph.nodes["species"].shape[0]
    return jnp.repeat(jnp.arange(graph.n_node.shape[0]), graph.n_node, total_repeat_length=n_nodes)


def residuals(pred: dict, graph: jraph.GraphsTuple) -> dict[str, tuple[jnp.ndarray, jnp.ndarray]]:
    """(error, weight) pairs: energy per atom [n_graph], force components [n_node, 3],
    stress components [n_graph, 3, 3]; weights broadcast against the errors."""
    globals_ = graph.globals
    dtype = pred["energy"].dtype  # the model's: a float32 model stays float32 in a 64-bit process
    n_atoms = jnp.maximum(graph.n_node, 1).astype(dtype)
    node_weight = globals_["weight_forces"][_node_graph(graph)]
    out = {
        "energy": ((pred["energy"] - globals_["energy"]) / n_atoms, globals_["weight_energy"]),
        "forces": (pred["forces"] - graph.nodes["forces"], node_weight[:, None] * jnp.ones((1, 3), dtype)),
        "stress": (pred["stress"] - globals_["stress"], globals_["weight_stress"][:, None, None] * jnp.ones((1, 3, 3), dtype)),
    }
    if "charges" in pred:  # a potential with learned charges (electrostatics)
        charge_weight = globals_["weight_charges"][_node_graph(graph)] * graph.nodes["mask"]
        out["dipole"] = (pred["dipole"] - globals_["dipole"], globals_["weight_dipole"][:, None] * jnp.ones((1, 3), dtype))
        out["charges"] = (pred["charges"] - graph.nodes["charges"], charge_weight)
    return out


def weighted_mse(error: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
    return jnp.sum(weight * error**2) / jnp.maximum(jnp.sum(weight), 1.0)


def huber(error: jnp.ndarray, delta: float) -> jnp.ndarray:
    """Elementwise e² below |e| = delta, linear above (2δ|e| − δ²): outliers pull less."""
    abs_error = jnp.abs(error)
    return jnp.where(abs_error <= delta, error**2, 2 * delta * abs_error - delta**2)


def weighted_huber(error: jnp.ndarray, weight: jnp.ndarray, delta: float) -> jnp.ndarray:
    """Like `weighted_mse` with `huber` in place of e²."""
    return jnp.sum(weight * huber(error, delta)) / jnp.maximum(jnp.sum(weight), 1.0)


def loss_sums(pred: dict, graph: jraph.GraphsTuple, terms, huber_delta: float | None = None) -> dict[str, tuple]:
    """{term: (Σ w·e², Σ w)} for each term in `terms` (or Σ w·huber(e) with `huber_delta`).
    Kept apart so that several devices can add their sums before dividing."""
    res = residuals(pred, graph)
    out = {}
    for k in terms:
        if k not in res:
            continue
        error, weight = res[k]
        per_entry = error**2 if huber_delta is None else huber(error, huber_delta)
        out[k] = (jnp.sum(weight * per_entry), jnp.sum(weight))
    return out


def combine_loss(sums: dict[str, tuple], weights: dict) -> jnp.ndarray:
    """Σ_k w_k · (Σ w·e²)_k / max((Σ w)_k, 1): the weighted mean of each term."""
    return sum(weights[k] * total / jnp.maximum(count, 1.0) for k, (total, count) in sums.items())


def loss_fn(pred: dict, graph: jraph.GraphsTuple, weights: dict[str, float], huber_delta: float | None = None) -> jnp.ndarray:
    """Σ_k w_k · MSE_k over energy per atom (eV/atom)², force components (eV/Å)², stress
    (eV/Å³)², and with learned charges dipole components (e·Å)² and charges e²; with
    `huber_delta` the Huber form of each (quadratic below |error| = delta, linear above:
    outliers pull less). Terms absent from `weights` are left out; the weights may be
    traced values (they change between training stages)."""
    return combine_loss(loss_sums(pred, graph, weights, huber_delta), weights)


# The keys of `error_sums` for a potential with every output (learned charges included).
ERROR_KEYS = tuple(f"{q}_{kind}" for q in ("energy", "forces", "stress", "dipole", "charges") for kind in ("abs", "sq", "n"))


def error_sums(pred: dict, graph: jraph.GraphsTuple) -> dict[str, jnp.ndarray]:
    """Per-batch sums for MAE/RMSE: Σ w|e|, Σ w e², Σ w for each quantity."""
    out = {}
    for key, (error, weight) in residuals(pred, graph).items():
        out[f"{key}_abs"] = jnp.sum(weight * jnp.abs(error))
        out[f"{key}_sq"] = jnp.sum(weight * error**2)
        out[f"{key}_n"] = jnp.sum(weight)
    return out


# metric name → (quantity, kind, factor from eV units to reported meV units)
METRICS = {
    "energy_mae_mev_atom": ("energy", "mae"),
    "energy_rmse_mev_atom": ("energy", "rmse"),
    "forces_mae_mev_A": ("forces", "mae"),
    "forces_rmse_mev_A": ("forces", "rmse"),
    "stress_mae_mev_A3": ("stress", "mae"),
    "stress_rmse_mev_A3": ("stress", "rmse"),
    "dipole_mae_me_A": ("dipole", "mae"),  # milli-e·Å, per component
    "charges_mae_me": ("charges", "mae"),  # milli-e
}


def summarise(sums: dict[str, float], n_frames: int) -> dict[str, float | int | None]:
    """Accumulated error sums → metrics in meV units; None where a label was absent."""
    out: dict[str, float | int | None] = {}
    for name, (key, kind) in METRICS.items():
        n = float(sums.get(f"{key}_n", 0.0))
        if n == 0:
            out[name] = None
        elif kind == "mae":
            out[name] = 1000.0 * float(sums[f"{key}_abs"]) / n
        else:
            out[name] = 1000.0 * float(np.sqrt(float(sums[f"{key}_sq"]) / n))
    out["n_frames"] = int(n_frames)
    return out
