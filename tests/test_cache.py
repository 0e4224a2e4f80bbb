"""The HDF5 dataset cache (mpnn.data.cache): graphs equal to frame_to_graph on real data,
reuse and rebuild by content, multi-file datasets, errors naming file and frame, atomic
writes, views, threads/fork, streamed statistics, prefetch."""

from __future__ import annotations

import dataclasses
import pickle
import shutil
import threading

import ase.io
import numpy as np
import pytest

from mpnn.data import statistics
from mpnn.data.cache import (
    CachedDataset,
    build_cache,
    check_dataset,
    fit_e0,
    forces_rms,
    prefetch,
    residual_per_atom,
    average_num_neighbors,
    source_files,
    split_dataset,
)
from mpnn.data.frames import DataError, read_frames, split_frames
from mpnn.data.graphs import empty_graph, fixed_batch_shape, frame_to_graph, iterate_batches
from mpnn.potential import graph_cells

CUTOFF = 5.0
DATA = {"cu": "data/cu_emt.xyz", "ethanol": "data/ethanol_xtb.xyz", "ion_pairs": "data/ion_pairs.xyz"}


def assert_same_graph(expected, got):
    """Same fields, keys, dtypes, shapes and values."""
    for field in expected._fields:
        a, b = getattr(expected, field), getattr(got, field)
        if isinstance(a, dict):
            assert a.keys() == b.keys(), field
            for key in a:
                assert a[key].dtype == b[key].dtype, (field, key, a[key].dtype, b[key].dtype)
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{field}/{key}")
        else:
            assert a.dtype == b.dtype, (field, a.dtype, b.dtype)
            np.testing.assert_array_equal(a, b, err_msg=field)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """{name: (CachedDataset, frames read by read_frames)} for the three reference files."""
    cache_dir = tmp_path_factory.mktemp("cache")
    return {
        name: (CachedDataset(build_cache(path, CUTOFF, cache_dir, progress=False)), read_frames(path))
        for name, path in DATA.items()
    }


def test_source_files(tmp_path):
    for name in ("b.xyz", "a.extxyz", "notes.txt"):
        (tmp_path / name).write_text("")
    assert source_files(tmp_path) == [tmp_path / "a.extxyz", tmp_path / "b.xyz"]
    assert source_files(tmp_path / "*.xyz") == [tmp_path / "b.xyz"]
    assert source_files(tmp_path / "notes.txt") == [tmp_path / "notes.txt"]
    for spec in (tmp_path / "missing.xyz", tmp_path / "*.json"):
        with pytest.raises(DataError, match=str(spec).replace("*", r"\*")):
            source_files(spec)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: folder holds no"):
        source_files(tmp_path / "empty")


@pytest.mark.parametrize("name", ["cu", "ethanol", "ion_pairs"])
def test_graphs_equal_frame_to_graph(cached, name):
    dataset, frames = cached[name]
    assert len(dataset) == len(frames)
    assert dataset.numbers == sorted({int(z) for f in frames for z in f.numbers})
    species_index = {z: k for k, z in enumerate(dataset.numbers)}
    picks = [0, 7, len(frames) - 1, 3, 7]  # unsorted, with a repeat
    for i, graph in zip(picks, dataset.graphs(picks)):
        assert_same_graph(frame_to_graph(frames[i], CUTOFF, species_index), graph)
    assert_same_graph(frame_to_graph(frames[5], CUTOFF, species_index), dataset[5])
    assert_same_graph(frame_to_graph(frames[-2], CUTOFF, species_index), dataset[-2])
    np.testing.assert_array_equal(dataset.n_node, [f.n_atom for f in frames])
    graphs = dataset.graphs(np.arange(len(dataset)))
    np.testing.assert_array_equal(dataset.cells, graph_cells(graphs))
    assert_same_graph(empty_graph(graphs[0]), dataset.batch([]))  # a device with nothing to do

    frame = dataset.frame(7)
    for field in ("positions", "numbers", "cell", "pbc", "forces", "stress", "dipole", "charges"):
        a, b = getattr(frames[7], field), getattr(frame, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert a.dtype == b.dtype and np.array_equal(a, b), field
    assert (frame.energy, frame.charge, frame.source) == (frames[7].energy, frames[7].charge, frames[7].source)

    # Another species numbering (e.g. a fine-tuned model's elements).
    wider = {z: k + 1 for k, z in enumerate(dataset.numbers)}
    assert_same_graph(frame_to_graph(frames[3], CUTOFF, wider), dataset.with_species_index(wider)[3])


@pytest.mark.parametrize("name", ["cu", "ethanol"])
def test_batches_and_statistics_equal_in_memory(cached, name):
    dataset, frames = cached[name]
    species_index = {z: k for k, z in enumerate(dataset.numbers)}
    graphs = [frame_to_graph(f, CUTOFF, species_index) for f in frames]
    shape = fixed_batch_shape(graphs, 8)
    assert fixed_batch_shape(dataset, 8) == shape  # from the stored sizes
    for kwargs in (dict(shuffle=True, seed=3), dict(shape=shape, shuffle=True, seed=4, start=2)):
        expected = list(iterate_batches(graphs, 8, **kwargs))
        got = list(iterate_batches(dataset, 8, **kwargs))  # one read per batch
        assert len(expected) == len(got)
        for a, b in zip(expected, got):
            assert_same_graph(a, b)

    numbers = dataset.numbers
    np.testing.assert_allclose(fit_e0(dataset, numbers), statistics.fit_e0(frames, numbers), rtol=1e-10)
    e0 = statistics.fit_e0(frames, numbers)
    np.testing.assert_allclose(residual_per_atom(dataset, e0, numbers), statistics.residual_per_atom(frames, e0, numbers), atol=1e-9)
    assert forces_rms(dataset) == pytest.approx(statistics.forces_rms(frames), rel=1e-12)
    assert average_num_neighbors(dataset) == pytest.approx(statistics.average_num_neighbors(graphs), rel=1e-12)
    energies = np.array([f.energy for f in frames])
    np.testing.assert_array_equal(dataset.energies, energies)

    # A split is a view: the frames split_frames picks, same graphs, its own statistics.
    train, valid, test = split_dataset(dataset, 0.3, 0.2, seed=5)
    for view, split in zip((train, valid, test), split_frames(frames, 0.3, 0.2, seed=5)):
        assert [f.source for f in view.frames(np.arange(len(view)))] == [f.source for f in split]
    train_frames = split_frames(frames, 0.3, 0.2, seed=5)[0]
    order = train.indices
    assert len(train) == len(train_frames) and train.numbers == numbers
    assert_same_graph(graphs[order[4]], train[4])
    assert forces_rms(train) == pytest.approx(statistics.forces_rms(train_frames), rel=1e-12)
    np.testing.assert_allclose(fit_e0(train, numbers), statistics.fit_e0(train_frames, numbers), rtol=1e-10)
    minus_fixed = [dataclasses.replace(f, energy=f.energy - 0.5 * f.n_atom) for f in train_frames]  # as without_fixed_terms
    np.testing.assert_allclose(
        fit_e0(train, numbers, train.energies - 0.5 * train.n_node), statistics.fit_e0(minus_fixed, numbers), rtol=1e-10
    )
    shard = train.subset(np.arange(1, len(train), 2))  # e.g. process 1 of 2
    assert_same_graph(graphs[order[3]], shard[1])
    assert_same_graph(graphs[order[5]], train[2:8:3][1])


def test_views_across_threads_and_pickle(cached):
    dataset, frames = cached["cu"]
    species_index = {z: k for k, z in enumerate(dataset.numbers)}
    expected = frame_to_graph(frames[11], CUTOFF, species_index)
    assert_same_graph(expected, dataset[11])  # opens the file in this thread

    results = []
    thread = threading.Thread(target=lambda: results.append(dataset[11]))
    thread.start()
    thread.join()
    assert_same_graph(expected, results[0])
    # (a pickled view, as a worker process receives it, opens the file itself; fork is not
    # tested: JAX's threads make forking this process unsafe)
    assert_same_graph(expected, pickle.loads(pickle.dumps(dataset.subset([11])))[0])


def test_check_dataset(cached):
    dataset, _ = cached["ion_pairs"]
    check_dataset(dataset, need_energy=True, need_forces=True, known_numbers=dataset.numbers)
    with pytest.raises(DataError, match=r"ion_pairs.xyz:frame 0: element\(s\) \['F'\] not known"):
        check_dataset(dataset, need_energy=True, need_forces=True, known_numbers=[1, 3])


def write_frames(path, frames):
    ase.io.write(path, frames, format="extxyz")
    return path


def test_reused_and_rebuilt_by_content_cutoff_and_keys(tmp_path):
    atoms = ase.io.read(DATA["cu"], ":6")
    data = write_frames(tmp_path / "cu.xyz", atoms)
    cache_dir = tmp_path / "cache"
    path = build_cache(data, CUTOFF, cache_dir, progress=False)
    built = path.stat().st_mtime_ns
    assert build_cache(str(data), CUTOFF, cache_dir, progress=False) == path
    assert path.stat().st_mtime_ns == built  # reused, not rewritten
    assert sorted(p.name for p in cache_dir.iterdir()) == [path.name]  # no temporary left

    shutil.copy(data, tmp_path / "moved.xyz")  # same content elsewhere: same cache
    assert build_cache(tmp_path / "moved.xyz", CUTOFF, cache_dir, progress=False) == path

    assert build_cache(data, 4.0, cache_dir, progress=False) != path
    assert build_cache(data, CUTOFF, cache_dir, energy_key="free_energy", progress=False) != path
    atoms[2].positions[0, 0] += 0.01
    write_frames(data, atoms)
    changed = build_cache(data, CUTOFF, cache_dir, progress=False)
    assert changed != path
    assert CachedDataset(changed).frame(2).positions[0, 0] == pytest.approx(atoms[2].positions[0, 0])
    assert not [p for p in cache_dir.iterdir() if p.suffix != ".h5"]

    # Reuse with a stricter min_distance checks the stored shortest distances.
    shortest = min(ase.io.read(data, i).get_all_distances(mic=True)[np.triu_indices(len(atoms[i]), 1)].min() for i in range(6))
    with pytest.raises(DataError, match=r"cu.xyz:frame \d: two atoms are [\d.]+ Å apart \(closer than data.min_distance"):
        build_cache(data, CUTOFF, cache_dir, min_distance=shortest + 0.01, progress=False)


def test_folder_and_glob_are_one_dataset(tmp_path):
    atoms = ase.io.read(DATA["ethanol"], ":12")
    folder = tmp_path / "parts"
    folder.mkdir()
    write_frames(folder / "a.xyz", atoms[:5])
    write_frames(folder / "b.xyz", atoms[5:])
    cache_dir = tmp_path / "cache"
    from_folder = build_cache(folder, CUTOFF, cache_dir, progress=False)
    assert build_cache(f"{folder}/*.xyz", CUTOFF, cache_dir, progress=False) == from_folder
    dataset = CachedDataset(from_folder)
    assert len(dataset) == 12
    assert dataset.frame(4).source == f"{folder / 'a.xyz'}:frame 4"
    assert dataset.frame(5).source == f"{folder / 'b.xyz'}:frame 0"
    frames = read_frames(folder / "a.xyz") + read_frames(folder / "b.xyz")
    species_index = {z: k for k, z in enumerate(dataset.numbers)}
    assert_same_graph(frame_to_graph(frames[6], CUTOFF, species_index), dataset[6])


def test_bad_frames_fail_naming_file_and_frame_and_leave_nothing(tmp_path, monkeypatch):
    atoms = ase.io.read(DATA["ethanol"], ":4")
    cache_dir = tmp_path / "cache"

    nan = [a.copy() for a in atoms]
    nan[2].positions[1, 0] = np.nan
    bad = write_frames(tmp_path / "nan.xyz", nan)
    with pytest.raises(DataError, match=r"nan.xyz:frame 2: positions contain NaN"):
        build_cache(bad, CUTOFF, cache_dir, progress=False, chunk_frames=2)

    close = [a.copy() for a in atoms]
    close[3].positions[1] = close[3].positions[0] + [0.2, 0.0, 0.0]
    bad = write_frames(tmp_path / "close.xyz", close)
    with pytest.raises(DataError, match=r"close.xyz:frame 3: atoms 0 and 1 are 0.200 Å apart"):
        build_cache(bad, CUTOFF, cache_dir, progress=False)

    garbled = tmp_path / "garbled.xyz"
    text = (tmp_path / "close.xyz").read_text().splitlines()
    garbled.write_text("\n".join(text[: 2 * 11] + ["9", "not a header", "C 0 0"]) + "\n")
    with pytest.raises(DataError, match=r"garbled.xyz:frame 2: cannot be read"):
        build_cache(garbled, CUTOFF, cache_dir, progress=False)

    # Interrupted after writing every frame: still no cache file, no temporary.
    import mpnn.data.cache as cache

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "_write_element_counts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_cache(write_frames(tmp_path / "good.xyz", atoms), CUTOFF, cache_dir, progress=False)
    assert list(cache_dir.iterdir()) == []


def test_prefetch():
    assert list(prefetch(iter(range(50)), size=3)) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise ValueError("source broke")

    items = prefetch(failing())
    assert [next(items), next(items)] == [1, 2]
    with pytest.raises(ValueError, match="source broke"):
        next(items)

    closed = threading.Event()

    def endless():
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed.set()

    before = threading.active_count()
    items = prefetch(endless(), size=2)
    assert [next(items) for _ in range(5)] == [0, 1, 2, 3, 4]
    items.close()  # the consumer stops early: the thread ends and closes the source
    assert closed.wait(5) and threading.active_count() == before
