"""The training loop: `setup(config)` builds everything, `train(config)` runs it.

`setup` reads and checks the data, computes the statistics (E0, scale, neighbors),
builds the potential, optimiser, state and the jitted step: benchmarks and notebooks
reuse it. `train` adds the run folder and the epochs: shuffled padded batches → jitted
step (loss → grads → optax → EMA) → validation with the EMA parameters → metrics.csv row
→ model/ folder when validation improved → orbax checkpoint.

`train.max_time` is checked after every step. On stopping, the run validates, saves the
best model and a checkpoint, including the position inside the epoch: `--resume`
continues from that batch with the same optimiser state, EMA and data order (the shuffle
of epoch k depends only on the seed and k).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import jraph
import numpy as np
import optax
from tqdm.auto import tqdm

from mpnn.config import LOSS_TERMS, Config, TrainConfig, loss_weights, lr_multiplier, save_config
from mpnn.data.dataset import Splits, e0_from_config, label_warnings, load_splits
from mpnn.data.frames import DataError, Frame
from mpnn.data.graphs import (
    batch_of, bucket_size, fixed_batch_shape, frame_to_graph, graph_sizes, iterate_batches, pad_graph, plan_steps, step_shape,
)
from mpnn.data import cache, statistics
from mpnn.evaluate import error_totals, format_metrics, make_error_fn, save_predictions
from mpnn.models import MODELS
from mpnn.potential import CountedJit, Potential, build_potential, cast_graph, energy_and_derivatives, graph_cells
from mpnn.saved_model import save_model
from mpnn.training.checkpoint import Checkpointer
from mpnn.training.tensorboard import MetricsWriter
from mpnn.training import parallel
from mpnn.training.loss import ERROR_KEYS, METRICS, combine_loss, loss_sums, summarise
from mpnn.training.optimizer import learning_rate_schedule, make_optimizer

log = logging.getLogger("mpnn")


@flax.struct.dataclass
class TrainState:
    params: dict
    opt_state: optax.OptState
    ema: dict  # exponential moving average of params: used for validation and saving
    best: dict  # EMA params of the best validation epoch so far
    step: jnp.ndarray


def energy_scaling(config: Config, frames, numbers: list[int], stats=statistics) -> tuple[np.ndarray, float, float]:
    """E0 per element, scale and shift from the training frames (see README, "Energy scaling").
    `frames`: a list of Frames (`stats` = `mpnn.data.statistics`) or a `CachedDataset`
    (`stats` = `mpnn.data.cache`, which streams the same statistics from disk).

    With fitted E0 the mean residual is zero by construction, so shift = 0 and a lone
    atom's energy is exactly its E0. With E0 given, shift = mean residual per atom.
    """
    model = config.model
    if model.e0 == "fit":
        e0, shift = stats.fit_e0(frames, numbers), 0.0
    elif isinstance(model.e0, dict):
        e0 = e0_from_config(model.e0, numbers)
        shift = float(np.mean(stats.residual_per_atom(frames, e0, numbers)))
    else:
        raise ValueError(f"model.e0 must be 'fit' or a mapping element → eV, got {model.e0!r}")
    if isinstance(model.scale, float):
        scale = model.scale
    elif model.scale == "forces_rms":
        scale = stats.forces_rms(frames)
    elif model.scale == "energy_std":
        scale = float(np.std(stats.residual_per_atom(frames, e0, numbers)))
    else:
        raise ValueError(f"model.scale must be a number, 'forces_rms' or 'energy_std', got {model.scale!r}")
    return e0, (scale if scale > 0 else 1.0), shift


def without_fixed_terms(potential: Potential, frames: list[Frame], graphs: list[jraph.GraphsTuple]) -> list[Frame]:
    """Frames whose energy and forces have the pair terms' share (ZBL) removed: what the
    learned term has to fit. `graphs` are the frames' graphs (their neighbor lists are
    reused). Unchanged when the potential has no pair terms."""
    if not potential.pair_terms:
        return list(frames)
    # No learned term and E0 = 0: the potential's energy is its pair terms alone.
    zero = {"model": {}, "scale": np.zeros(()), "shift": np.zeros(()), "e0": np.zeros(len(potential.numbers))}
    fixed = potential.replace(model=None, variables=zero, global_terms=())
    energies, forces = [], []
    for batch in iterate_batches(graphs, 32):
        out = jax.device_get(fixed.predict_graph(batch))
        real = batch.globals["mask"]
        energies += list(out["energy"][real])
        forces += np.split(out["forces"], np.cumsum(batch.n_node))[: int(real.sum())]
    return [
        dataclasses.replace(
            frame,
            energy=None if frame.energy is None else frame.energy - float(e),
            forces=None if frame.forces is None else frame.forces - f,
        )
        for frame, e, f in zip(frames, energies, forces)
    ]


def make_train_step(potential: Potential, tx: optax.GradientTransformation, config: Config, mesh=None):
    """The jitted training step.

    Without `mesh` the step takes one padded batch. With a mesh it takes a batch with a
    leading device axis sharded over the mesh (`parallel.global_batch`) and replicated
    state: each device sums its loss terms and their normalisers, the normalisers are
    summed over devices before dividing and the gradients after, so the update equals one
    device's on the whole global batch.
    """
    # Terms with a weight in either stage enter the loss; the weights themselves are
    # arguments, so stage two changes them without recompiling.
    used = {k for k in LOSS_TERMS if config.train.stage_two_weights.get(k, 0.0) > 0 or loss_weights(config.train, 1)[k] > 0}
    fixed = {k: v for k, v in potential.variables.items() if k != "model"}
    ema_decay = config.train.ema_decay
    huber_delta = config.train.huber_delta if config.train.loss == "huber" else None
    axis = None if mesh is None else parallel.AXIS

    def local_loss_and_grads(params, graph, weights):
        def loss_of(params):
            pred = energy_and_derivatives(potential, {**fixed, "model": params}, graph)
            sums = loss_sums(pred, graph, used, huber_delta)
            if axis is not None:  # the normalisers of the whole global batch
                sums = {k: (total, jax.lax.psum(count, axis)) for k, (total, count) in sums.items()}
            return combine_loss(sums, weights)

        loss, grads = jax.value_and_grad(loss_of)(params)
        if axis is not None:
            loss, grads = jax.lax.psum((loss, grads), axis)
        return loss, grads

    loss_and_grads = local_loss_and_grads
    if mesh is not None:
        per_device = lambda params, graph, weights: local_loss_and_grads(
            params, jax.tree_util.tree_map(lambda x: x[0], graph), weights  # this device's [1, ...] block
        )
        replicated, split = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(parallel.AXIS)
        # check_vma off: the psums above are written out, not inferred.
        loss_and_grads = jax.shard_map(
            per_device, mesh=mesh, in_specs=(replicated, split, replicated), out_specs=(replicated, replicated), check_vma=False
        )

    def train_step(state: TrainState, graph, lr_scale, weights: dict):
        """(state, padded batch, lr multiplier, loss weights {term: scalar}) → (new state,
        loss, finite). A step whose loss or gradients are not finite changes nothing but
        the step count."""
        loss, grads = loss_and_grads(state.params, graph, weights)
        finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        updates = jax.tree_util.tree_map(lambda u: u * lr_scale.astype(u.dtype), updates)
        params = optax.apply_updates(state.params, updates)
        # Warm-up of the EMA decay so early averages are not dominated by the initialisation.
        decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step)).astype(loss.dtype)
        # e + (1 − d)(p − e), not d·e + (1 − d)·p: a parameter that does not move (frozen)
        # keeps its EMA bit for bit.
        ema = jax.tree_util.tree_map(lambda e, p: e + (1 - decay) * (p - e), state.ema, params)
        new = state.replace(params=params, opt_state=opt_state, ema=ema)
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, state)  # a bad step: keep the old state
        return new.replace(step=state.step + 1), loss, finite

    return CountedJit(train_step, donate_argnums=0)


def _prepare_run_dir(config: Config, create: bool = True) -> Path:
    """Refuse to overwrite a run unless told to; with `create`, empty and create the folder.
    (Every process checks, so that all stop together; only the first creates.)"""
    run_dir = Path(config.run.dir)
    if run_dir.exists() and not config.run.resume and any(run_dir.iterdir()):
        if not config.run.overwrite:
            raise FileExistsError(
                f"{run_dir} already holds a run: pass --resume to continue it, "
                f"run.overwrite=true to replace it, or choose another run.dir"
            )
        if create:
            shutil.rmtree(run_dir)
    if create:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _truncate_metrics(path: Path, last_epoch: int) -> None:
    """On resume, drop rows written after the last completed epoch of the checkpoint
    (including the row of an epoch that stopped part-way, which is redone)."""
    if not path.exists():
        return
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if int(r["epoch"]) <= last_epoch)


def _append_metrics(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


@dataclasses.dataclass
class Setup:
    """Everything a training run needs before its first step."""

    config: Config
    splits: Splits | None  # the frames (None with data.cache_dir)
    numbers: list[int]
    # lists of graphs, or `CachedDataset`s (data.cache_dir) that read them from disk
    train_graphs: Sequence[jraph.GraphsTuple]
    valid_graphs: Sequence[jraph.GraphsTuple]
    test_graphs: Sequence[jraph.GraphsTuple]
    potential: Potential
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    state: TrainState
    train_step: CountedJit
    error_fn: CountedJit
    steps_per_epoch: int  # by size (train.batch_nodes/batch_edges): epoch 1's; later epochs vary slightly
    mesh: jax.sharding.Mesh  # the devices of the data-parallel training step
    train_shape: tuple[int, int] | None  # (n_node, n_edge) of every device's training batch; None: by size, per step
    graphs_per_device: int  # n_graph of every device's training batch is this + 1 (padding)
    train_sizes: tuple[np.ndarray, np.ndarray]  # (n_node, n_edge) of each training graph
    eval_shape: tuple[int, int]  # (n_node, n_edge) of every evaluation batch
    n_parameters: int

    @property
    def n_compiles(self) -> int:
        return self.train_step.n_compiles + self.error_fn.n_compiles

    def evaluate(self, graphs, variables: dict | None = None, potential: Potential | None = None) -> dict:
        """Metrics of `graphs` (default parameters: the potential's). With several processes
        each evaluates its share and the error sums are added: all get the same numbers."""
        share = graphs[jax.process_index() :: jax.process_count()]
        totals = error_totals(
            potential or self.potential, share, self.config.train.eval_batch_size, variables, self.error_fn, self.eval_shape
        )
        totals = parallel.sum_over_processes({k: totals.get(k, 0.0) for k in ERROR_KEYS})
        return summarise(totals, len(graphs))

    def with_params(self, params: dict) -> Potential:
        """The potential with other model parameters (EMA, best; replicated ones are
        taken from this process's first device)."""
        return self.potential.replace(variables={**self.potential.variables, "model": parallel.to_local(params)})

    def plan(self, epoch: int) -> list[list[list[int]]]:
        """steps[s][d]: indices into train_graphs of device d's batch at step s of `epoch`."""
        return epoch_plan(self.config, self.train_sizes, self.mesh.size, epoch)

    def batch(self, step: list[list[int]]) -> tuple[jraph.GraphsTuple, tuple[int, int]]:
        """The padded batch of a step (leading device axis, sharded over the mesh; this
        process builds only its own devices' parts) and its (n_node, n_edge) per device."""
        train = self.config.train
        shape = self.train_shape or step_shape(step, *self.train_sizes, train.batch_nodes, train.batch_edges)
        parts = []
        for slot in parallel.local_device_slots(self.mesh):
            batch = batch_of(self.train_graphs, step[slot])
            parts.append(cast_graph(pad_graph(batch, *shape, self.graphs_per_device + 1), self.potential.np_dtype))
        return parallel.global_batch(parts, self.mesh), shape


def setup(config: Config) -> Setup:
    """Data (read, validated, split, graphs), statistics, potential, optimiser and state.

    With train.init_from (fine-tuning) the saved model brings its model section, its
    elements (frames with other elements are refused: the model has no embedding for
    them), its parameters, scale and neighbor normalisation; E0 is refitted per
    model.e0 for the elements the new data contains, the saved E0 kept for the others.
    """
    base = None
    if config.train.init_from:
        from mpnn.saved_model import load_model

        base = load_model(config.train.init_from, dtype=config.model.dtype)
        saved_model = dataclasses.replace(base.config.model, dtype=config.model.dtype)
        if saved_model != config.model:
            log.warning("train.init_from: the model section of this config is replaced by the saved model's")
        config = dataclasses.replace(config, model=saved_model)
        log.info("fine-tuning from %s (%s, elements %s)", config.train.init_from, config.model.name, list(base.numbers))
    known = list(base.numbers) if base else None
    if config.data.cache_dir:  # graphs read from an HDF5 cache on disk, batch by batch
        splits = None
        train_graphs, valid_graphs, test_graphs, seen_numbers = _cached_splits(config, known)
        numbers = known or seen_numbers
        stats = cache  # the statistics below, streamed from the cache
    else:
        splits = load_splits(config.data, config.train, known_numbers=known)
        for message in label_warnings(splits, config.data, config.train):
            log.warning(message)
        if config.model.long_range:
            for frame in [*splits.train, *splits.valid, *splits.test]:
                if frame.pbc.any() and not frame.pbc.all():
                    raise DataError(
                        f"{frame.source}: pbc={frame.pbc.tolist()}; model.long_range needs frames periodic in all three "
                        "directions or none"
                    )
        seen_numbers = splits.numbers
        numbers = known or seen_numbers
        species_index = {z: k for k, z in enumerate(numbers)}
        to_graphs = lambda frames: [frame_to_graph(f, config.model.cutoff, species_index) for f in frames]
        train_graphs, valid_graphs, test_graphs = to_graphs(splits.train), to_graphs(splits.valid), to_graphs(splits.test)
        stats = statistics
    if base:
        potential = base.replace(config=config)
        avg_neighbors = float(base.model.avg_num_neighbors)
    else:
        avg_neighbors = stats.average_num_neighbors(train_graphs)
        potential = build_potential(config.model, numbers, avg_neighbors, seed=config.seed, config=config)
        fit_statistics = MODELS[config.model.name].fit_statistics
        if fit_statistics is not None:  # e.g. BPNN's descriptor standardisation
            model_params = fit_statistics(potential.model, potential.variables["model"], train_graphs)
            potential = potential.replace(variables={**potential.variables, "model": model_params})
    # The learned term fits what the fixed terms (ZBL) leave: its statistics come from that.
    learned_share = train_graphs if splits is None else without_fixed_terms(potential, splits.train, train_graphs)
    e0, scale, shift = energy_scaling(config, learned_share, numbers, stats)
    if base:  # keep what the parameters were trained with; E0 only for elements seen now
        seen = set(seen_numbers)
        e0 = np.where([z in seen for z in numbers], e0, np.asarray(base.variables["e0"]))
        scale = float(base.variables["scale"])
    potential = potential.replace(
        variables={**potential.variables, "e0": jnp.asarray(e0), "scale": jnp.asarray(scale), "shift": jnp.asarray(shift)}
    )
    log.info(
        "data: %d train / %d valid / %d test frames; elements %s; E0 %s eV; scale %.4g; shift %.4g; "
        "avg neighbors %.2f",
        len(train_graphs), len(valid_graphs), len(test_graphs), numbers, np.round(e0, 4).tolist(), scale, shift, avg_neighbors,
    )
    # Global terms size themselves (Ewald grids) for every cell they will see: one compile.
    potential = potential.covering(np.concatenate([_cells(g) for g in (train_graphs, valid_graphs, test_graphs)]))
    if config.model.long_range:
        log.info("long range: %s (Gaussian charges, sigma %.2f Å)", config.model.long_range, config.model.charge_sigma)
    if config.model.pair_repulsion:
        log.info("pair repulsion: %s (%.2f–%.2f Å switch)", config.model.pair_repulsion, config.model.zbl_r_inner, config.model.zbl_r_outer)

    mesh = parallel.make_mesh(config.train.n_devices)
    train_sizes = graph_sizes(train_graphs)
    train_shape, graphs_per_device = _training_shapes(config.train, train_graphs, train_sizes, mesh.size)
    steps_per_epoch = len(epoch_plan(config, train_sizes, mesh.size, 1))
    params = potential.variables["model"]
    tx = make_optimizer(config.train, steps_per_epoch, params)
    state = TrainState(params, tx.init(params), params, params, jnp.array(0))
    state = parallel.replicate(state, mesh)  # own copies on every device: the step donates its input
    return Setup(
        config=config,
        splits=splits,
        numbers=numbers,
        train_graphs=train_graphs,
        valid_graphs=valid_graphs,
        test_graphs=test_graphs,
        potential=potential,
        optimizer=tx,
        schedule=learning_rate_schedule(config.train, steps_per_epoch),
        state=state,
        train_step=make_train_step(potential, tx, config, mesh),
        error_fn=make_error_fn(potential),
        steps_per_epoch=steps_per_epoch,
        mesh=mesh,
        # By count, one padded shape for all training batches and one for all evaluation:
        # two compilations. By size, a few shapes of the bucket grid.
        train_shape=train_shape,
        graphs_per_device=graphs_per_device,
        train_sizes=train_sizes,
        eval_shape=tuple(  # fits every split (bucket_size is monotonic: the max of shapes is a shape)
            max(sizes) for sizes in zip(*(fixed_batch_shape(g, config.train.eval_batch_size) for g in (train_graphs, valid_graphs, test_graphs) if len(g)))
        ),
        n_parameters=sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)),
    )


def _cached_splits(config: Config, known_numbers: list[int] | None):
    """(train, valid, test) `CachedDataset`s of data.train (split as `load_splits` splits
    frames) and data.valid / data.test, each file preprocessed once into data.cache_dir,
    checked as `load_splits` checks frames; and the elements of the training set."""
    data, train = config.data, config.train
    if config.model.pair_repulsion:
        raise DataError("data.cache_dir: model.pair_repulsion is not supported with the on-disk cache yet; train in memory")
    keys = dict(energy_key=data.energy_key, forces_key=data.forces_key, stress_key=data.stress_key, virial_key=data.virial_key)
    open_cached = lambda spec: cache.CachedDataset(
        cache.build_cache(spec, config.model.cutoff, data.cache_dir, **keys, min_distance=data.min_distance, progress=train.progress)
    )
    if jax.process_count() > 1:  # the first process builds the caches, the others then open them
        if jax.process_index() == 0:
            for spec in (data.train, data.valid, data.test):
                if spec is not None:
                    open_cached(spec)
        parallel.barrier("data cache built")
    whole = open_cached(data.train)
    if data.max_frames is not None:
        whole = whole.subset(np.arange(min(data.max_frames, len(whole))))
    train_set, valid_set, test_set = cache.split_dataset(
        whole, data.valid_fraction if data.valid is None else 0.0, data.test_fraction if data.test is None else 0.0, data.split_seed
    )
    valid_set = open_cached(data.valid) if data.valid is not None else valid_set
    test_set = open_cached(data.test) if data.test is not None else test_set
    if not len(train_set):
        raise DataError(f"{data.train}: no training frames left after the split")
    numbers = known_numbers or train_set.numbers
    species_index = {z: k for k, z in enumerate(numbers)}
    splits = tuple(d.with_species_index(species_index) for d in (train_set, valid_set, test_set))
    for d in splits:
        cache.check_dataset(d, train.energy_weight > 0, train.forces_weight > 0, numbers)
        if config.model.long_range and (d.pbc.any(axis=1) & ~d.pbc.all(axis=1)).any():
            raise DataError(f"{data.train}: model.long_range needs frames periodic in all three directions or none")
    log.info("data cache: %s", whole.path)
    return (*splits, train_set.numbers)


def _cells(graphs) -> np.ndarray:
    """Cells [n, 3, 3] Å of the frames (zeros without periodicity), for `Potential.covering`."""
    if isinstance(graphs, cache.CachedDataset):
        return np.where(graphs.pbc.any(axis=1)[:, None, None], graphs.cells, 0.0) if len(graphs) else np.zeros((0, 3, 3))
    return graph_cells(graphs)


def epoch_plan(config: Config, train_sizes: tuple[np.ndarray, np.ndarray], n_devices: int, epoch: int) -> list[list[list[int]]]:
    """steps[s][d]: indices of the training graphs of device d at step s of `epoch`, in an
    order shuffled by a seed derived from the epoch alone (a resumed run, and every
    process of a distributed one, computes the same plan)."""
    train = config.train
    order = np.random.default_rng(config.seed * 100_003 + epoch).permutation(len(train_sizes[0]))
    by_size = train.batch_nodes is not None  # (an edge budget needs a node budget)
    return plan_steps(*train_sizes, order, n_devices, None if by_size else train.batch_size, train.batch_nodes, train.batch_edges)


def _training_shapes(
    train: TrainConfig, graphs: list[jraph.GraphsTuple], sizes: tuple[np.ndarray, np.ndarray], n_devices: int
) -> tuple[tuple[int, int] | None, int]:
    """(fixed (n_node, n_edge) per device batch or None when batching by size, graphs per
    device batch at most). By size, a frame larger than a budget gets a batch of its own."""
    n_node, n_edge = sizes
    if train.batch_nodes is None:  # by count (TrainConfig: an edge budget needs a node budget)
        per_device = -(-train.batch_size // n_devices)
        return fixed_batch_shape(graphs, per_device), per_device
    for key, largest in (("batch_nodes", int(n_node.max())), ("batch_edges", int(n_edge.max()))):
        budget = getattr(train, key)
        if budget is not None and budget < largest:
            log.warning("train.%s=%d is below the largest training frame (%d): such frames go alone in larger batches", key, budget, largest)
    return None, bucket_size(min(len(graphs), train.batch_nodes // max(int(n_node.min()), 1)), per_doubling=1)


def train(config: Config) -> dict:
    """Train as configured; returns the results dict also written to RUN/results.json.

    On several processes (run.distributed) every process runs this; the first one writes
    the run folder's files, all take part in the checkpoints."""
    primary = jax.process_index() == 0
    # Every process checks the folder (so that all stop together on a refusal) before the
    # first one creates it: a later process would otherwise find the fresh run and refuse.
    run_dir = _prepare_run_dir(config, create=False)
    parallel.barrier("run folder checked")
    if primary:  # only the first process: another one checking again could see its fresh run
        _prepare_run_dir(config)
        save_config(config, run_dir / "config.yaml")
    parallel.barrier("run folder ready")
    s = setup(config)
    config = s.config  # fine-tuning takes the saved model's model section
    log.info(
        "model %s: %d parameters; %d device(s) (%s) in %d process(es)",
        config.model.name, s.n_parameters, s.mesh.size, s.mesh.devices.flat[0].platform, jax.process_count(),
    )
    state = s.state
    # epoch: last completed epoch; batches_done: steps already taken in epoch + 1 (a stop mid-epoch)
    meta = {
        "epoch": 0, "batches_done": 0, "elapsed": 0.0, "best_valid": None, "best_epoch": None,
        # plateau schedule and early stopping: lr multiplier, last significant best, epochs since
        "lr_scale": 1.0, "plateau_best": None, "stale_epochs": 0, "plateau_epochs": 0, "skipped_steps": 0,
    }

    def write_row(row: dict) -> None:
        if primary:
            _append_metrics(run_dir / "metrics.csv", row)
            tensorboard.write(row, step=row["step"])

    checkpointer = Checkpointer(run_dir / "checkpoints", keep=config.train.keep_checkpoints)
    if config.run.resume and checkpointer.latest_step() is not None:
        defaults = dict(meta)
        state, meta = checkpointer.restore(checkpointer.latest_step(), state)
        meta = {**defaults, **meta}  # checkpoints of older versions lack the newer keys
        if primary:
            _truncate_metrics(run_dir / "metrics.csv", meta["epoch"])
            # model/ may be ahead of the checkpoint (killed between the two writes): make them agree.
            save_model(s.with_params(state.best), run_dir / "model")
        log.info("resumed after epoch %d + %d steps (%.0f s trained)", meta["epoch"], meta["batches_done"], meta["elapsed"])
    elif config.run.resume:
        log.warning("%s: no checkpoint to resume from; starting from scratch", run_dir)
        if primary:
            (run_dir / "metrics.csv").unlink(missing_ok=True)

    # A resumed run writes again the rows after its checkpoint (a partly done epoch's too):
    # TensorBoard hides the earlier events from that step on.
    purge_step = int(state.step) + (meta["batches_done"] == 0) if meta["epoch"] or meta["batches_done"] else 0
    tensorboard = MetricsWriter(run_dir, purge_step=purge_step if config.run.resume else None) if primary else None
    eval_graphs = s.valid_graphs or s.train_graphs  # no validation set: select on training error
    dtype = s.potential.np_dtype
    max_time = config.train.max_time

    if meta["epoch"] == 0 and meta["batches_done"] == 0:
        # Epoch 0: the untrained model, the baseline every later row is compared with.
        compiles_before = s.n_compiles
        initial = s.evaluate(eval_graphs, potential=s.with_params(state.ema))
        write_row(_metrics_row(0, 0, 0.0, 0.0, float(s.schedule(0)), float("nan"), initial, s.n_compiles - compiles_before, (0.0, 0.0)))
        log.info("epoch 0 (untrained)  valid %s", format_metrics(initial))

    # --- epochs -----------------------------------------------------------------------
    start_time = time.perf_counter() - meta["elapsed"]
    started = meta["epoch"] > 0 or meta["batches_done"] > 0
    out_of_time = max_time is not None and started and meta["elapsed"] >= max_time  # a resumed run already done
    epoch = meta["epoch"]
    while not out_of_time and epoch < config.train.max_epochs:
        epoch += 1
        epoch_start = time.perf_counter()
        compiles_before = s.n_compiles
        skip = meta["batches_done"] if epoch == meta["epoch"] + 1 else 0
        plan = s.plan(epoch)
        show = config.train.progress and primary
        # Batches are read, padded and sent to the devices on a background thread, ahead of the step.
        batches = cache.prefetch(((step, *s.batch(step)) for step in plan[skip:]), size=2)
        bar = tqdm(batches, total=len(plan) - skip, desc=f"epoch {epoch}", disable=not show, leave=False)
        losses, finite = [], []
        real, padded = np.zeros(2), np.zeros(2)  # (nodes, edges) of the training batches
        lr_scale = jnp.asarray(lr_multiplier(config.train, epoch, meta["lr_scale"]), dtype)
        weights = {k: jnp.asarray(v, dtype) for k, v in loss_weights(config.train, epoch).items()}
        if epoch == config.train.stage_two_epoch:
            rate = "" if config.train.stage_two_lr is None else f", learning rate {config.train.stage_two_lr:g}"
            log.info("stage two from epoch %d: loss weights %s%s", epoch, loss_weights(config.train, epoch), rate)
        for step, batch, shape in bar:
            state, loss, ok = s.train_step(state, batch, lr_scale, weights)
            losses.append(loss)
            finite.append(ok)
            members = [i for device in step for i in device]
            real += (s.train_sizes[0][members].sum(), s.train_sizes[1][members].sum())
            padded += (len(step) * shape[0], len(step) * shape[1])
            if len(losses) % 10 == 0:
                _check_bad_steps(finite, epoch, config.train.max_bad_steps)
                recent, ok_recent = jax.device_get((losses[-10:], finite[-10:]))
                bar.set_postfix(loss=f"{np.mean(np.asarray(recent)[np.asarray(ok_recent)]) if any(ok_recent) else float('nan'):.4g}")
            # (several processes agree on the time every 10 steps: a collective per step would stall them)
            check_time = max_time is not None and (jax.process_count() == 1 or len(losses) % 10 == 0)
            if check_time and _elapsed_everywhere(start_time) >= max_time:
                out_of_time = True
                break
        bar.close()
        batches.close()
        _check_bad_steps(finite, epoch, config.train.max_bad_steps)
        batches_done = skip + len(losses)
        finished = batches_done >= len(plan)
        finite = np.asarray(jax.device_get(finite), bool)
        good_losses = np.asarray(jax.device_get(losses))[finite] if losses else np.zeros(0)
        train_loss = float(np.mean(good_losses)) if len(good_losses) else float("nan")
        if (~finite).any():
            meta["skipped_steps"] += int((~finite).sum())
            log.warning("epoch %d: skipped %d steps with a non-finite loss or gradients", epoch, int((~finite).sum()))
        train_time = time.perf_counter() - epoch_start
        padding = tuple(1.0 - real / np.maximum(padded, 1))

        valid_metrics = s.evaluate(eval_graphs, potential=s.with_params(state.ema))
        score = _selection_score(valid_metrics, config)
        improved = meta["best_valid"] is None or score < meta["best_valid"]
        if improved:
            state = state.replace(best=jax.tree_util.tree_map(jnp.copy, state.ema))
            meta.update(best_valid=score, best_epoch=epoch)
        stop_early = _plateau_and_patience(meta, score, config)
        meta.update(
            epoch=epoch if finished else epoch - 1,
            batches_done=0 if finished else batches_done,
            elapsed=time.perf_counter() - start_time,
        )
        row = _metrics_row(
            epoch, int(state.step), meta["elapsed"], train_time, float(s.schedule(int(state.step))) * float(lr_scale), train_loss,
            valid_metrics, s.n_compiles - compiles_before, padding,
        )
        write_row(row)
        log.info(
            "epoch %d%s  loss %.4g  valid %s  (%.1f s, %d compiles, padding %.0f%% nodes %.0f%% edges)", epoch,
            "" if finished else f" (stopped after {batches_done} steps)", train_loss, format_metrics(valid_metrics), train_time,
            row["n_compiles"], 100 * padding[0], 100 * padding[1],
        )
        # model/ first, then the checkpoint: a kill in between leaves a checkpoint whose best
        # parameters resume re-saves into model/.
        if improved and primary:
            save_model(s.with_params(state.best), run_dir / "model")
        last = epoch == config.train.max_epochs or out_of_time or stop_early
        if not finished or epoch % config.train.checkpoint_every == 0 or last:
            checkpointer.save(int(state.step), state, meta)
        if out_of_time:
            log.info("stopping: train.max_time=%.0f s reached in epoch %d", max_time, epoch)
        if stop_early:
            log.info("stopping early: no validation improvement for %d epochs (train.patience)", meta["stale_epochs"])
            break
    checkpointer.close()
    if primary:
        tensorboard.close()

    # --- final evaluation with the best EMA parameters ---------------------------------
    best = s.with_params(state.best)
    if primary and not (run_dir / "model").exists():
        save_model(best, run_dir / "model")
    results = {
        "valid": s.evaluate(s.valid_graphs, potential=best) if s.valid_graphs else None,
        "test": s.evaluate(s.test_graphs, potential=best) if s.test_graphs else None,
        "best_epoch": meta["best_epoch"],
        "epochs": meta["epoch"] + meta["batches_done"] / s.steps_per_epoch,
        "train_time_s": round(meta["elapsed"], 2),
        "n_parameters": s.n_parameters,
        "n_devices": s.mesh.size,
        "n_processes": jax.process_count(),
    }
    if primary:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        if s.test_graphs:  # parity data of `python -m mpnn.plot`; a host copy of the parameters: one process computes
            local_best = best.replace(variables=jax.device_get(best.variables))
            save_predictions(run_dir / "test_predictions.npz", local_best, s.test_graphs, config.train.eval_batch_size, s.eval_shape)
    parallel.barrier("run finished")
    return results


def _elapsed_everywhere(start_time: float) -> float:
    """Seconds since `start_time`; with several processes the first one's, so that all
    stop at the same step."""
    elapsed = time.perf_counter() - start_time
    if jax.process_count() == 1:
        return elapsed
    from jax.experimental import multihost_utils

    parallel.barrier("elapsed")
    return float(multihost_utils.broadcast_one_to_all(np.float32(elapsed)))


def _check_bad_steps(finite: list, epoch: int, max_bad: int) -> None:
    """Stop with a clear message after `max_bad` consecutive skipped (non-finite) steps."""
    recent = np.asarray(jax.device_get(finite[-max_bad:]), bool)
    if len(recent) >= max_bad and not recent.any():
        raise FloatingPointError(
            f"epoch {epoch}: {max_bad} consecutive steps had a non-finite loss or gradients (each was skipped; "
            "train.max_bad_steps); lower train.lr, raise train.clip_norm's strictness or check the data"
        )


def _plateau_and_patience(meta: dict, score: float, config: Config) -> bool:
    """After an epoch's validation: count epochs without a significant (> 1e-4 relative)
    improvement, reduce the lr multiplier on a plateau (schedule "plateau"), and say
    whether to stop early (train.patience)."""
    train = config.train
    if meta["plateau_best"] is None or score < meta["plateau_best"] * (1 - 1e-4):
        meta.update(plateau_best=score, stale_epochs=0, plateau_epochs=0)
    else:
        meta["stale_epochs"] += 1
        meta["plateau_epochs"] += 1
    if train.schedule == "plateau" and meta["plateau_epochs"] >= train.plateau_patience:
        meta["lr_scale"] *= train.plateau_factor
        meta["plateau_epochs"] = 0
        log.info("validation plateau: learning rate × %g (now × %.3g of the schedule)", train.plateau_factor, meta["lr_scale"])
    return train.patience is not None and meta["stale_epochs"] >= train.patience


def _metrics_row(epoch, step, elapsed, train_time, lr, train_loss, valid_metrics, n_compiles, padding) -> dict:
    return {
        "epoch": epoch,
        "step": step,
        "time_s": round(elapsed, 2),
        "epoch_train_s": round(train_time, 2),
        "lr": lr,
        "train_loss": train_loss,
        **{f"valid_{k}": ("" if valid_metrics[k] is None else valid_metrics[k]) for k in METRICS},
        "n_compiles": n_compiles,
        # fraction of the training batches' nodes and edges that were padding
        "padding_nodes": round(float(padding[0]), 4),
        "padding_edges": round(float(padding[1]), 4),
    }


def _selection_score(metrics: dict, config: Config) -> float:
    """Validation score that picks the best epoch: the loss weights applied to RMSEs."""
    score = 0.0
    for key, weight in (
        ("energy_rmse_mev_atom", config.train.energy_weight),
        ("forces_rmse_mev_A", config.train.forces_weight),
        ("stress_rmse_mev_A3", config.train.stress_weight),
    ):
        if metrics[key] is not None and weight > 0:
            score += weight * (metrics[key] / 1000.0) ** 2
    return score
