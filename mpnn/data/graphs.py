"""Frames → `jraph.GraphsTuple` (numpy), padded batches with a few fixed shapes.

Layout of one graph (all numpy; a batch concatenates graphs as jraph does):
    nodes   = {"positions": [n_node, 3] Å, "species": [n_node] index into the model's
               element list, "forces": [n_node, 3] eV/Å, "charges": [n_node] e (label),
               "mask": [n_node] bool}
    edges   = {"shifts": [n_edge, 3] integer cell shifts, "mask": [n_edge] bool}
    globals = {"cell": [n_graph, 3, 3] Å, "energy": [n_graph] eV, "mask": [n_graph] bool,
               "stress": [n_graph, 3, 3] eV/Å³, "weight_energy"/"weight_forces"/
               "weight_stress", "weight_dipole", "weight_charges": [n_graph] 1.0 where the
               label exists and counts, else 0.0; "charge": [n_graph] total charge e,
               "dipole": [n_graph, 3] e·Å (label)}
    senders, receivers [n_edge]; n_node, n_edge [n_graph]

Masks are True for real entries and False for padding; every energy term uses them.
Padding (`pad_graph`, the one place it is done) adds one extra graph that owns all
padding nodes and edges; padding edges join the first padding node to itself, so every
index stays in range and nothing of a padding entry reaches a real graph. The last graph
of every padded batch is padding.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import jax
import jraph
import numpy as np

from mpnn.data.frames import Frame
from mpnn.data.neighbors import neighbor_list


def frame_to_graph(frame: Frame, cutoff: float, species_index: dict[int, int]) -> jraph.GraphsTuple:
    """One frame → one (unpadded) graph with labels; missing labels get weight 0."""
    senders, receivers, shifts = neighbor_list(frame.positions, frame.cell, frame.pbc, cutoff)
    n = frame.n_atom
    species = np.array([species_index[int(z)] for z in frame.numbers], dtype=np.int32)
    has_stress = frame.stress is not None and bool(frame.pbc.all())
    has_dipole = frame.dipole is not None and not frame.pbc.any()  # a cell has no unique dipole
    return jraph.GraphsTuple(
        nodes={
            "positions": frame.positions.astype(np.float64),
            "species": species,
            "forces": frame.forces if frame.forces is not None else np.zeros((n, 3)),
            "charges": frame.charges if frame.charges is not None else np.zeros(n),
            "mask": np.ones(n, dtype=bool),
        },
        edges={"shifts": shifts, "mask": np.ones(len(senders), dtype=bool)},
        globals={
            # No lattice without periodicity: terms tell molecules from cells by the volume.
            "cell": (frame.cell if frame.pbc.any() else np.zeros((3, 3)))[None].astype(np.float64),
            "mask": np.ones(1, dtype=bool),
            "energy": np.array([frame.energy if frame.energy is not None else 0.0]),
            "stress": (frame.stress if has_stress else np.zeros((3, 3)))[None],
            "weight_energy": np.array([float(frame.energy is not None)]),
            "weight_forces": np.array([float(frame.forces is not None)]),
            "weight_stress": np.array([float(has_stress)]),
            "charge": np.array([frame.charge]),
            "dipole": (frame.dipole if has_dipole else np.zeros(3))[None],
            "weight_dipole": np.array([float(has_dipole)]),
            "weight_charges": np.array([float(frame.charges is not None)]),
        },
        senders=senders,
        receivers=receivers,
        n_node=np.array([n], dtype=np.int32),
        n_edge=np.array([len(senders)], dtype=np.int32),
    )


def bucket_size(x: int, minimum: int = 8, per_doubling: int = 4) -> int:
    """Round up to a coarse grid with `per_doubling` sizes per factor of two
    (4: ≤25% padding; 1: powers of two, ≤50% padding but fewer distinct shapes).

    A bounded set of sizes keeps the number of compiled XLA programs small.
    """
    x = max(int(x), minimum)
    step = 2 ** max(int(math.floor(math.log2(x))) - int(math.log2(per_doubling)), 0)
    return int(math.ceil(x / step) * step)


def pad_graph(graph: jraph.GraphsTuple, n_node: int, n_edge: int, n_graph: int) -> jraph.GraphsTuple:
    """Pad a batch to exactly (n_node, n_edge, n_graph) with one padding graph at the end.

    Requires n_node > sum(graph.n_node), n_edge >= sum(graph.n_edge), n_graph > len(graph.n_node).
    """
    real_nodes = int(graph.n_node.sum())
    real_edges = int(graph.n_edge.sum())
    real_graphs = len(graph.n_node)
    if n_node <= real_nodes or n_edge < real_edges or n_graph <= real_graphs:
        raise ValueError(
            f"cannot pad ({real_nodes} nodes, {real_edges} edges, {real_graphs} graphs) "
            f"to ({n_node}, {n_edge}, {n_graph})"
        )

    def pad(x: np.ndarray, n: int) -> np.ndarray:  # zeros, and False for masks
        out = np.zeros((n,) + x.shape[1:], dtype=x.dtype)
        out[: len(x)] = x
        return out

    pad_n_node = np.zeros(n_graph - real_graphs, dtype=np.int32)
    pad_n_node[0] = n_node - real_nodes
    pad_n_edge = np.zeros(n_graph - real_graphs, dtype=np.int32)
    pad_n_edge[0] = n_edge - real_edges
    # Padding edges connect the first padding node to itself: they stay inside the padding graph.
    padding_node = np.full(n_edge - real_edges, real_nodes, dtype=np.int32)
    return jraph.GraphsTuple(
        nodes={k: pad(v, n_node) for k, v in graph.nodes.items()},
        edges={k: pad(v, n_edge) for k, v in graph.edges.items()},
        globals={k: pad(v, n_graph) for k, v in graph.globals.items()},
        senders=np.concatenate([graph.senders, padding_node]).astype(np.int32),
        receivers=np.concatenate([graph.receivers, padding_node]).astype(np.int32),
        n_node=np.concatenate([graph.n_node, pad_n_node]).astype(np.int32),
        n_edge=np.concatenate([graph.n_edge, pad_n_edge]).astype(np.int32),
    )


def batch_and_pad(
    graphs: Sequence[jraph.GraphsTuple], n_graph: int | None = None, per_doubling: int = 4
) -> jraph.GraphsTuple:
    """Concatenate graphs and pad to bucketed sizes (n_graph defaults to len(graphs) + 1)."""
    batch = jraph.batch_np(list(graphs))
    n_node = bucket_size(int(batch.n_node.sum()) + 1, per_doubling=per_doubling)
    n_edge = bucket_size(int(batch.n_edge.sum()), per_doubling=per_doubling)
    return pad_graph(batch, n_node, n_edge, n_graph or len(graphs) + 1)


def graph_sizes(graphs: Sequence[jraph.GraphsTuple]) -> tuple[np.ndarray, np.ndarray]:
    """(n_node, n_edge) of each graph; a `CachedDataset` gives its stored sizes (reads no graph)."""
    if hasattr(graphs, "n_node"):
        return np.asarray(graphs.n_node), np.asarray(graphs.n_edge)
    return np.array([int(g.n_node.sum()) for g in graphs], dtype=int), np.array([int(g.n_edge.sum()) for g in graphs], dtype=int)


def batch_of(graphs: Sequence[jraph.GraphsTuple], indices: Sequence[int]) -> jraph.GraphsTuple:
    """The graphs at `indices` as one unpadded batch (a `CachedDataset` reads them in one
    go); no indices: an empty graph with the same fields."""
    if hasattr(graphs, "batch"):
        return graphs.batch(indices)
    if len(indices) == 0:
        return empty_graph(graphs[0])
    return jraph.batch_np([graphs[int(i)] for i in indices])


def fixed_batch_shape(graphs: Sequence[jraph.GraphsTuple], batch_size: int) -> tuple[int, int]:
    """(n_node, n_edge) that fits any `batch_size` graphs of `graphs`: one shape, one compile.

    Sized from the largest graph, so datasets of similar-sized frames waste little padding.
    """
    n_node, n_edge = graph_sizes(graphs)
    return bucket_size(batch_size * int(n_node.max()) + 1), bucket_size(max(batch_size * int(n_edge.max()), 1))


def iterate_batches(
    graphs: Sequence[jraph.GraphsTuple],
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    shape: tuple[int, int] | None = None,
    start: int = 0,
) -> Iterator[jraph.GraphsTuple]:
    """Padded batches of `batch_size` graphs (the last may hold fewer), all with n_graph = batch_size + 1.

    With `shape` = (n_node, n_edge) every batch is padded to exactly that shape (see
    `fixed_batch_shape`); without it, to bucketed sizes. With `shuffle`, the order is a
    permutation drawn from `seed` (training passes a seed derived from the epoch, so a
    resumed run sees the same order). `start` skips that many batches (resuming mid-epoch).
    """
    order = np.random.default_rng(seed).permutation(len(graphs)) if shuffle else np.arange(len(graphs))
    for first in range(start * batch_size, len(graphs), batch_size):
        batch = batch_of(graphs, order[first : first + batch_size])
        n_node, n_edge = shape or (bucket_size(int(batch.n_node.sum()) + 1), bucket_size(int(batch.n_edge.sum())))
        yield pad_graph(batch, n_node, n_edge, batch_size + 1)


def plan_steps(
    n_node: np.ndarray,
    n_edge: np.ndarray,
    order: np.ndarray,
    n_devices: int = 1,
    batch_size: int | None = None,
    max_nodes: int | None = None,
    max_edges: int | None = None,
    open_window: int = 8,
) -> list[list[list[int]]]:
    """Which graphs go where: `steps[s][d]` lists the graph indices of device d at step s.

    By count (no budgets): each step takes the next `batch_size` graphs of `order` (the
    global batch) and splits them into `n_devices` contiguous parts of ⌈batch_size /
    n_devices⌉. By size (`max_nodes` and/or `max_edges`, per device): graphs are taken in
    `order` and put into the first of `open_window` open batches with room left under both
    budgets (and under `batch_size` graphs, when given); consecutive device batches form a
    step, the last step filled with empty ones. Every process computes the same plan
    from the same sizes and order.
    """
    order = [int(i) for i in order]
    if max_nodes is None and max_edges is None:
        if batch_size is None:
            raise ValueError("plan_steps needs batch_size or a node/edge budget")
        part = -(-batch_size // n_devices)
        return [
            [order[first + d * part : min(first + (d + 1) * part, first + batch_size)] for d in range(n_devices)]
            for first in range(0, len(order), batch_size)
        ]
    max_nodes = max_nodes or np.iinfo(np.int64).max
    max_edges = max_edges or np.iinfo(np.int64).max
    # First fit over a few open batches: a graph that does not fit one goes into the next
    # (a small frame fills the gap a large one left); the oldest closes when too many are open.
    device_batches, open_batches = [], []  # open: [indices, nodes, edges]
    for i in order:
        for batch in open_batches:
            fits = batch[1] + n_node[i] <= max_nodes and batch[2] + n_edge[i] <= max_edges
            if fits and (batch_size is None or len(batch[0]) < batch_size):
                batch[0].append(i)
                batch[1], batch[2] = batch[1] + int(n_node[i]), batch[2] + int(n_edge[i])
                break
        else:
            if len(open_batches) == open_window:
                device_batches.append(open_batches.pop(0)[0])
            open_batches.append([[i], int(n_node[i]), int(n_edge[i])])
    device_batches += [batch[0] for batch in open_batches]
    device_batches += [[] for _ in range(-len(device_batches) % n_devices)]
    return [device_batches[k : k + n_devices] for k in range(0, len(device_batches), n_devices)]


def step_shape(
    step: list[list[int]],
    n_node: np.ndarray,
    n_edge: np.ndarray,
    max_nodes: int | None = None,
    max_edges: int | None = None,
    per_doubling: int = 4,
) -> tuple[int, int]:
    """(n_node, n_edge) that fits every device batch of a step: the budget itself where
    one is given (one shape, one compiled program, whatever the step holds), else the
    coarse grid of `bucket_size`; a frame larger than a budget gets a bucketed shape."""
    nodes = max(int(n_node[batch].sum()) for batch in step) if step else 0
    edges = max(int(n_edge[batch].sum()) for batch in step) if step else 0
    node_shape = max_nodes + 1 if max_nodes is not None and nodes <= max_nodes else bucket_size(nodes + 1, per_doubling=per_doubling)
    edge_shape = max_edges if max_edges is not None and edges <= max_edges else bucket_size(max(edges, 1), per_doubling=per_doubling)
    return node_shape, edge_shape


def empty_graph(like: jraph.GraphsTuple) -> jraph.GraphsTuple:
    """A graph with no nodes or edges and the same fields as `like` (a device with nothing to do this step)."""
    empty = lambda x: np.zeros((0,) + np.shape(x)[1:], dtype=np.asarray(x).dtype)
    return jax.tree_util.tree_map(empty, like)
