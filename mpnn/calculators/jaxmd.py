"""A trained potential as a jax-md energy function, with neighbor lists that fit it.

    from jax_md import space, simulate
    import mpnn, mpnn.jaxmd

    potential = mpnn.load("runs/cu/model")
    system = mpnn.jaxmd.system_from_atoms(atoms)              # real coordinates, upper-triangular box
    nbr_fns = mpnn.jaxmd.neighbor_list(potential, system.displacement_fn, system.box,
                                       fractional_coordinates=system.fractional)
    energy = mpnn.jaxmd.energy_fn(potential, system.displacement_fn, system.numbers)
    nbrs = nbr_fns.allocate(system.positions)
    energy(system.positions, neighbor=nbrs)                   # eV, differentiable, jittable

Edge vectors come from the jax-md displacement function: for a neighbor pair with sender
i and receiver j the model sees v = displacement(R[j], R[i]) = r_j − r_i (minimum image),
the same convention as `mpnn.data.neighbors` (v = r[recv] − r[send] + shift·cell). The
model, its parameters and the energy assembly (scale·model + shift + E0) are those of the
`Potential`: no copies. Forces are −∂E/∂R by autodiff through the displacement function
(jax-md convention: real-space forces even with fractional coordinates); stress for
`npt_nose_hoover` comes from the `perturbation` keyword that jax-md passes through.

Neighbor lists (`neighbor_list`):
  * free space (box=None) and periodic boxes whose perpendicular widths are all at least
    2·(cutoff + dr_threshold): a `jax_md.partition` list in `Sparse` format (full list,
    senders/receivers). jax-md's periodic displacement is minimum-image, which is exact
    for such boxes (triclinic included: every vector shorter than half the narrowest
    width has fractional components in (−½, ½)).
  * smaller periodic boxes: jax-md's minimum-image list would miss images, so we use
    jax-md's multi-image list (`jax_md.custom_partition.neighbor_list_multi_image`:
    every image within the cutoff, with integer cell shifts; O(N²·images), meant for
    small cells). Its edges are r_j + n·T − r_i from the positions at evaluation time;
    we correct for atoms that `shift_fn` wrapped back into the box since the list was
    built (jax-md does not: an atom crossing a face between rebuild and force
    evaluation would otherwise point its edges at the wrong image).
  * `multi_image=False` refuses small boxes with a clear error instead.
  * Padding entries (index N) are redirected to one extra padding node and masked
    (`_mask_padding`); masked edges contribute exactly nothing.
  * Overflow (more pairs than capacity), a cell-list overflow, a box that became too
    small for minimum image (NPT), or a multi-image list that needs more images are all
    reported by `overflowed(nbrs)` (traced) / `needs_reallocation(nbrs)` (host): then
    reallocate and redo the step (`mpnn.md` does this automatically).

Boxes follow jax-md: a scalar, a vector of side lengths, or a matrix T whose *columns* are
the lattice vectors (real = T @ fractional), upper triangular for triclinic cells:
`system_from_atoms` rotates any ASE cell into that form (ASE cell rows = lattice
vectors, so T = cell.T in ASE's lower-triangular standard form).

Coordinates: positions may be real (default of `system_from_atoms`) or fractional; the
neighbor lists convert internally (jax-md's cell list wants fractional positions for
triclinic boxes and box changes). Use real coordinates with `simulate.npt_nose_hoover`:
in jax-md 0.2.29 its position update adds R·(e^x − 1) to the positions, right for real
coordinates but spurious for fractional ones (the box scaling already moves them), and
the NPT invariant then drifts by ~0.1 eV in 80 fs whatever the timestep.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

try:
    from jax_md import custom_partition, partition, space
    from jax_md.custom_partition import NeighborListMultiImage
    from jax_md.partition import NeighborList, NeighborListFns, NeighborListFormat
    from jax_md.partition import PartitionErrorCode as PEC
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("mpnn.jaxmd needs jax-md: pip install 'mpnn[md]' (jax-md>=0.2.29,<0.3)") from e

from mpnn.potential import Potential, energy_and_derivatives, graph_energies, one_graph

__all__ = [
    "JaxMDSystem",
    "box_matrix",
    "energy_fn",
    "min_image_is_exact",
    "neighbor_list",
    "needs_reallocation",
    "overflowed",
    "perpendicular_widths",
    "properties_fn",
    "species_indices",
    "system_from_atoms",
]


# --- boxes ----------------------------------------------------------------------------


def box_matrix(box, dim: int = 3):
    """jax-md box (scalar, side lengths or matrix with lattice vectors as columns) → [3, 3]."""
    box = jnp.asarray(box)
    if box.ndim == 0:
        return jnp.eye(dim, dtype=box.dtype) * box
    if box.ndim == 1:
        return jnp.diag(box)
    return box


def perpendicular_widths(box) -> jnp.ndarray:
    """Distances between opposite faces of the box (Å): V / |a_k × a_l| per direction."""
    T = box_matrix(box)
    a, b, c = T[:, 0], T[:, 1], T[:, 2]
    volume = jnp.abs(jnp.dot(a, jnp.cross(b, c)))
    return volume / jnp.stack(
        [jnp.linalg.norm(jnp.cross(b, c)), jnp.linalg.norm(jnp.cross(c, a)), jnp.linalg.norm(jnp.cross(a, b))]
    )


def _host_box(box) -> np.ndarray:
    """box_matrix on the host (numpy: no tiny XLA compilations for host-side checks)."""
    box = np.asarray(box, dtype=np.float64)
    if box.ndim == 0:
        return np.eye(3) * box
    return np.diag(box) if box.ndim == 1 else box


def _host_widths(box) -> np.ndarray:
    a, b, c = _host_box(box).T
    volume = abs(np.dot(a, np.cross(b, c)))
    return volume / np.array([np.linalg.norm(np.cross(b, c)), np.linalg.norm(np.cross(c, a)), np.linalg.norm(np.cross(a, b))])


def min_image_is_exact(box, cutoff: float) -> bool:
    """True when every pair has at most one image within `cutoff` and it is the minimum image."""
    return bool(np.min(_host_widths(box)) >= 2.0 * cutoff)


def _is_upper_triangular(box) -> bool:
    T = _host_box(box)
    return bool(np.all(np.abs(np.tril(T, -1)) <= 1e-12 * max(np.abs(T).max(), 1.0)))


# --- species --------------------------------------------------------------------------


def species_indices(potential: Potential, atomic_numbers: Sequence[int]) -> np.ndarray:
    """Atomic numbers → the model's species indices, with a clear error for unknown elements."""
    numbers = np.asarray(atomic_numbers, dtype=np.int64).reshape(-1)
    unknown = sorted(set(numbers.tolist()) - set(potential.numbers))
    if unknown:
        raise ValueError(f"elements {unknown} are not known to this model (knows {list(potential.numbers)})")
    index = potential.species_index
    return np.array([index[int(z)] for z in numbers], dtype=np.int32)


# --- edges from positions and a neighbor list -----------------------------------------


def _displacements(displacement_fn, Ra, Rb, kwargs):
    """Vectorised displacement over edges; keyword arguments (box, perturbation) are not mapped."""
    return jax.vmap(functools.partial(displacement_fn, **kwargs))(Ra, Rb)


def _mask_padding(senders, receivers, n: int):
    """jax-md marks padding list entries with index n: send them to the extra padding node
    n (so indices stay in range) and mask them. → (senders, receivers, edge_mask)."""
    mask = (senders < n) & (receivers < n)
    return jnp.where(mask, senders, n), jnp.where(mask, receivers, n), mask


def _edges(displacement_fn, R, neighbor, kwargs, fractional=None):
    """(vectors [E, 3], senders [E], receivers [E], edge_mask [E]) with index N = padding node.

    Padding entries of a list get sender = receiver = N and mask False; the node arrays
    the model sees have N + 1 entries (the last one a padding node, masked).
    Without a list (neighbor=None), all ordered pairs i != j, minimum image.
    """
    n = R.shape[0]
    if neighbor is None:
        # All ordered pairs i != j (free space or a box where minimum image is exact).
        send, recv = np.nonzero(~np.eye(n, dtype=bool))
        senders, receivers = jnp.asarray(send, jnp.int32), jnp.asarray(recv, jnp.int32)
        mask = jnp.ones(senders.shape, bool)
        vectors = _displacements(displacement_fn, R[receivers], R[senders], kwargs)
        return vectors, senders, receivers, mask
    idx = neighbor.idx
    if neighbor.format is NeighborListFormat.OrderedSparse:
        raise ValueError("mpnn needs a full neighbor list: use format=partition.Sparse (or mpnn.jaxmd.neighbor_list)")
    if isinstance(neighbor, NeighborListMultiImage):
        return _multi_image_edges(R, neighbor, kwargs, fractional)
    if neighbor.format is NeighborListFormat.Sparse:
        receivers, senders = idx[0], idx[1]
    else:  # Dense [N, max_neighbors]: row i lists the neighbors j of i
        senders = jnp.repeat(jnp.arange(n, dtype=idx.dtype), idx.shape[1])
        receivers = idx.reshape(-1)
    senders, receivers, mask = _mask_padding(senders, receivers, n)
    R_ext = jnp.concatenate([R, jnp.zeros((1, R.shape[1]), R.dtype)])
    vectors = _displacements(displacement_fn, R_ext[receivers], R_ext[senders], kwargs)
    return vectors, senders, receivers, mask


def energy_fn(
    potential: Potential,
    displacement_fn: Callable,
    atomic_numbers: Sequence[int],
    per_atom: bool = False,
    fractional_coordinates: bool | None = None,
    box=None,
    total_charge: float = 0.0,
) -> Callable[..., jnp.ndarray]:
    """A jax-md energy function `energy(R, neighbor=None, **kwargs) -> E` (eV).

    R: [N, 3] positions (real or fractional, as `displacement_fn` expects). neighbor: a
    neighbor list from `mpnn.jaxmd.neighbor_list` (or any full jax-md list, Sparse or
    Dense); None uses all pairs (fine for small molecules). kwargs (box, perturbation,
    ...) go to `displacement_fn`. With `per_atom`, returns per-atom energies [N].
    Differentiable in R (forces), box and perturbation (stress); jittable.
    fractional_coordinates is only needed for a jax-md multi-image list built outside
    `mpnn.jaxmd.neighbor_list`, and for long-range terms with fractional positions.

    Long-range terms (model.long_range) see positions and the cell, not just neighbor
    pairs: pass the simulation `box` (None: free space) and the system's `total_charge`
    (e). The Ewald grid is sized here for that box with 20 % room to grow (NPT).
    """
    species, node_mask = _nodes(potential, atomic_numbers)
    n_atom = species.shape[0] - 1
    dtype = potential.np_dtype
    potential = _covering(potential, box)

    def energy(R, neighbor=None, **kwargs):
        if R.shape[0] != n_atom:
            raise ValueError(f"energy_fn was built for {n_atom} atoms, got positions of shape {R.shape}")
        vectors, senders, receivers, edge_mask = _edges(displacement_fn, R, neighbor, kwargs, fractional_coordinates)
        graph = _graph(R, kwargs, box, fractional_coordinates, species, node_mask, senders, receivers, edge_mask, total_charge, dtype)
        node_energy = graph_energies(potential, potential.variables, graph, vectors.astype(dtype))[1][:n_atom]
        return node_energy if per_atom else jnp.sum(node_energy)

    return energy


def _covering(potential: Potential, box) -> Potential:
    """The potential with long-range terms sized for `box` (None: free space)."""
    if not potential.global_terms:
        return potential
    cell = np.zeros((3, 3)) if box is None else _host_box(box).T
    return potential.covering(cell[None], margin=1.2)


def _graph(R, kwargs, box, fractional, species, node_mask, senders, receivers, edge_mask, total_charge, dtype):
    """The one-structure graph around jax-md's edges: real positions and the cell (rows =
    lattice vectors), both carried through jax-md's `perturbation` (stress), which global
    terms need; the local terms use the displacement vectors passed beside it."""
    current_box = kwargs.get("box", box)
    if current_box is None:
        positions, cell = R, jnp.zeros((3, 3), R.dtype)
    else:
        T = box_matrix(current_box)
        positions, cell = (R @ T.T if fractional else R), T.T
    if "perturbation" in kwargs:  # jax-md's strain: r → P r for every vector
        P = jnp.asarray(kwargs["perturbation"])
        P = jnp.eye(3, dtype=R.dtype) * P if P.ndim == 0 else P
        positions, cell = positions @ P.T, cell @ P.T
    positions = jnp.concatenate([positions, jnp.zeros((1, 3), positions.dtype)]).astype(dtype)
    return one_graph(positions, species, node_mask, senders, receivers, edge_mask, cell.astype(dtype), total_charge=total_charge)


def _nodes(potential: Potential, atomic_numbers) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(species [N + 1], node_mask [N + 1]) for N atoms plus the padding node that jax-md's
    padding list entries are sent to (`_mask_padding`)."""
    species = jnp.asarray(np.concatenate([species_indices(potential, atomic_numbers), [0]]), jnp.int32)
    return species, jnp.arange(species.shape[0]) < species.shape[0] - 1


def properties_fn(
    potential: Potential,
    displacement_fn: Callable,
    atomic_numbers: Sequence[int],
    box=None,
    fractional_coordinates: bool | None = None,
    total_charge: float = 0.0,
) -> Callable[..., dict]:
    """`props(R, neighbor=None, **kwargs)` → {"energy", "energies", "forces", "virial",
    "virials", and with a box "stress"; with electrostatics "charges"} in eV, eV/Å, eV
    (virials per atom, [N, 3, 3]), eV/Å³ (ASE sign) and e, from one backward pass over
    edge vectors (and positions and strain for long-range terms: `energy_and_derivatives`).

    The per-atom virials sum to the total virial (per-atom virials cover the local and
    pair terms only); stress = −virial / V.
    """
    species, node_mask = _nodes(potential, atomic_numbers)
    n_atom = species.shape[0] - 1
    dtype = potential.np_dtype
    potential = _covering(potential, box)

    def props(R, neighbor=None, **kwargs):
        vectors, senders, receivers, edge_mask = _edges(displacement_fn, R, neighbor, kwargs, fractional_coordinates)
        current_box = kwargs.get("box", box)
        graph = _graph(R, kwargs, box, fractional_coordinates, species, node_mask, senders, receivers, edge_mask, total_charge, dtype)
        out = energy_and_derivatives(potential, potential.variables, graph, vectors=vectors.astype(dtype))
        result = {
            "energy": out["energy"][0],
            "energies": out["node_energy"][:n_atom],
            "forces": out["forces"][:n_atom],
            "virial": out["virial"][0],
            "virials": out["node_virial"][:n_atom],
        }
        if "charges" in out:
            result["charges"] = out["charges"][:n_atom]
        if current_box is not None:
            result["stress"] = out["stress"][0]
        return result

    return props


# --- neighbor lists -------------------------------------------------------------------


def _cutoff_of(potential_or_cutoff) -> float:
    return float(potential_or_cutoff.cutoff if isinstance(potential_or_cutoff, Potential) else potential_or_cutoff)


def _static_cell_size(nbrs: NeighborList) -> NeighborList:
    """jax-md 0.2.29 stores the fractional cell size as a jax array in a *static* field,
    which breaks pytree equality checks (eval_shape, jit caching); make it a float."""
    if nbrs.cell_size is not None:
        nbrs = dataclasses.replace(nbrs, cell_size=float(np.asarray(nbrs.cell_size)))
    return nbrs


@dataclasses.dataclass(frozen=True)
class _MinImageUpdate:
    """Update of a jax-md Sparse list.

    Periodic lists are always jax-md lists over *fractional* positions (its cell list
    needs them for triclinic boxes and for box changes); with real coordinates we convert
    with the current box first. Also flags (CELL_SIZE_TOO_SMALL) a box that has become
    too small for minimum image, e.g. during NPT.
    """

    inner: Callable  # jax-md's update function
    cutoff: float  # r_cutoff + dr_threshold
    box: tuple | None  # allocation box (static), None in free space
    real_positions: bool = False  # convert real → fractional before calling jax-md

    def current_box(self, kwargs):
        return box_matrix(kwargs["box"]) if "box" in kwargs else jnp.asarray(self.box)

    def prepare(self, position, kwargs):
        if self.real_positions:
            if isinstance(position, jax.core.Tracer) or isinstance(kwargs.get("box"), jax.core.Tracer):
                position = space.transform(jnp.linalg.inv(self.current_box(kwargs)), position)
            else:  # host-side allocation: numpy, no compilation
                box = _host_box(kwargs["box"]) if "box" in kwargs else np.asarray(self.box)
                position = jnp.asarray(np.linalg.solve(box, np.asarray(position, np.float64).T).T, position.dtype)
        return position

    def __call__(self, position, neighbors, **kwargs):
        nbrs = self.inner(self.prepare(position, kwargs), neighbors, **kwargs)
        nbrs = dataclasses.replace(nbrs, update_fn=self)
        if self.box is None:
            return nbrs
        too_small = jnp.min(perpendicular_widths(self.current_box(kwargs))) < 2.0 * self.cutoff
        return dataclasses.replace(nbrs, error=nbrs.error.update(PEC.CELL_SIZE_TOO_SMALL, too_small))


@dataclasses.dataclass(frozen=True)
class _MultiImageUpdate:
    """Update of a jax-md multi-image list (`custom_partition`) that remembers the coordinates."""

    inner: Callable  # jax-md's update function
    fractional: bool

    def __call__(self, position, neighbors, **kwargs):
        new = self.inner(position, neighbors, **kwargs)
        # Sticky, as the error code of jax-md's other lists: an overflow in any update of a
        # loop of steps stays flagged until the list is reallocated (jax-md's multi-image
        # flag describes the last update only).
        overflow = jnp.logical_or(new.did_buffer_overflow, neighbors.did_buffer_overflow)
        return dataclasses.replace(new, update_fn=self, did_buffer_overflow=overflow)


def _multi_image_edges(R, neighbor, kwargs, fractional: bool | None):
    """Edges of a jax-md `NeighborListMultiImage`: v = T (s_j − s_i − c + n) for pair (i → j, shift n).

    jax-md stores (receivers=i, senders=j, shift n) for the vector r_j + n·T − r_i; in our
    naming i sends and j receives. c counts the boundary wraps of i and j since the list
    was built (shift_fn wraps positions back into the box): without it an atom that
    crosses a face between the rebuild and the force evaluation would make its edges
    point at the wrong image.
    """
    if isinstance(neighbor.update_fn, _MultiImageUpdate):
        fractional = neighbor.update_fn.fractional
    if fractional is None:
        raise ValueError(
            "a jax-md multi-image neighbor list needs energy_fn(..., fractional_coordinates=True/False) "
            "(or build it with mpnn.jaxmd.neighbor_list, which records it)"
        )
    n = R.shape[0]
    senders, receivers, mask = _mask_padding(neighbor.idx[0], neighbor.idx[1], n)
    T = box_matrix(kwargs["box"]) if "box" in kwargs else neighbor.box
    pad = jnp.zeros((1, R.shape[1]), R.dtype)
    if fractional:
        s, s_ref = R, neighbor.reference_position
    else:
        inv = jnp.linalg.inv(T)
        s, s_ref = space.transform(inv, R), space.transform(jnp.linalg.inv(neighbor.reference_box), neighbor.reference_position)
    s, s_ref = jnp.concatenate([s, pad]), jax.lax.stop_gradient(jnp.concatenate([s_ref, pad]))
    d = s[receivers] - s[senders]
    wraps = jax.lax.stop_gradient(jnp.round(d - (s_ref[receivers] - s_ref[senders])))
    vectors = space.transform(T, d - wraps + neighbor.shifts.astype(s.dtype))
    if kwargs.get("perturbation") is not None:
        vectors = space.raw_transform(kwargs["perturbation"], vectors)
    return vectors, senders, receivers, mask


def overflowed(nbrs) -> jnp.ndarray:
    """Traced bool: the list overflowed or no longer fits the box; reallocate and redo the step.

    (jax-md sets its MALFORMED_BOX bit on *valid* boxes in 0.2.29, so that bit is ignored;
    `neighbor_list` checks the box shape itself.)
    """
    if isinstance(nbrs, NeighborListMultiImage):
        return jnp.asarray(nbrs.did_buffer_overflow, bool)
    bits = PEC.NEIGHBOR_LIST_OVERFLOW | PEC.CELL_LIST_OVERFLOW | PEC.CELL_SIZE_TOO_SMALL
    return (nbrs.error.code & bits) != 0


def needs_reallocation(nbrs) -> bool:
    """Host-side `overflowed`."""
    return bool(jax.device_get(overflowed(nbrs)))


def neighbor_list(
    potential_or_cutoff: Potential | float,
    displacement_fn: Callable,
    box=None,
    *,
    fractional_coordinates: bool = False,
    dr_threshold: float = 0.0,
    capacity_multiplier: float = 1.25,
    multi_image: bool | str = "auto",
    disable_cell_list: bool = False,
) -> NeighborListFns:
    """Neighbor list functions (`allocate`, `update`) for `energy_fn` of this potential.

    box=None: free space (all-pairs candidates, no cell list). Otherwise periodic: a
    jax-md Sparse list when minimum image is exact (perpendicular widths ≥ 2·(cutoff +
    dr_threshold)), else our multi-image list (multi_image="auto"/True; False raises).
    dr_threshold: skin; 0 rebuilds every update (usually cheapest for MLIPs, whose cost
    grows with the number of edges). fractional_coordinates says what the *positions*
    are; either works for any box (triclinic boxes must be upper triangular, see
    `system_from_atoms`), and box changes go in as `update(R, nbrs, box=new_box)`.

    The returned `update` (and `nbrs.update`) is jittable; check `needs_reallocation(nbrs)`
    on the host and call `allocate` again when it says so.
    """
    r_cutoff = _cutoff_of(potential_or_cutoff)
    cutoff = r_cutoff + dr_threshold
    if box is None:
        fns = partition.neighbor_list(
            displacement_fn, 1.0, r_cutoff, dr_threshold=dr_threshold, capacity_multiplier=capacity_multiplier,
            disable_cell_list=True, format=partition.Sparse,
        )
        wrap = _MinImageUpdate(fns.update, cutoff, None)

        def allocate_free(position, extra_capacity: int = 0, **kwargs):
            return _static_cell_size(dataclasses.replace(fns.allocate(position, extra_capacity, **kwargs), update_fn=wrap))

        return NeighborListFns(allocate_free, lambda position, nbrs, **kw: nbrs.update(position, **kw))

    box = jnp.asarray(box)
    if box.ndim == 2 and not _is_upper_triangular(box):
        raise ValueError(
            "the box must be upper triangular with lattice vectors as columns (jax-md convention); "
            "mpnn.jaxmd.system_from_atoms rotates an ASE cell into that form"
        )
    if multi_image not in ("auto", True, False):
        raise ValueError(f"multi_image must be 'auto', True or False, got {multi_image!r}")
    T_host = _host_box(box)
    T = jnp.asarray(T_host, box.dtype)
    box_static = tuple(map(tuple, T_host))
    # jax-md's list works on fractional positions whatever the caller uses (see _MinImageUpdate).
    displacement_frac, _ = space.periodic_general(T, fractional_coordinates=True)
    fns = partition.neighbor_list(
        displacement_frac, T, r_cutoff, dr_threshold=dr_threshold, capacity_multiplier=capacity_multiplier,
        disable_cell_list=disable_cell_list, fractional_coordinates=True, format=partition.Sparse,
    )
    wrap = _MinImageUpdate(fns.update, cutoff, box_static, real_positions=not fractional_coordinates)
    multi_fns = custom_partition.neighbor_list_multi_image(
        None, T, r_cutoff, dr_threshold=dr_threshold, capacity_multiplier=capacity_multiplier,
        fractional_coordinates=fractional_coordinates, format=partition.Sparse,
    )
    multi_wrap = _MultiImageUpdate(multi_fns.update, fractional_coordinates)

    def allocate_multi(position, extra_capacity: int = 0, **kwargs):
        box_now = kwargs.get("box")
        box_now = None if box_now is None else jnp.asarray(_host_box(box_now), position.dtype)
        nbrs = multi_fns.allocate(position, extra_capacity, box=box_now)
        return dataclasses.replace(nbrs, update_fn=multi_wrap)

    def allocate(position, extra_capacity: int = 0, **kwargs):
        current = kwargs.get("box", box)
        if multi_image is True or not min_image_is_exact(current, cutoff):
            if multi_image is False:
                widths = np.round(_host_widths(current), 3).tolist()
                raise ValueError(
                    f"box widths {widths} Å are smaller than 2 × (cutoff + dr_threshold) = {2 * cutoff:.3f} Å: "
                    "jax-md's neighbor lists and periodic displacements are minimum-image and would miss "
                    "periodic images. Use multi_image=True (or 'auto') or a supercell."
                )
            return allocate_multi(position, extra_capacity, **kwargs)
        nbrs = fns.allocate(wrap.prepare(position, kwargs), extra_capacity, **kwargs)
        return _static_cell_size(dataclasses.replace(nbrs, update_fn=wrap))

    return NeighborListFns(allocate, lambda position, nbrs, **kw: nbrs.update(position, **kw))


# --- systems from ASE -----------------------------------------------------------------


class JaxMDSystem(NamedTuple):
    """An ASE structure in jax-md form.

    positions: [N, 3] real (Å, in the rotated frame) or, with fractional=True, fractional.
    box: [3, 3] upper-triangular T (columns = lattice vectors, Å), None in free space.
    rotation: Q with real_rotated = real_original @ Q.T (orthogonal; identity in free space).
    """

    positions: jnp.ndarray
    box: jnp.ndarray | None
    displacement_fn: Callable
    shift_fn: Callable
    numbers: np.ndarray
    masses: np.ndarray  # amu
    rotation: np.ndarray
    fractional: bool

    def real_positions(self, positions, box=None) -> np.ndarray:
        """Positions (Å) in the original (unrotated) frame."""
        positions = np.asarray(positions, dtype=np.float64)
        box = self.box if box is None else box
        if self.fractional and box is not None:
            positions = positions @ _host_box(box).T
        return positions @ self.rotation

    def cell(self, box=None) -> np.ndarray:
        """ASE cell (rows = lattice vectors) in the original frame."""
        box = self.box if box is None else box
        return _host_box(box).T @ self.rotation

    def to_original_frame(self, vectors) -> np.ndarray:
        """Real-space vectors (forces, velocities) back to the original frame."""
        return np.asarray(vectors, dtype=np.float64) @ self.rotation


def system_from_atoms(atoms, fractional_coordinates: bool = False, dtype=None) -> JaxMDSystem:
    """ASE atoms → positions, box and jax-md space for `energy_fn` and the integrators.

    Fully periodic cells are rotated into ASE's lower-triangular standard form, so the
    jax-md box T = cell.T is upper triangular (what jax-md's triclinic support needs).
    Non-periodic atoms use free space. Mixed boundary conditions (slabs) are not
    supported by jax-md spaces: use the ASE calculator, or make the cell fully periodic
    with enough vacuum.
    """
    pbc = np.asarray(atoms.pbc, dtype=bool)
    dtype = dtype or (jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    numbers = np.asarray(atoms.numbers)
    masses = np.asarray(atoms.get_masses(), dtype=np.float64)
    if not pbc.any():
        displacement_fn, shift_fn = space.free()
        return JaxMDSystem(jnp.asarray(atoms.positions, dtype), None, displacement_fn, shift_fn, numbers, masses, np.eye(3), False)
    if not pbc.all():
        raise ValueError(
            f"pbc={pbc.tolist()}: jax-md spaces are either free or periodic in all directions. "
            "Use the ASE calculator (mpnn.MPNNCalculator) for slabs, or set pbc=True with enough vacuum."
        )
    if atoms.cell.volume < 1e-9:
        raise ValueError("periodic atoms need a cell with non-zero volume")
    rcell, Q = atoms.cell.standard_form()
    rcell = np.asarray(rcell)
    positions = atoms.positions @ Q.T
    T = rcell.T  # upper triangular, columns = lattice vectors
    frac = np.linalg.solve(T, positions.T).T
    frac = frac - np.floor(frac)  # wrapped into the box, as jax-md's lists expect
    positions = frac if fractional_coordinates else frac @ T.T
    box = jnp.asarray(T, dtype)
    displacement_fn, shift_fn = space.periodic_general(box, fractional_coordinates=fractional_coordinates)
    return JaxMDSystem(jnp.asarray(positions, dtype), box, displacement_fn, shift_fn, numbers, masses, np.asarray(Q), fractional_coordinates)
