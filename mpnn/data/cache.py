"""Datasets larger than memory: preprocess once into an HDF5 cache, read graphs from disk.

`build_cache(spec, cutoff, cache_dir)` streams the extxyz file(s) of one dataset
(`ase.io.iread` + `frame_from_atoms`, the conversion `read_frames` applies, so labels and
sources are the same; `read_frames` itself returns a whole file as a list), at most
`chunk_frames` frames at a time: validates each frame, computes its neighbor list and
appends everything `frame_to_graph` needs to `cache_dir/<key>.h5`. The key is a sha256
of the files' contents, the cutoff, the label keys and the format version, so a second
run (or another process) reuses the file and a changed file, cutoff or key builds a new
one. `CachedDataset(path)` is then a `Sequence` of graphs identical to
`frame_to_graph(frame, cutoff, species_index)`, read on demand.

Why HDF5 (h5py): one self-describing file (named, typed arrays with attributes), chunked
and compressed arrays that can grow while streaming, ragged per-atom/per-edge data as
flat arrays cut by offsets, random access to any frame without reading the rest, no
server or database, a long-maintained format readable from C, Fortran, Julia, MATLAB,
Rust, ... (h5dump shows it all).

Layout (F frames, N atoms, E edges in total; per-atom and per-edge rows of frame f are
`node_offset[f]:node_offset[f+1]` and `edge_offset[f]:edge_offset[f+1]`):
    per frame  cell [F,3,3] f8 Å (as read), pbc [F,3] u1, energy [F] f8 eV,
               stress [F,3,3] f8 eV/Å³, dipole [F,3] f8 e·Å, charge [F] f8 e (total),
               has_label [F,5] u1 (1 where the frame carries the label; the value is
               stored as 0 where it does not; columns in attribute "columns": energy,
               forces, stress, dipole, charges), file_index [F] i4 and file_frame [F] i8
               (source "files[file_index]:frame file_frame"), shortest_distance [F] f8 Å
               (shortest pair within the cutoff, inf if none), n_node [F] i4,
               n_edge [F] i4, element_counts [F,K] i4 (atoms of each element; columns in
               attribute "numbers": the K atomic numbers present, for E0 fitting)
    offsets    node_offset [F+1] i8, edge_offset [F+1] i8
    per atom   positions [N,3] f8 Å, numbers [N] u1, forces [N,3] f8 eV/Å, charges [N] f8 e
    per edge   senders [E] i4, receivers [E] i4 (atom indices within the frame),
               shifts [E,3] i2 (integer cell shifts; graphs carry them as f8)
    attributes format, format_version, cutoff (Å), label_keys (JSON), files (JSON, as
               named at build time), min_distance (Å, validated), n_frames, numbers.

Chunks and compression: chunks of about `CHUNK_BYTES` = 16 KiB (uncompressed) along the
first axis; gzip level 4 after the byte-shuffle filter, except positions and forces.
Random access of single frames (shuffled batches) decompresses one chunk per array and
frame, so chunks are small: on 20k molecules 4–16 KiB chunks read equally fast, 32 and
64 KiB 1.5–2x slower; 16 KiB compresses best of the fast ones. Index-like arrays compress
well (on those molecules senders 30x, receivers 13x, shifts and absent labels ~400x).
float64 positions and forces barely do (1.18x), yet inflating their chunks (~100 µs
each) was half the time of a shuffled batch, so they are stored plain: at 100k
molecules, 7.4 instead of 13.6 ms per batch of 32 for a 10% larger file. gzip, not lzf
or blosc, because every HDF5 build reads it.

Memory: n_node, n_edge and the offsets (24 bytes a frame) are read when a dataset is
opened; the other per-frame arrays (~200 bytes a frame) on first use; per-atom and
per-edge data, the bulk, stay on disk (each process's page cache aside).

Threads and processes: an h5py file handle must not cross a fork; h5py serialises all
HDF5 calls with one lock (releasing the GIL inside reads). `CachedDataset` therefore
opens the file lazily, once per thread (`threading.local`) and again in a forked child
(the process id is checked), so a dataset can be read from a `prefetch` thread, pickled,
or forked into worker processes. Reads from several threads are safe, not parallel.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import ase.io
import h5py
import jraph
import numpy as np
from ase.data import chemical_symbols

from mpnn.data.frames import DataError, Frame, frame_from_atoms, validate_frame
from mpnn.data.neighbors import neighbor_list
from mpnn.data import statistics

FORMAT = "mpnn-dataset-cache"
FORMAT_VERSION = 1
CHUNK_BYTES = 16 * 1024
COMPRESSION = dict(compression="gzip", compression_opts=4, shuffle=True)
LABELS = ("energy", "forces", "stress", "dipole", "charges")  # columns of has_label
EXTENSIONS = (".xyz", ".extxyz")
T = TypeVar("T")

# name: (row shape, dtype, kind) with kind "frame", "offset", "atom" or "edge"
_ARRAYS: dict[str, tuple[tuple[int, ...], str, str]] = {
    "cell": ((3, 3), "f8", "frame"),
    "pbc": ((3,), "u1", "frame"),
    "energy": ((), "f8", "frame"),
    "stress": ((3, 3), "f8", "frame"),
    "dipole": ((3,), "f8", "frame"),
    "charge": ((), "f8", "frame"),
    "has_label": ((len(LABELS),), "u1", "frame"),
    "file_index": ((), "i4", "frame"),
    "file_frame": ((), "i8", "frame"),
    "shortest_distance": ((), "f8", "frame"),
    "n_node": ((), "i4", "frame"),
    "n_edge": ((), "i4", "frame"),
    "node_offset": ((), "i8", "offset"),
    "edge_offset": ((), "i8", "offset"),
    "positions": ((3,), "f8", "atom"),
    "numbers": ((), "u1", "atom"),
    "forces": ((3,), "f8", "atom"),
    "charges": ((), "f8", "atom"),
    "senders": ((), "i4", "edge"),
    "receivers": ((), "i4", "edge"),
    "shifts": ((3,), "i2", "edge"),
}
UNCOMPRESSED = ("positions", "forces")  # float64 noise: gzip saves 15% and doubles read time
_FRAME_ARRAYS = ("cell", "pbc", "energy", "stress", "dipole", "charge", "has_label")
_ATOM_ARRAYS = ("positions", "numbers", "forces", "charges")


# --- which files, which cache ------------------------------------------------------------


def source_files(spec: str | Path) -> list[Path]:
    """The files of one dataset: a file, a folder (its *.xyz and *.extxyz, sorted) or a glob
    pattern (every file it matches, sorted; `**` recurses). Raises `DataError` naming
    `spec` when nothing matches."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
        if not files:
            raise DataError(f"{spec}: folder holds no {'/'.join('*' + e for e in EXTENSIONS)} files")
        return files
    if glob.has_magic(str(spec)):
        files = sorted(Path(p) for p in glob.glob(str(spec), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{spec}: no file matches this pattern")
        return files
    raise DataError(f"{spec}: no such file or folder")


def cache_key(files: Sequence[Path], cutoff: float, keys: dict[str, str]) -> str:
    """sha256 (hex) of the files' contents (in order, read in 1 MiB blocks), the cutoff (Å),
    the label keys and the cache format version. Paths and mtimes do not enter it."""
    digest = hashlib.sha256()
    header = {"format": FORMAT, "version": FORMAT_VERSION, "cutoff": float(cutoff).hex(), "keys": sorted(keys.items())}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for file in files:
        digest.update(f"\nfile {os.path.getsize(file)}\n".encode())  # delimits the files
        with open(file, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


# --- building ----------------------------------------------------------------------------


def _iter_frames(path: Path, keys: dict[str, str]) -> Iterator[Frame]:
    """Frames of one file, one at a time (sources "path:frame i", as `read_frames` names them)."""
    index = 0
    try:
        for atoms in ase.io.iread(path, index=":"):
            yield frame_from_atoms(atoms, f"{path}:frame {index}", **keys)
            index += 1
    except DataError:
        raise
    except Exception as e:  # ase raises many kinds; all mean "cannot parse"
        raise DataError(f"{path}:frame {index}: cannot be read by ase.io.iread: {type(e).__name__}: {e}") from e
    if index == 0:
        raise DataError(f"{path}: contains no frames")


def _chunked(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _chunk_rows(row_shape: tuple[int, ...], dtype: str) -> int:
    """Rows per HDF5 chunk: about CHUNK_BYTES uncompressed."""
    return max(1, CHUNK_BYTES // (int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize))


def _create_arrays(f: h5py.File) -> None:
    for name, (shape, dtype, _) in _ARRAYS.items():
        compression = {} if name in UNCOMPRESSED else COMPRESSION
        f.create_dataset(
            name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype, chunks=(_chunk_rows(shape, dtype), *shape), **compression
        )
    f["node_offset"].resize((1,))  # offsets start with a 0
    f["edge_offset"].resize((1,))
    f["has_label"].attrs["columns"] = list(LABELS)


def _append(dataset: h5py.Dataset, rows: np.ndarray) -> None:
    start = dataset.shape[0]
    dataset.resize((start + len(rows), *dataset.shape[1:]))
    dataset[start:] = rows


def _edge_lengths(frame: Frame, edges: dict[str, np.ndarray]) -> np.ndarray:
    """[n_edge] Å: length of every edge of `frame`."""
    cell = frame.cell if frame.pbc.any() else np.zeros((3, 3))
    vectors = frame.positions[edges["receivers"]] - frame.positions[edges["senders"]] + edges["shifts"] @ cell
    return np.linalg.norm(vectors, axis=1)


def _frame_rows(frame: Frame, file_index: int, file_frame: int, cutoff: float) -> dict[str, np.ndarray]:
    """Everything stored for one frame, as arrays with a leading row axis."""
    senders, receivers, shifts = neighbor_list(frame.positions, frame.cell, frame.pbc, cutoff)
    if len(shifts) and np.abs(shifts).max() > np.iinfo(np.int16).max:
        raise DataError(f"{frame.source}: periodic image shifts beyond int16 (cell far smaller than the cutoff)")
    n = frame.n_atom
    distances = _edge_lengths(frame, {"senders": senders, "receivers": receivers, "shifts": shifts})
    shortest = float(distances.min()) if len(senders) else np.inf
    has = [getattr(frame, label) is not None for label in LABELS]  # LABELS are Frame fields
    return {
        "cell": frame.cell[None],
        "pbc": frame.pbc[None].astype(np.uint8),
        "energy": np.array([frame.energy if has[0] else 0.0]),
        "stress": (frame.stress if has[2] else np.zeros((3, 3)))[None],
        "dipole": (frame.dipole if has[3] else np.zeros(3))[None],
        "charge": np.array([frame.charge]),
        "has_label": np.array([has], dtype=np.uint8),
        "file_index": np.array([file_index]),
        "file_frame": np.array([file_frame]),
        "shortest_distance": np.array([shortest]),
        "n_node": np.array([n]),
        "n_edge": np.array([len(senders)]),
        "positions": frame.positions,
        "numbers": frame.numbers,
        "forces": frame.forces if has[1] else np.zeros((n, 3)),
        "charges": frame.charges if has[4] else np.zeros(n),
        "senders": senders,
        "receivers": receivers,
        "shifts": shifts,
    }


def _validated_rows(frame: Frame, file_index: int, file_frame: int, cutoff: float, min_distance: float) -> dict[str, np.ndarray]:
    """`validate_frame` (atoms closer than `min_distance` Å found from the cutoff neighbor
    list when min_distance <= cutoff: vesin at 0.5 Å took 4x as long as at 5 Å),
    then the frame's rows."""
    own_check = 0 < min_distance <= cutoff and frame.n_atom > 1  # (validate_frame skips lone atoms)
    validate_frame(frame, need_energy=False, need_forces=False, known_numbers=None, min_distance=0.0 if own_check else min_distance)
    rows = _frame_rows(frame, file_index, file_frame, cutoff)
    if own_check and rows["shortest_distance"][0] < min_distance:
        senders, receivers, distances = rows["senders"], rows["receivers"], _edge_lengths(frame, rows)
        k = int(np.argmin(distances))
        raise DataError(
            f"{frame.source}: atoms {senders[k]} and {receivers[k]} are {distances[k]:.3f} Å apart "
            f"(closer than data.min_distance={min_distance} Å)"
        )
    return rows


def _write_chunk(f: h5py.File, rows: list[dict[str, np.ndarray]], totals: list[int]) -> None:
    """Append the rows of a chunk of frames; `totals` = [atoms, edges] so far (updated)."""
    for name, (shape, dtype, kind) in _ARRAYS.items():
        if kind != "offset":
            _append(f[name], np.concatenate([r[name] for r in rows]).astype(dtype, copy=False).reshape(-1, *shape))
    for name, size, k in (("node_offset", "n_node", 0), ("edge_offset", "n_edge", 1)):
        offsets = totals[k] + np.cumsum([int(r[size][0]) for r in rows], dtype=np.int64)
        _append(f[name], offsets)
        totals[k] = int(offsets[-1])


def _write_element_counts(f: h5py.File, chunk_frames: int) -> list[int]:
    """element_counts [F, K] from the stored atomic numbers, in chunks; returns the K numbers."""
    n_frames = f["n_node"].shape[0]
    present = np.zeros(256, dtype=bool)
    for a in range(0, f["numbers"].shape[0], 1 << 20):
        present[np.unique(f["numbers"][a : a + (1 << 20)])] = True
    numbers = np.flatnonzero(present)
    column = np.zeros(256, dtype=np.int64)
    column[numbers] = np.arange(len(numbers))
    shape = (len(numbers),)
    chunks = (_chunk_rows(shape, "i4"), *shape)
    f.create_dataset("element_counts", shape=(n_frames, *shape), maxshape=(None, *shape), dtype="i4", chunks=chunks, **COMPRESSION)
    f["element_counts"].attrs["numbers"] = numbers
    offsets = f["node_offset"][:]
    for a in range(0, n_frames, chunk_frames):
        b = min(a + chunk_frames, n_frames)
        atoms = f["numbers"][offsets[a] : offsets[b]]
        frame = np.repeat(np.arange(b - a), np.diff(offsets[a : b + 1]))
        counts = np.bincount(frame * len(numbers) + column[atoms], minlength=(b - a) * len(numbers))
        f["element_counts"][a:b] = counts.reshape(b - a, len(numbers))
    return numbers.tolist()


def _check_shortest(path: Path, min_distance: float) -> None:
    """On reuse with a stricter `min_distance` than the cache was validated with, check the
    stored shortest distances (they cover pairs within the cutoff)."""
    with h5py.File(path, "r") as f:
        if min_distance <= f.attrs["min_distance"]:
            return
        if min_distance > f.attrs["cutoff"]:
            raise DataError(f"{path}: min_distance={min_distance} Å exceeds the cache's cutoff {f.attrs['cutoff']} Å; cannot check")
        shortest = f["shortest_distance"][:]
        bad = np.flatnonzero(shortest < min_distance)
        if len(bad):
            files = json.loads(f.attrs["files"])
            k = int(bad[0])
            source = f"{files[int(f['file_index'][k])]}:frame {int(f['file_frame'][k])}"
            raise DataError(f"{source}: two atoms are {shortest[k]:.3f} Å apart (closer than data.min_distance={min_distance} Å)")


def build_cache(
    spec: str | Path,
    cutoff: float,
    cache_dir: str | Path,
    energy_key: str = "energy",
    forces_key: str = "forces",
    stress_key: str = "stress",
    virial_key: str = "virial",
    min_distance: float = 0.5,
    progress: bool = True,
    chunk_frames: int = 1000,
) -> Path:
    """Path of the HDF5 cache of dataset `spec` (see `source_files`) at `cutoff` (Å).

    Reuses `cache_dir/<cache_key>.h5` when it exists; otherwise streams the files frame by
    frame (at most `chunk_frames` frames in memory), validates each (`validate_frame`:
    finite positions and labels, non-degenerate cells, atoms at least `min_distance` Å
    apart; errors name file and frame), computes its neighbor list and appends it. The
    file is written as `.<key>.<pid>.tmp` beside the target and renamed at the end
    (atomic: a killed build leaves no `<key>.h5`, at most a stale `.tmp` to delete).
    """
    from tqdm import tqdm

    keys = dict(energy_key=energy_key, forces_key=forces_key, stress_key=stress_key, virial_key=virial_key)
    files = source_files(spec)
    key = cache_key(files, cutoff, keys)
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{key}.h5"
    if path.exists():
        _check_shortest(path, min_distance)
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = cache_dir / f".{key}.{os.getpid()}.tmp"
    bar = tqdm(desc=f"caching {spec}", unit=" frames", disable=not progress)
    try:
        with h5py.File(temporary, "w") as f:
            _create_arrays(f)
            totals = [0, 0]
            for file_index, file in enumerate(files):
                frames = _iter_frames(file, keys)
                for n, chunk in enumerate(_chunked(frames, chunk_frames)):
                    first = n * chunk_frames  # index in the file of the chunk's first frame
                    rows = [_validated_rows(frame, file_index, first + k, cutoff, min_distance) for k, frame in enumerate(chunk)]
                    _write_chunk(f, rows, totals)
                    bar.update(len(chunk))
            numbers = _write_element_counts(f, chunk_frames)
            f.attrs.update(
                format=FORMAT,
                format_version=FORMAT_VERSION,
                cutoff=float(cutoff),
                label_keys=json.dumps(keys),
                files=json.dumps([str(p) for p in files]),
                min_distance=float(min_distance),
                n_frames=f["n_node"].shape[0],
                numbers=np.asarray(numbers, dtype=np.int64),
            )
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return path


# --- reading -----------------------------------------------------------------------------


def _merge_ranges(starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, disjoint [start, stop) ranges with touching ones joined and empty ones dropped."""
    keep = stops > starts
    starts, stops = starts[keep], stops[keep]
    if len(starts) <= 1:
        return starts, stops
    new = np.concatenate([[True], starts[1:] != stops[:-1]])
    return starts[new], stops[np.concatenate([new[1:], [True]])]


def _rows(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """[sum(lengths)] int64: start..start+length-1 of every range, concatenated."""
    lengths = np.asarray(lengths, dtype=np.int64)
    before = np.cumsum(lengths) - lengths
    return np.repeat(np.asarray(starts, dtype=np.int64) - before, lengths) + np.arange(int(lengths.sum()))


def _read_hyperslab(dataset: h5py.Dataset, start: int, stop: int, out: np.ndarray) -> None:
    space = dataset.id.get_space()
    space.select_hyperslab((start,) + (0,) * (dataset.ndim - 1), (stop - start, *dataset.shape[1:]))
    dataset.id.read(h5py.h5s.create_simple(out.shape), space, out)


def _read_ranges(dataset: h5py.Dataset, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Rows [start, stop) of every range (sorted, disjoint), concatenated.

    Ranges that cover at least half of their span: one read of the span, then a gather.
    Scattered ranges of a 1-D array or short ones: one read of the union of hyperslabs
    (h5py entered once, each chunk decompressed once). Long scattered ranges of an n-D
    array: one read each (HDF5 builds n-D unions slowly: 8x slower than the loop for
    batches of 32 frames of ~300 edges).
    """
    starts, stops = _merge_ranges(np.asarray(starts, np.int64), np.asarray(stops, np.int64))
    tail = dataset.shape[1:]
    total = int((stops - starts).sum())
    out = np.empty((total, *tail), dtype=dataset.dtype)
    if total == 0:
        return out
    span = int(stops[-1] - starts[0])
    if len(starts) == 1 or span <= 2 * total:
        block = out if len(starts) == 1 else np.empty((span, *tail), dtype=dataset.dtype)
        _read_hyperslab(dataset, int(starts[0]), int(stops[-1]), block)
        return block if len(starts) == 1 else block[_rows(starts - starts[0], stops - starts)]
    if dataset.ndim > 1 and total > 64 * len(starts):
        at = 0
        for a, b in zip(starts.tolist(), stops.tolist()):
            _read_hyperslab(dataset, a, b, out[at : at + b - a])
            at += b - a
        return out
    space = dataset.id.get_space()
    space.select_none()
    zeros = (0,) * len(tail)
    for a, b in zip(starts.tolist(), stops.tolist()):
        space.select_hyperslab((a, *zeros), (b - a, *tail), op=h5py.h5s.SELECT_OR)
    dataset.id.read(h5py.h5s.create_simple(out.shape), space, out)
    return out


def _read_only(array: np.ndarray) -> np.ndarray:
    """`array`, marked read-only: views hand out the shared per-frame arrays themselves."""
    array.flags.writeable = False
    return array


class _Store:
    """One cache file, shared by a dataset and its subsets.

    Per-frame arrays (a few hundred bytes a frame) are read whole, once, on first use and
    kept in memory; per-atom and per-edge arrays stay on disk and are read through one
    h5py handle per thread and process (opened on first use).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        with h5py.File(self.path, "r") as f:
            if f.attrs.get("format") != FORMAT or f.attrs.get("format_version") != FORMAT_VERSION:
                raise DataError(f"{self.path}: not an {FORMAT} file of version {FORMAT_VERSION}")
            self.cutoff = float(f.attrs["cutoff"])
            self.files = json.loads(f.attrs["files"])
            self.label_keys = json.loads(f.attrs["label_keys"])
            self.numbers = [int(z) for z in f.attrs["numbers"]]
            self.n_node = _read_only(f["n_node"][:])
            self.n_edge = _read_only(f["n_edge"][:])
            self.node_offset = _read_only(f["node_offset"][:])
            self.edge_offset = _read_only(f["edge_offset"][:])
        self._local = threading.local()
        self._lock = threading.Lock()
        self._loaded: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_local"], state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        self._lock = threading.Lock()

    def arrays(self) -> dict[str, h5py.Dataset]:
        """This thread's (and process's) open datasets."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.file = h5py.File(self.path, "r")
            local.arrays = {name: local.file[name] for name in (*_ARRAYS, "element_counts")}
            local.pid = os.getpid()
        return local.arrays

    def whole(self, name: str) -> np.ndarray:
        """A whole per-frame array, read once."""
        with self._lock:
            if name not in self._loaded:
                self._loaded[name] = _read_only(self.arrays()[name][:])
            return self._loaded[name]

    def read(self, frames: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Arrays `names` for sorted unique frame indices `frames`: per-frame rows in that
        order, per-atom and per-edge rows concatenated in that order."""
        out = {}
        for name in names:
            kind = _ARRAYS[name][2] if name in _ARRAYS else "frame"
            if kind == "frame":
                out[name] = self.whole(name)[frames]
            else:
                offset = self.node_offset if kind == "atom" else self.edge_offset
                out[name] = _read_ranges(self.arrays()[name], offset[frames], offset[frames + 1])
        return out


def _species_table(species_index: dict[int, int]) -> np.ndarray:
    table = np.full(256, -1, dtype=np.int32)
    for z, k in species_index.items():
        table[int(z)] = k
    return table


class CachedDataset(Sequence):
    """A `Sequence` of graphs read from a cache written by `build_cache`.

    `dataset[i]` / `dataset.graph(i)` equals `frame_to_graph(frame_i, cutoff,
    species_index)` (keys, dtypes, values); `species_index` defaults to the sorted
    elements of the whole file. `subset(indices)` gives a view (train/valid/test splits,
    per-process shards) that is itself a `CachedDataset` with the same species index.
    Memory: n_node, n_edge and offsets (24 bytes a frame) at once, the other per-frame
    arrays (~200 bytes a frame) on first use; per-atom and per-edge data stay on disk.
    """

    def __init__(self, path: str | Path, species_index: dict[int, int] | None = None):
        self._store = _Store(Path(path))
        self._index: np.ndarray | None = None  # frames of the file this view holds; None: all
        if species_index is None:
            species_index = {z: k for k, z in enumerate(self._store.numbers)}
        self.species_index = dict(species_index)
        self._table = _species_table(self.species_index)

    # -- what it holds ---------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._store.path

    @property
    def cutoff(self) -> float:
        """Neighbor-list cutoff (Å) the cache was built with."""
        return self._store.cutoff

    @property
    def files(self) -> list[str]:
        """The source files, as named when the cache was built."""
        return list(self._store.files)

    @property
    def indices(self) -> np.ndarray:
        """[len] int64: this view's frames as indices into the file."""
        return np.arange(len(self._store.n_node)) if self._index is None else self._index

    def _view(self, name: str) -> np.ndarray:
        array = getattr(self._store, name) if name in ("n_node", "n_edge") else self._store.whole(name)
        return array if self._index is None else array[self._index]

    def __len__(self) -> int:
        return len(self._store.n_node) if self._index is None else len(self._index)

    @property
    def n_node(self) -> np.ndarray:
        """[len] int32 atoms per frame."""
        return self._view("n_node")

    @property
    def n_edge(self) -> np.ndarray:
        """[len] int32 edges (directed neighbor pairs) per frame."""
        return self._view("n_edge")

    @property
    def numbers(self) -> list[int]:
        """Sorted atomic numbers present in this view."""
        if self._index is None:
            return list(self._store.numbers)
        present = self._view("element_counts").sum(axis=0) > 0
        return [z for z, p in zip(self._store.numbers, present) if p]

    @property
    def energies(self) -> np.ndarray:
        """[len] float64 eV, NaN where a frame has no energy."""
        return np.where(self.has_label("energy"), self._view("energy"), np.nan)

    @property
    def pbc(self) -> np.ndarray:
        """[len, 3] bool periodicity of each frame."""
        return self._view("pbc").astype(bool)

    @property
    def cells(self) -> np.ndarray:
        """[len, 3, 3] Å: the cells as graphs carry them (zeros where not periodic), as
        `potential.graph_cells` returns them for `Potential.covering`."""
        return np.where(self.pbc.any(axis=1)[:, None, None], self._view("cell"), 0.0)

    def has_label(self, label: str) -> np.ndarray:
        """[len] bool: frames that carry `label` (one of LABELS)."""
        return self._view("has_label")[:, LABELS.index(label)].astype(bool)

    def element_counts(self, numbers: Sequence[int] | None = None) -> np.ndarray:
        """[len, len(numbers)] int64 atoms of each element per frame (default: `self.numbers`)."""
        numbers = self.numbers if numbers is None else list(numbers)
        counts = self._view("element_counts")
        column = {z: k for k, z in enumerate(self._store.numbers)}
        out = np.zeros((len(self), len(numbers)), dtype=np.int64)
        for k, z in enumerate(numbers):
            if z in column:
                out[:, k] = counts[:, column[z]]
        return out

    # -- views -----------------------------------------------------------------------------

    def _file_frames(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Positions in this view (negative ones count from the end) → frame indices of the file."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < -len(self) or indices.max() >= len(self)):
            raise IndexError(f"frame index out of range for {len(self)} frames")
        indices = indices % max(len(self), 1)
        return indices if self._index is None else self._index[indices]

    def subset(self, indices: Sequence[int] | np.ndarray) -> "CachedDataset":
        """The frames `indices` (positions in this view, any order, repeats allowed)."""
        view = object.__new__(CachedDataset)
        view.__dict__.update(self.__dict__)
        view._index = self._file_frames(indices)
        return view

    def with_species_index(self, species_index: dict[int, int]) -> "CachedDataset":
        """The same frames, graphs with species numbered by `species_index` (Z → index)."""
        view = object.__new__(CachedDataset)
        view.__dict__.update(self.__dict__)
        view.species_index = dict(species_index)
        view._table = _species_table(view.species_index)
        return view

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.subset(np.arange(len(self))[i])
        return self.graph(i)

    def __iter__(self) -> Iterator[jraph.GraphsTuple]:
        for first in range(0, len(self), 256):
            yield from self.graphs(np.arange(first, min(first + 256, len(self))))

    # -- reading ---------------------------------------------------------------------------

    def _source(self, frame: int) -> str:
        file_index, file_frame = self._store.whole("file_index")[frame], self._store.whole("file_frame")[frame]
        return f"{self._store.files[int(file_index)]}:frame {int(file_frame)}"

    def frames(self, indices: Sequence[int] | np.ndarray) -> list[Frame]:
        """The `Frame`s at `indices` (labels as read, source "file:frame i")."""
        wanted = self._file_frames(indices)
        frames, position = np.unique(wanted, return_inverse=True)
        data = self._store.read(frames, _FRAME_ARRAYS + _ATOM_ARRAYS)
        node_at = np.concatenate([[0], np.cumsum(self._store.n_node[frames], dtype=np.int64)])
        found = []
        for k, frame in enumerate(frames):
            a, b = node_at[k], node_at[k + 1]
            has = data["has_label"][k].astype(bool)
            found.append(
                Frame(
                    positions=data["positions"][a:b],
                    numbers=data["numbers"][a:b].astype(np.int64),
                    cell=data["cell"][k],
                    pbc=data["pbc"][k].astype(bool),
                    energy=float(data["energy"][k]) if has[0] else None,
                    forces=data["forces"][a:b] if has[1] else None,
                    stress=data["stress"][k] if has[2] else None,
                    source=self._source(frame),
                    charge=float(data["charge"][k]),
                    dipole=data["dipole"][k] if has[3] else None,
                    charges=data["charges"][a:b] if has[4] else None,
                )
            )
        return [found[p] for p in position.reshape(-1)]

    def frame(self, i: int) -> Frame:
        return self.frames([i])[0]

    def batch(self, indices: Sequence[int] | np.ndarray) -> jraph.GraphsTuple:
        """The graphs at `indices`, in that order, concatenated as `jraph.batch_np` does
        (unpadded; senders/receivers int32). Each on-disk array is read once per call;
        labels no frame of the batch has (and shifts when none is periodic) are not read."""
        store = self._store
        wanted = self._file_frames(indices)
        frames, position = np.unique(wanted, return_inverse=True)
        position = position.reshape(-1)
        has = store.whole("has_label")[wanted].astype(bool)
        pbc = store.whole("pbc")[wanted].astype(bool)
        names = ["positions", "numbers", "senders", "receivers"]
        names += [name for name, k in (("forces", 1), ("charges", 4)) if has[:, k].any()]
        names += ["shifts"] if pbc.any() else []
        data = store.read(frames, names)

        n_node, n_edge = store.n_node[wanted], store.n_edge[wanted]
        sorted_node_at = np.cumsum(store.n_node[frames], dtype=np.int64) - store.n_node[frames]
        sorted_edge_at = np.cumsum(store.n_edge[frames], dtype=np.int64) - store.n_edge[frames]
        in_order = len(frames) == len(wanted) and bool(np.all(position == np.arange(len(wanted))))
        atom_rows = slice(None) if in_order else _rows(sorted_node_at[position], n_node)
        edge_rows = slice(None) if in_order else _rows(sorted_edge_at[position], n_edge)
        n_atoms, n_edges = int(n_node.sum()), int(n_edge.sum())

        numbers = data["numbers"][atom_rows]
        species = self._table[numbers]
        if (species < 0).any():
            frame = int(wanted[np.repeat(np.arange(len(wanted)), n_node)[np.argmax(species < 0)]])
            unknown = sorted({chemical_symbols[int(z)] for z in numbers[species < 0]})
            raise DataError(f"{self._source(frame)}: element(s) {unknown} not in the species index {sorted(self.species_index)}")
        node_base = np.repeat((np.cumsum(n_node, dtype=np.int64) - n_node).astype(np.int32), n_edge)
        stored = lambda name, shape: data[name][atom_rows] if name in data else np.zeros(shape)
        periodic, bulk = pbc.any(axis=1), pbc.all(axis=1)
        has_stress, has_dipole = has[:, 2] & bulk, has[:, 3] & ~periodic
        weight = lambda flags: flags.astype(np.float64)
        per_frame = lambda name: store.whole(name)[wanted]
        return jraph.GraphsTuple(
            nodes={
                "positions": data["positions"][atom_rows],
                "species": species,
                "forces": stored("forces", (n_atoms, 3)),
                "charges": stored("charges", (n_atoms,)),
                "mask": np.ones(n_atoms, dtype=bool),
            },
            edges={
                "shifts": data["shifts"][edge_rows].astype(np.float64) if "shifts" in data else np.zeros((n_edges, 3)),
                "mask": np.ones(n_edges, dtype=bool),
            },
            globals={
                "cell": np.where(periodic[:, None, None], per_frame("cell"), 0.0),
                "mask": np.ones(len(wanted), dtype=bool),
                "energy": np.where(has[:, 0], per_frame("energy"), 0.0),
                "stress": np.where(has_stress[:, None, None], per_frame("stress"), 0.0),
                "weight_energy": weight(has[:, 0]),
                "weight_forces": weight(has[:, 1]),
                "weight_stress": weight(has_stress),
                "charge": per_frame("charge"),
                "dipole": np.where(has_dipole[:, None], per_frame("dipole"), 0.0),
                "weight_dipole": weight(has_dipole),
                "weight_charges": weight(has[:, 4]),
            },
            senders=data["senders"][edge_rows] + node_base,
            receivers=data["receivers"][edge_rows] + node_base,
            n_node=n_node.astype(np.int32),
            n_edge=n_edge.astype(np.int32),
        )

    def graphs(self, indices: Sequence[int] | np.ndarray) -> list[jraph.GraphsTuple]:
        """The graphs at `indices` (in that order): one `batch` read, cut into graphs."""
        batch = self.batch(indices)
        node_at = np.concatenate([[0], np.cumsum(batch.n_node, dtype=np.int64)])
        edge_at = np.concatenate([[0], np.cumsum(batch.n_edge, dtype=np.int64)])
        graphs = []
        for k in range(len(batch.n_node)):
            a, b, c, d = node_at[k], node_at[k + 1], edge_at[k], edge_at[k + 1]
            graphs.append(
                jraph.GraphsTuple(
                    nodes={name: value[a:b] for name, value in batch.nodes.items()},
                    edges={name: value[c:d] for name, value in batch.edges.items()},
                    globals={name: value[k : k + 1] for name, value in batch.globals.items()},
                    senders=batch.senders[c:d] - np.int32(a),
                    receivers=batch.receivers[c:d] - np.int32(a),
                    n_node=batch.n_node[k : k + 1],
                    n_edge=batch.n_edge[k : k + 1],
                )
            )
        return graphs

    def graph(self, i: int) -> jraph.GraphsTuple:
        return self.graphs([i])[0]

    def blocks(self, names: Sequence[str], block: int = 4096) -> Iterator[dict[str, np.ndarray]]:
        """Arrays `names` for this view's frames in file order (each frame once), `block`
        frames at a time (streaming statistics); per-frame rows and concatenated per-atom/
        per-edge rows."""
        frames = np.unique(self.indices)
        for first in range(0, len(frames), block):
            yield self._store.read(frames[first : first + block], names)


def split_dataset(
    dataset: CachedDataset, valid_fraction: float, test_fraction: float, seed: int
) -> tuple[CachedDataset, CachedDataset, CachedDataset]:
    """(train, valid, test) views: the same frames `frames.split_frames` picks for the same
    fractions and seed."""
    if valid_fraction < 0 or test_fraction < 0 or valid_fraction + test_fraction >= 1:
        raise DataError(f"split fractions must be >= 0 and sum to < 1 (valid={valid_fraction}, test={test_fraction})")
    order = np.random.default_rng(seed).permutation(len(dataset))
    n_valid = int(round(valid_fraction * len(dataset)))
    n_test = int(round(test_fraction * len(dataset)))
    return (
        dataset.subset(order[n_valid + n_test :]),
        dataset.subset(order[:n_valid]),
        dataset.subset(order[n_valid : n_valid + n_test]),
    )


# --- checks and statistics (as load_splits and mpnn.data.statistics, from the cache) ----


def check_dataset(
    dataset: CachedDataset, need_energy: bool, need_forces: bool, known_numbers: Sequence[int] | None = None
) -> None:
    """The checks `validate_frame` makes that depend on the training config (the others
    were made when the cache was built); `DataError` naming the first offending frame."""
    for label, needed in (("energy", need_energy), ("forces", need_forces)):
        missing = np.flatnonzero(~dataset.has_label(label)) if needed else []
        if len(missing):
            frame = int(dataset.indices[missing[0]])
            raise DataError(f"{dataset._source(frame)}: no {label} found ({label} loss weight > 0; {len(missing)} such frames)")
    if known_numbers is not None:
        unknown = sorted(set(dataset.numbers) - set(known_numbers))
        if unknown:
            column = dataset.element_counts(unknown).sum(axis=1) > 0
            frame = int(dataset.indices[np.argmax(column)])
            names, known = [chemical_symbols[z] for z in unknown], [chemical_symbols[z] for z in known_numbers]
            raise DataError(f"{dataset._source(frame)}: element(s) {names} not known to the model (knows {known})")


def fit_e0(dataset: CachedDataset, numbers: Sequence[int], energies: np.ndarray | None = None) -> np.ndarray:
    """As `statistics.fit_e0`: per-element E0 (eV) by least squares over labelled frames.
    `energies` [len] eV replaces the stored ones (e.g. minus the fixed pair terms)."""
    labelled = dataset.has_label("energy")
    if not labelled.any():
        raise DataError(f"{dataset.path}: cannot fit E0: no training frame has an energy")
    energies = dataset.energies if energies is None else np.asarray(energies, dtype=np.float64)
    return statistics.least_squares_e0(
        dataset.element_counts(numbers)[labelled].astype(np.float64), energies[labelled], numbers
    )


def residual_per_atom(
    dataset: CachedDataset, e0: np.ndarray, numbers: Sequence[int], energies: np.ndarray | None = None
) -> np.ndarray:
    """As `statistics.residual_per_atom`: (E − Σ E0) / n_atom for labelled frames (eV/atom)."""
    labelled = dataset.has_label("energy")
    energies = dataset.energies if energies is None else np.asarray(energies, dtype=np.float64)
    counts = dataset.element_counts(numbers)[labelled]
    return (energies[labelled] - counts @ np.asarray(e0)) / dataset.n_node[labelled]


def forces_rms(dataset: CachedDataset) -> float:
    """As `statistics.forces_rms` (eV/Å), streamed in blocks; repeated frames count once."""
    total, count = 0.0, 0
    for data in dataset.blocks(("forces", "has_label", "n_node")):
        has = np.repeat(data["has_label"][:, LABELS.index("forces")].astype(bool), data["n_node"])
        forces = data["forces"][has]
        total += float(np.sum(forces**2))
        count += forces.size
    return float(np.sqrt(total / count)) if count else 0.0


def average_num_neighbors(dataset: CachedDataset) -> float:
    """As `statistics.average_num_neighbors`: edges per atom, at least 1."""
    return max(int(dataset.n_edge.sum()) / max(int(dataset.n_node.sum()), 1), 1.0)


# --- batches -----------------------------------------------------------------------------


def prefetch(iterator: Iterable[T], size: int = 2) -> Iterator[T]:
    """Items of `iterator`, produced up to `size` ahead on a background thread.

    Exceptions of the producer are raised in the consumer, at the item where they
    happened; when the consumer stops early (break, close, garbage collection) the thread
    stops after its current item and closes `iterator`. The thread starts at the first
    `next`. The work overlaps where the consumer releases the GIL (a JAX step does, and
    h5py does inside its reads); on a single core it only reorders the same work.

    Not `grain`: an extra dependency (with its own sampler and worker processes) for what
    this one thread does, and its batching assumes fixed-shape records while our batches
    are variable-size graphs padded to bucketed shapes per batch.
    """
    items: queue.Queue = queue.Queue(maxsize=max(int(size), 1))
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        source = iter(iterator)
        try:
            for item in source:
                if not put((True, item)):
                    return
            put((False, done))
        except BaseException as error:  # handed to the consumer
            put((False, error))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = items.get()
            if ok:
                yield item
            elif item is done:
                return
            else:
                raise item
    finally:
        stop.set()
        thread.join()
