"""Symmetric contraction: the ACE product basis of MACE (Batatia et al., NeurIPS 2022).

For every node n and channel c, from the atomic basis A[n, c, :] (one copy of the
per-channel irreps, e.g. 0e + 1o + 2e + 3o) it builds

    B[n, c, LM] = Σ_{ν=1..correlation} Σ_k  w^(ν,L)[z_n, k, c]  Σ_{i1..iν} U^(ν,L)[i1..iν, k, M] A[n,c,i1] ··· A[n,c,iν]

where U^(ν,L) is the basis of the *symmetric* ν-fold tensor power of the per-channel irreps
that transforms as the irrep L (`e3nn.reduced_symmetric_tensor_product_basis`), k runs
over its K(ν, L) independent couplings, and the weights depend on the element z_n of the
node (one set per species, selected by index). Channels do not mix. There is no ν = 0
(constant) term, so zero input gives exactly zero output.

Evaluation. B is linear in the weights, so the element only enters at the end, through the
weights gathered per node (w[z_n]: [n_node, K, C]); nothing else depends on the number of
elements:

    m_ν[n, c, r]        = A[n,c,i1] ··· A[n,c,iν]                for sorted multi-indices r = (i1 ≤ .. ≤ iν)
    Φ^(ν,L)[n, c, k, M] = Σ_r S^(ν,L)[r, k, M] m_ν[n, c, r]
    B[n, c, LM]         = Σ_ν Σ_k w^(ν,L)[z_n, k, c] Φ^(ν,L)[n, c, k, M]

S^(ν,L) is U^(ν,L) folded onto sorted multi-indices (summed over the permutations of each;
exact, since the product of the A's is symmetric). S is very sparse (parity and angular
momentum selection: for 0e+1o+2e+3o → 0e+1o at ν = 3, 445 nonzeros in 816 × 44), so Φ is
a sparse product (gather the monomials of the nonzeros, scale, segment-sum over columns),
and only the monomials that some nonzero uses are built, together with their prefixes:
m_ν = m_{ν-1}[parent] · A[last] (355 of the 816 cubic monomials in that example). The
largest per-node tensors are the gathered terms of the highest order, one per nonzero of
S^(N) (445 per channel in that example, against d^(N-1)·M = 256·M for Horner's scheme).
Monomial and feature indices lead ([R, n_node, C], Φ as [K, M, n_node, C]) so that every
gather and scatter moves whole [n_node, C] slabs. The loops over orders and output irreps
run at trace time only.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def symmetric_bases(irreps_in: str, order: int, irreps_out: str) -> dict[e3nn.Irrep, np.ndarray]:
    """{L: U^(ν,L)} for the irreps L of `irreps_out` that `order` copies of `irreps_in` reach."""
    keep = [ir for _, ir in e3nn.Irreps(irreps_out)]
    try:
        basis = e3nn.reduced_symmetric_tensor_product_basis(e3nn.Irreps(irreps_in), order, keep_ir=keep)
    except ValueError:  # e3nn-jax 0.21 raises instead of returning an empty basis when nothing is reached
        return {}
    basis = basis.regroup()
    return {
        ir: np.asarray(chunk).reshape(basis.shape[:-1] + (mul, ir.dim))
        for (mul, ir), chunk in zip(basis.irreps, basis.chunks)
        if mul > 0
    }


def symmetric_basis(irreps_in: str, order: int, ir_out: str) -> np.ndarray | None:
    """U of shape [d]*order + [K, ir_out.dim] (d = irreps_in.dim), or None when K = 0.

    Each coupling k is normalised so that Σ_{i..} U[i.., k, M]² = 1 for every M.
    """
    return symmetric_bases(str(e3nn.Irreps(irreps_in)), order, str(e3nn.Irreps(ir_out))).get(e3nn.Irrep(ir_out))


def num_couplings(irreps_in: e3nn.Irreps, order: int, ir_out: e3nn.Irrep) -> int:
    """K(ν, L): how many independent ways `order` copies of `irreps_in` couple symmetrically to `ir_out`."""
    basis = symmetric_basis(str(e3nn.Irreps(irreps_in)), order, str(e3nn.Irrep(ir_out)))
    return 0 if basis is None else basis.shape[-2]


def _sorted_multi_indices(d: int, order: int) -> tuple[np.ndarray, np.ndarray]:
    """(i1 ≤ .. ≤ iν for every monomial, lexicographic [R, ν]; for each of the d^ν unsorted
    multi-indices, in row-major order, the row of its sorted version [d^ν])."""
    every = np.stack(np.unravel_index(np.arange(d**order), (d,) * order), axis=-1)
    indices, row = np.unique(np.sort(every, axis=-1), axis=0, return_inverse=True)
    return indices, row.reshape(-1)


class _Order(NamedTuple):
    """One order ν of the evaluation (numpy: trace-time constants)."""

    parent: np.ndarray  # [R_ν] row in m_{ν-1}: m_ν = m_{ν-1}[parent] · A[last]; ν = 1: empty, m_1 = A
    last: np.ndarray  # [R_ν]
    couplings: tuple[tuple[e3nn.Irrep, int], ...]  # (L, K(ν, L)) reached, in the column order of S
    rows: np.ndarray  # nonzeros of S [R_ν, Σ_L K·M] (columns (L, k, M) row-major), sorted by column
    cols: np.ndarray
    values: np.ndarray


@functools.lru_cache(maxsize=None)
def monomial_plan(irreps_in: str, correlation: int, irreps_out: str) -> tuple[_Order, ...]:
    """Orders ν = 1..N, N the highest order ≤ `correlation` that reaches some L of `irreps_out`:
    the monomials m_ν to build (the rows of S^(ν) with a nonzero, and the prefixes i1..iν of
    those of order ν + 1; for ν = 1 all of A) and the nonzeros of S^(ν) on them."""
    d = e3nn.Irreps(irreps_in).dim
    bases = {order: symmetric_bases(irreps_in, order, irreps_out) for order in range(1, correlation + 1)}
    top = max((order for order, per_ir in bases.items() if per_ir), default=0)

    kept, folded, prefixes = {}, {}, set()
    for order in range(top, 0, -1):
        indices, row_of = _sorted_multi_indices(d, order)
        columns = []
        for u in bases[order].values():  # S[r] = Σ over the permutations of multi-index r of U
            s = np.zeros((len(indices),) + u.shape[-2:])
            np.add.at(s, row_of, u.reshape((-1,) + u.shape[-2:]))
            columns.append(s.reshape(len(indices), -1))
        s = np.concatenate(columns, axis=1) if columns else np.zeros((len(indices), 0))
        keep = np.any(s != 0, axis=1) | np.array([order == 1 or tuple(t) in prefixes for t in indices])
        kept[order], folded[order] = [tuple(t) for t in indices[keep]], s[keep]
        prefixes = {t[:-1] for t in kept[order]}

    plan = []
    for order in range(1, top + 1):
        position = {t: r for r, t in enumerate(kept.get(order - 1, []))}
        cols, rows = np.nonzero(folded[order].T)
        plan.append(
            _Order(
                parent=np.array([position[t[:-1]] for t in kept[order]] if order > 1 else [], dtype=np.int32),
                last=np.array([t[-1] for t in kept[order]], dtype=np.int32),
                couplings=tuple((ir, u.shape[-2]) for ir, u in bases[order].items()),
                rows=rows.astype(np.int32),
                cols=cols.astype(np.int32),
                values=folded[order][rows, cols],
            )
        )
    return tuple(plan)


class SymmetricContraction(nn.Module):
    """Element-dependent symmetric contraction of per-channel features (see module doc).

    Attributes:
        irreps_out: per-channel output irreps, each with multiplicity 1, e.g. "0e + 1o".
        correlation: highest power ν of the input features (body order ν + 1).
        num_species: number of elements; every element has its own weights.

    Call: (x IrrepsArray [n_node, C, irreps_in.dim], species [n_node] int)
          → IrrepsArray [n_node, C, irreps.dim], with the irreps of `irreps_out` that the
          input can reach (in the order of `irreps_out`).

    Parameters: `w{ν}_{L}` of shape [num_species, K(ν, L), C], initialised N(0, 1/K).
    """

    irreps_out: e3nn.Irreps
    correlation: int
    num_species: int

    @nn.compact
    def __call__(self, x: e3nn.IrrepsArray, species: jnp.ndarray) -> e3nn.IrrepsArray:
        if x.ndim != 3:
            raise ValueError(f"expected x of shape [n_node, channels, irreps.dim], got {x.shape}")
        num_channels = x.shape[1]
        irreps_out = e3nn.Irreps(self.irreps_out)
        if any(mul != 1 for mul, _ in irreps_out):
            raise ValueError(f"irreps_out must have multiplicity 1 per irrep, got {irreps_out}")

        # Φ^(ν,L) [K, M, n, C], monomials m_ν [R_ν, n, C]: see the module doc.
        features = {}
        components = jnp.moveaxis(x.array, -1, 0)  # [d, n, C]
        monomials = components
        for order, step in enumerate(monomial_plan(str(x.irreps), self.correlation, str(irreps_out)), start=1):
            if order > 1:
                monomials = monomials[step.parent] * components[step.last]
            if not step.couplings:
                continue
            terms = jnp.asarray(step.values, x.dtype)[:, None, None] * monomials[step.rows]
            num_columns = sum(k * ir.dim for ir, k in step.couplings)
            phi = jax.ops.segment_sum(terms, step.cols, num_segments=num_columns, indices_are_sorted=True)
            offset = 0
            for ir, k in step.couplings:
                features[order, ir] = phi[offset : offset + k * ir.dim].reshape((k, ir.dim) + phi.shape[1:])
                offset += k * ir.dim

        irreps, chunks = [], []
        for _, ir in irreps_out:
            out = None
            for order in range(self.correlation, 0, -1):
                if (order, ir) not in features:
                    continue
                phi = features[order, ir]
                weights = self.param(
                    f"w{order}_{ir}",
                    nn.initializers.normal(stddev=phi.shape[0] ** -0.5),
                    (self.num_species, phi.shape[0], num_channels),
                )
                term = jnp.einsum("nkc,kmnc->ncm", weights.astype(x.dtype)[species], phi)  # weights of each node
                out = term if out is None else out + term
            if out is not None:
                irreps.append(ir)
                chunks.append(out[:, :, None, :])  # [n, C, 1, M]
        return e3nn.from_chunks(e3nn.Irreps(irreps), chunks, (x.shape[0], num_channels), x.dtype)
