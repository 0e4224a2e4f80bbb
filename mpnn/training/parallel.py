"""Data parallelism on JAX's own runtime: a 1-D device mesh ("data"), parameters and
optimiser state replicated, each step's batch split into one padded sub-batch per device.

One process or several (`jax.distributed`): every process computes the same plan of
batches (same seed, same sizes), builds the sub-batches of its own devices only, and
`global_batch` assembles them into one array sharded over the mesh. The loss sums and
their normalisers are summed over devices (`mpnn.training.loop.make_train_step`), so any
number of devices gives the update of one device on the same global batch.
"""

from __future__ import annotations

import collections
import logging
import os
from typing import Sequence

import jax
import jraph
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger("mpnn")

AXIS = "data"


def initialize_distributed(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """`jax.distributed.initialize` for a run over several processes (hosts). Arguments
    left None come from the environment as JAX detects it (JAX_COORDINATOR_ADDRESS, SLURM,
    Open MPI, ...). Must run before anything touches a device."""
    if jax.distributed.is_initialized():  # e.g. by the caller
        return
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or not _has_accelerator_plugin():
        # CPU processes exchange gradients through gloo (XLA's CPU collectives).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


# How often each named barrier was entered: ids must be unique, and every process enters
# the same barriers in the same order.
_barrier_counts: collections.Counter = collections.Counter()

BARRIER_TIMEOUT_S = 1800


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Wait for every process (no-op with one), on jax.distributed's coordination service
    rather than through a device collective.

    Why: on CPU the first collective sets up gloo, whose rendezvous gives up after 30 s.
    Processes reach it far apart when one is slower to import, read data or compile (a
    loaded machine, process 0's extra file writing), so a collective is always preceded
    by this barrier, which waits as long as `timeout_s`."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    _barrier_counts[name] += 1
    distributed.global_state.client.wait_at_barrier(f"mpnn:{name}:{_barrier_counts[name]}", int(timeout_s * 1000))


def _has_accelerator_plugin() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"))


def make_mesh(n_devices: int | None = None) -> Mesh:
    """A mesh over the first `n_devices` devices of every process (default: all of them),
    ordered by process so that each process's devices are one contiguous block."""
    per_process = jax.local_device_count() if n_devices is None else n_devices
    if not 1 <= per_process <= jax.local_device_count():
        raise ValueError(f"train.n_devices={n_devices}: this process has {jax.local_device_count()} device(s)")
    devices = []
    for process in range(jax.process_count()):
        mine = sorted((d for d in jax.devices() if d.process_index == process), key=lambda d: d.id)
        devices += mine[:per_process]
    return Mesh(np.array(devices), (AXIS,))


def local_device_slots(mesh: Mesh) -> range:
    """Positions along the mesh axis of this process's devices."""
    slots = [k for k, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
    return range(slots[0], slots[-1] + 1)


def replicate(tree, mesh: Mesh):
    """The same value on every device of the mesh: the first process's, where there are
    several (their own copies could differ in the last bit)."""
    sharding = NamedSharding(mesh, PartitionSpec())
    tree = jax.device_get(tree)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        barrier("replicate")
        tree = multihost_utils.broadcast_one_to_all(tree)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(put, tree)


def global_batch(local_graphs: Sequence[jraph.GraphsTuple], mesh: Mesh) -> jraph.GraphsTuple:
    """This process's padded sub-batches (one per local device, same shapes) → one batch
    with a leading device axis, sharded over the mesh."""
    stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *local_graphs)
    sharding = NamedSharding(mesh, PartitionSpec(AXIS))
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, x), stacked)


def to_local(tree):
    """A replicated array → this process's copy on its first device (for evaluation and
    saving, which run on one device)."""
    return jax.tree_util.tree_map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)


def sum_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Sum per-process numbers (e.g. error sums of each process's share of the
    validation set) so every process gets the same totals."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    keys = sorted(values)
    barrier("sum over processes")
    gathered = multihost_utils.process_allgather(np.array([values[k] for k in keys], dtype=np.float64))
    return dict(zip(keys, np.asarray(gathered).reshape(jax.process_count(), -1).sum(0).tolist()))
