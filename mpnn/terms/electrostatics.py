"""Electrostatics of learned charges: a global energy term with no cutoff.

Charges. The model reads a raw charge q̃_i out of each atom's invariant features (a second
readout beside the energy). The total charge Q of each frame (`atoms.info["charge"]`,
default 0) is then imposed exactly by sharing the excess equally over the frame's atoms:

    q_i = q̃_i + (Q − Σ_j q̃_j) / N                                  (e)

This is the "learned charge plus equal-share correction" route: one linear constraint,
no linear solve, and charges stay local functions of the environment up to a frame-wide
constant (charge equilibration, as in 4G-HDNNP, would move charge between distant atoms
in response to the field; it needs an N×N solve per step and is left for later).

Energy. Each charge is a Gaussian cloud of width σ (`charge_sigma`, Å), so two charges
interact through erf(r / 2σ) / r, which is finite as r → 0: the local model keeps the
short range, electrostatics carries the 1/r tail. With k = 14.399645 eV·Å/e²,

    free space   E = k/2 Σ_{i≠j} q_i q_j erf(r_ij / 2σ) / r_ij        (all pairs, no cutoff)
    periodic     the same sum over all periodic images, by Ewald summation:

    E = k/2 Σ_{pairs, images, r < r_c} q_i q_j [erf(r/2σ) − erf(r/√2η)] / r       real space
      + k · 2π/V Σ_{k≠0} exp(−η²k²/2) / k² · |S(k)|²,  S(k) = Σ_i q_i e^{ik·r_i}   reciprocal
      − k/2 Σ_i q_i² √(2/π) / η                                                    self
      − k π (η² − 2σ²) Q² / V                                                      background

The split width η is free; with η = √2σ the real-space part vanishes and only the
reciprocal sum is left (the choice of Cheng's latent Ewald summation, LES, 2025): no
neighbor list and no cutoff inside the term, which is what `Electrostatics` uses. The
real-space part is there for point charges (σ = 0: the Madelung test). A net charge is
compensated by a uniform neutralising background (the usual convention, and the last
line above, which makes E independent of η); only energy differences at fixed Q mean
anything then. Cells must be periodic in all three directions or none.

Reciprocal vectors: k = 2π m·B (B = inverse cell, transposed), m on an integer grid
|m_a| ≤ n_a on one half of k-space (k and −k give the same term). n_a = ⌈k_max |a_a| / 2π⌉
with exp(−η²k_max²/2) = `accuracy`: the grid is static (a shape), chosen on the host from
the cells it must serve (`Electrostatics.covering`). Its cost is O(N · n_k), and n_k grows
with the cell volume, so O(N²) at fixed σ: fine up to a few hundred atoms per cell.
Larger cells use smooth particle-mesh Ewald (`pme_energies`, Essmann et al. 1995): the
same reciprocal sum with charges spread on a mesh by cubic B-splines and FFTs, O(N + M log M),
within ~1e-4 of the Ewald energy at the default mesh spacing η/3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erf

COULOMB = 14.399645  # e²/(4πε0), eV·Å


# --- charges --------------------------------------------------------------------------


def equal_share_charges(raw_charges, node_mask, node_graph, n_graph: int, total_charge) -> jnp.ndarray:
    """q_i = q̃_i + (Q_g − Σ_{j∈g} q̃_j) / N_g for the real atoms of each frame g; 0 on padding.

    raw_charges [n_node] e, node_mask [n_node] bool, node_graph [n_node], total_charge [n_graph] e.
    """
    raw = jnp.where(node_mask, raw_charges, 0.0)
    count = jax.ops.segment_sum(node_mask.astype(raw.dtype), node_graph, n_graph)
    excess = (total_charge - jax.ops.segment_sum(raw, node_graph, n_graph)) / jnp.maximum(count, 1.0)
    return jnp.where(node_mask, raw + excess[node_graph], 0.0)


# --- free space -----------------------------------------------------------------------


def _screened_inverse(r, width: float):
    """erf(r / width) / r with its finite limit 2/(√π width) at r = 0; 1/r for width 0."""
    if width == 0:
        return 1.0 / r
    safe = jnp.where(r > 0, r, 1.0)
    return jnp.where(r > 0, erf(safe / width) / safe, 2.0 / (math.sqrt(math.pi) * width))


def free_space_energies(positions, charges, node_mask, node_graph, sigma: float) -> jnp.ndarray:
    """Per-atom energies k/2 q_i Σ_{j≠i, same frame} q_j erf(r_ij/2σ)/r_ij, [n_node] eV.

    All pairs of the batch (O(n_node²) memory): meant for molecules and clusters, not for
    large systems (those are periodic and go through `ewald_energies`). σ > 0.
    """
    same = (node_graph[:, None] == node_graph[None, :]) & node_mask[:, None] & node_mask[None, :]
    same = same & ~jnp.eye(positions.shape[0], dtype=bool)
    diff = positions[:, None, :] - positions[None, :, :]
    r2 = jnp.sum(diff**2, axis=-1)
    # Double where: the gradient of sqrt at the masked (zero) entries stays finite.
    r = jnp.sqrt(jnp.where(same, r2, 1.0))
    kernel = jnp.where(same, _screened_inverse(r, 2.0 * sigma), 0.0)
    return 0.5 * COULOMB * charges * (kernel @ charges)


# --- periodic: Ewald ------------------------------------------------------------------


def k_grid_size(cells: np.ndarray, eta: float, accuracy: float = 1e-8) -> tuple[int, int, int]:
    """Static half-widths (n_1, n_2, n_3) of the integer grid of reciprocal vectors that
    covers |k| ≤ k_max, exp(−η² k_max² / 2) = accuracy, for every cell in `cells` [.., 3, 3] Å."""
    cells = np.asarray(cells, dtype=np.float64).reshape(-1, 3, 3)
    k_max = math.sqrt(2.0 * math.log(1.0 / accuracy)) / eta
    lengths = np.linalg.norm(cells, axis=-1).max(axis=0)  # |a_1|, |a_2|, |a_3| (largest over cells)
    return tuple(max(1, int(math.ceil(k_max * length / (2 * math.pi)))) for length in lengths)


def _half_space_grid(n: tuple[int, int, int]) -> np.ndarray:
    """Integer vectors m with |m_a| ≤ n_a, one of each pair (m, −m), m ≠ 0: [K, 3]."""
    axes = [np.arange(-k, k + 1) for k in n]
    m = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    first_nonzero = np.where(m[:, 0] != 0, m[:, 0], np.where(m[:, 1] != 0, m[:, 1], m[:, 2]))
    return m[first_nonzero > 0]


def _cell_geometry(cell):
    """(volume [G] with 1 where a frame has no cell, fractional matrix inv(cell) [G, 3, 3]
    with the identity there): what both periodic sums need, safe on molecules' zero cells."""
    volume = jnp.abs(jnp.linalg.det(cell))
    periodic = volume > 0
    eye = jnp.eye(3, dtype=cell.dtype)
    return jnp.where(periodic, volume, 1.0), jnp.linalg.inv(jnp.where(periodic[:, None, None], cell, eye))


def _self_and_background(q, node_graph, n_graph: int, sigma: float, eta: float, volume):
    """Per-atom share of the self term and of the neutralising background (module docstring)."""
    total = jax.ops.segment_sum(q, node_graph, n_graph)
    self_energy = 0.5 * COULOMB * q**2 * math.sqrt(2.0 / math.pi) / eta
    background = COULOMB * math.pi * (eta**2 - 2.0 * sigma**2) * q * (total / volume)[node_graph]
    return -self_energy - background


def ewald_energies(
    positions,
    charges,
    cell,
    node_mask,
    node_graph,
    n_graph: int,
    sigma: float,
    eta: float,
    k_grid: tuple[int, int, int],
    pairs=None,
    chunk: int = 2048,
) -> jnp.ndarray:
    """Per-atom Ewald energies [n_node] eV of Gaussian charges (width σ ≥ 0; 0 = point
    charges) in periodic cells, summing to E of the module docstring.

    positions [n_node, 3] Å; charges [n_node] e; cell [n_graph, 3, 3] Å (rows); node_graph
    [n_node]; eta: Ewald split width (Å). k_grid: static grid half-widths (`k_grid_size`).
    pairs: (senders, receivers, vectors [n_pair, 3], pair_mask) of every pair and image
    closer than the real-space cutoff (both directions) — needed unless eta = √2σ, where
    the real-space part vanishes.

    The reciprocal sum runs over chunks of `chunk` k-vectors (a scan, rematerialised in
    the backward pass), so memory is O(n_node · chunk) rather than O(n_node · n_k).
    Phases are 2π m·s with fractional coordinates s: one integer grid m serves every
    frame of a batch, whatever its cell.
    """
    dtype = positions.dtype
    q = jnp.where(node_mask, charges, 0.0)
    m = _half_space_grid(k_grid)
    chunk = min(chunk, len(m))
    n_chunks = -(-len(m) // chunk)
    m = np.concatenate([m, np.zeros((n_chunks * chunk - len(m), 3), m.dtype)])  # m = 0 rows weigh 0
    m_chunks = jnp.asarray(m.reshape(n_chunks, chunk, 3), dtype)
    safe_volume, inverse = _cell_geometry(cell)
    reciprocal = 2 * jnp.pi * inverse.swapaxes(1, 2)  # k = m · B
    fractional = jnp.einsum("ni,nij->nj", positions, inverse[node_graph])  # r = s · cell
    # Frame membership as a matrix: sums over a frame's atoms and broadcasts back are
    # matmuls (XLA's CPU scatter-add is several times slower at [n_node, chunk]).
    membership = (node_graph[:, None] == jnp.arange(n_graph)[None, :]).astype(dtype)  # [N, G]

    @jax.checkpoint
    def add_chunk(potential, m_chunk):
        k2 = jnp.sum(jnp.einsum("kj,gji->gki", m_chunk, reciprocal) ** 2, axis=-1)  # [G, C]
        safe_k2 = jnp.where(k2 > 0, k2, 1.0)
        weight = jnp.where(k2 > 0, 4 * jnp.pi * jnp.exp(-0.5 * eta**2 * safe_k2) / safe_k2, 0.0) / safe_volume[:, None]
        phase = 2 * jnp.pi * fractional @ m_chunk.T  # [N, C]
        cos, sin = jnp.cos(phase), jnp.sin(phase)
        structure_cos = membership.T @ (q[:, None] * cos)  # [G, C]
        structure_sin = membership.T @ (q[:, None] * sin)
        # Each atom's share of k/2 · Σ_{all k≠0} w |S|², written over the half space (×2).
        share = cos * (membership @ (weight * structure_cos)) + sin * (membership @ (weight * structure_sin))
        return potential + jnp.sum(share, axis=1), None

    potential, _ = jax.lax.scan(add_chunk, jnp.zeros_like(q), m_chunks)
    energy = COULOMB * q * potential + _self_and_background(q, node_graph, n_graph, sigma, eta, safe_volume)
    if pairs is not None:
        senders, receivers, vectors, pair_mask = pairs
        r = jnp.sqrt(jnp.where(pair_mask, jnp.sum(vectors**2, axis=-1), 1.0))
        sigma_part = _screened_inverse(r, 2.0 * sigma) if sigma > 0 else 1.0 / r
        kernel = jnp.where(pair_mask, sigma_part - _screened_inverse(r, math.sqrt(2.0) * eta), 0.0)
        energy = energy + 0.5 * COULOMB * q * jax.ops.segment_sum(kernel * q[senders], receivers, positions.shape[0])
    return jnp.where(node_mask, energy, 0.0)


def mesh_size(cells: np.ndarray, spacing: float) -> tuple[int, int, int]:
    """Static PME mesh (M_1, M_2, M_3): at most `spacing` Å between mesh points along
    every lattice vector of every cell in `cells` [.., 3, 3] Å; even sizes."""
    cells = np.asarray(cells, dtype=np.float64).reshape(-1, 3, 3)
    lengths = np.linalg.norm(cells, axis=-1).max(axis=0)
    return tuple(int(2 * max(4, math.ceil(length / spacing / 2))) for length in lengths)


def _cubic_bspline_weights(t):
    """Weights of the 4 mesh points floor(u) − j, j = 0..3, for offsets t = u − floor(u):
    the cardinal cubic B-spline M_4(t + j). [..] → [.., 4]; they sum to 1."""
    return jnp.stack(
        [t**3, ((-3 * t + 3) * t + 3) * t + 1, (3 * t - 6) * t**2 + 4, (1 - t) ** 3], axis=-1
    ) / 6.0


def _bspline_modulus_squared(size: int) -> np.ndarray:
    """|b(m)|² of smooth PME (Essmann et al. 1995) for a cubic B-spline, m = fftfreq order."""
    m = np.fft.fftfreq(size) * size
    k = np.arange(3)  # Σ_{k=0}^{n−2} M_4(k + 1) e^{2πi m k / M}, M_4(1, 2, 3) = 1/6, 4/6, 1/6
    denominator = np.abs((np.array([1.0, 4.0, 1.0]) / 6.0 * np.exp(2j * np.pi * np.outer(m, k) / size)).sum(axis=1)) ** 2
    return 1.0 / denominator


def pme_energies(
    positions, charges, cell, node_mask, node_graph, n_graph: int, sigma: float, eta: float, mesh: tuple[int, int, int]
) -> jnp.ndarray:
    """Per-atom energies [n_node] eV of the same periodic sum as `ewald_energies` with
    eta = √2σ (no real-space part), by smooth particle-mesh Ewald: charges spread on a
    mesh of `mesh` points per cell (cubic B-splines), FFT, the Ewald kernel with the
    B-spline correction, inverse FFT, back to the atoms. O(N + M log M) instead of
    O(N · n_k); error ~1e-5 relative at the default spacing (tests compare with Ewald).
    Each frame of a batch gets its own mesh (same shape)."""
    dtype = positions.dtype
    q = jnp.where(node_mask, charges, 0.0)
    sizes = np.array(mesh)
    safe_volume, inverse = _cell_geometry(cell)
    scaled = jnp.einsum("ni,nij->nj", positions, inverse[node_graph]) * sizes  # u = s · M
    base = jnp.floor(scaled)
    weights = _cubic_bspline_weights(scaled - base)  # [N, 3, 4]
    points = (base.astype(jnp.int32)[:, :, None] - jnp.arange(4)[None, None, :]) % sizes[None, :, None]  # [N, 3, 4]
    # The 64 mesh points around each atom, as flat indices into [n_graph, M1, M2, M3].
    flat = (
        node_graph[:, None, None, None] * int(np.prod(sizes))
        + points[:, 0, :, None, None] * int(sizes[1] * sizes[2])
        + points[:, 1, None, :, None] * int(sizes[2])
        + points[:, 2, None, None, :]
    ).reshape(-1, 64)
    stencil = (weights[:, 0, :, None, None] * weights[:, 1, None, :, None] * weights[:, 2, None, None, :]).reshape(-1, 64)
    grid = jnp.zeros(n_graph * int(np.prod(sizes)), dtype).at[flat.reshape(-1)].add((q[:, None] * stencil).reshape(-1))
    grid = grid.reshape(n_graph, *mesh)
    # Kernel on the rfft half mesh: 4π exp(−η²k²/2) / k² / V · |b(m)|², zero at m = 0.
    m = np.stack(np.meshgrid(*(np.fft.fftfreq(n) * n for n in mesh[:2]), np.fft.rfftfreq(mesh[2]) * mesh[2], indexing="ij"), -1)
    bspline = np.einsum(
        "i,j,k->ijk", *(_bspline_modulus_squared(n) for n in mesh[:2]), _bspline_modulus_squared(mesh[2])[: mesh[2] // 2 + 1]
    )
    k2 = jnp.sum(jnp.einsum("xyzj,gji->gxyzi", jnp.asarray(m, dtype), 2 * jnp.pi * inverse.swapaxes(1, 2)) ** 2, axis=-1)
    safe_k2 = jnp.where(k2 > 0, k2, 1.0)
    kernel = jnp.where(k2 > 0, 4 * jnp.pi * jnp.exp(-0.5 * eta**2 * safe_k2) / safe_k2, 0.0)
    kernel = kernel * jnp.asarray(bspline, dtype) / safe_volume[:, None, None, None]
    potential_grid = jnp.fft.irfftn(kernel * jnp.fft.rfftn(grid, axes=(1, 2, 3)), s=mesh, axes=(1, 2, 3)) * int(np.prod(sizes))
    potential = jnp.sum(potential_grid.reshape(-1)[flat] * stencil, axis=1)  # [N]
    energy = 0.5 * COULOMB * q * potential + _self_and_background(q, node_graph, n_graph, sigma, eta, safe_volume)
    return jnp.where(node_mask, energy, 0.0)


# --- the energy term ------------------------------------------------------------------


@dataclass(frozen=True)
class Electrostatics:
    """Global term: electrostatic energy of the model's charges (see module docstring).

    Reads node_outputs["charge"] (raw charges q̃), returns per-frame and per-atom energies
    and the charges and dipoles it used. Periodic frames use Ewald (`ewald_energies`) or
    smooth PME (`pme_energies`): `method` "ewald", "pme" or "auto" (the cheaper by an
    operation count; PME from ~500 atoms per cell on). `k_grid` and `mesh`
    are the static reciprocal grid and PME mesh (None: no periodic frame expected);
    `free_space` says whether non-periodic frames may occur. All three are set on the
    host by `covering(cells)`.
    """

    sigma: float = 1.0  # Å, width of the Gaussian charges
    method: str = "auto"  # periodic frames: "ewald", "pme" or "auto"
    accuracy: float = 1e-8  # Ewald: relative size of the largest reciprocal term left out
    k_grid: tuple[int, int, int] | None = None
    mesh: tuple[int, int, int] | None = None
    free_space: bool = False

    def __post_init__(self):
        if self.method not in ("auto", "ewald", "pme"):
            raise ValueError(f"electrostatics method must be auto, ewald or pme, got {self.method!r}")

    @property
    def eta(self) -> float:
        return math.sqrt(2.0) * self.sigma  # no real-space part (module docstring)

    @property
    def mesh_spacing(self) -> float:
        return self.eta / 3.0  # Å; PME energies within ~1e-4 relative of Ewald (tested)

    def covering(self, cells, margin: float = 1.0) -> "Electrostatics":
        """This term with a reciprocal grid, a mesh and flags that serve every cell in
        `cells` [.., 3, 3] Å (zero cell = free space); they only grow, so recompilations
        stay rare. margin > 1 leaves room for cells that grow (NPT)."""
        cells = np.asarray(cells, dtype=np.float64).reshape(-1, 3, 3)
        periodic = np.abs(np.linalg.det(cells)) > 1e-9
        term = self
        if (~periodic).any() and not self.free_space:
            term = replace(term, free_space=True)
        if periodic.any():
            grown = {}
            for name, need in (
                ("k_grid", k_grid_size(cells[periodic] * margin, self.eta, self.accuracy)),
                ("mesh", mesh_size(cells[periodic] * margin, self.mesh_spacing)),
            ):
                have = getattr(self, name) or (0, 0, 0)
                if any(a > b for a, b in zip(need, have)):
                    grown[name] = tuple(max(a, b) for a, b in zip(need, have))
            if grown:
                term = replace(term, **grown)
        return term

    def uses_pme(self, n_node: int, n_graph: int) -> bool:
        """Whether periodic frames go through PME: by method, or for "auto" by comparing
        operation counts (Ewald: a sine and cosine per atom and k-vector; PME: 64 mesh
        points per atom and an FFT per frame; the factor 2 from timings on CPU, where PME
        is the cheaper from ~500 atoms per cell on)."""
        if self.method != "auto":
            return self.method == "pme"
        n_k = (np.prod([2 * n + 1 for n in self.k_grid]) - 1) // 2
        mesh = int(np.prod(self.mesh))
        return n_node * n_k > 2 * (64 * n_node + n_graph * mesh * math.log2(mesh))

    def __call__(self, positions, cell, numbers, node_mask, node_graph, n_graph, node_outputs, total_charge):
        charges = equal_share_charges(node_outputs["charge"], node_mask, node_graph, n_graph, total_charge)
        volume = jnp.abs(jnp.linalg.det(cell))
        periodic = (volume > 1e-9)[node_graph]
        energy = jnp.zeros_like(charges)
        if self.free_space:
            energy = jnp.where(periodic, 0.0, free_space_energies(positions, charges, node_mask, node_graph, self.sigma))
        if self.k_grid is not None:
            common = (positions, charges, cell, node_mask, node_graph, n_graph, self.sigma, self.eta)
            if self.uses_pme(positions.shape[0], n_graph):
                periodic_energy = pme_energies(*common, self.mesh)
            else:
                periodic_energy = ewald_energies(*common, self.k_grid)
            energy = energy + jnp.where(periodic, periodic_energy, 0.0)
        energy = jnp.where(node_mask, energy, 0.0)
        dipole = jax.ops.segment_sum(charges[:, None] * positions, node_graph, n_graph)
        return {
            "energy": jax.ops.segment_sum(energy, node_graph, n_graph),
            "node_energy": energy,
            "charges": charges,
            "dipole": dipole,
        }
