"""Symmetric contraction: the ACE product basis of MACE (Batatia et al., NeurIPS 2022).

For every node n and channel c, from the atomic basis A[n, c, :] (one copy of the
per-channel irreps, e.g. 0e + 1o + 2e + 3o) it builds

    B[n, c, LM] = Σ_{ν=1..correlation} Σ_k  w^(ν,L)[z_n, k, c]  Σ_{i1..iν} U^(ν,L)[i1..iν, k, M] A[n,c,i1] ··· A[n,c,iν]

where U^(ν,L) is the basis of the *symmetric* ν-fold tensor power of the per-channel irreps
that transforms as the irrep L (`e3nn.reduced_symmetric_tensor_product_basis`), k runs
over its K(ν, L) independent couplings, and the weights depend on the element z_n of the
node (one set per species, selected by index). Channels do not mix. There is no ν = 0
(constant) term, so zero input gives exactly zero output.

Evaluation (Horner's scheme, highest order first):

    P_N = T_N;   P_ν = P_{ν+1}·A + T_ν;   B = P_1·A,      T_ν[z, c, i1..iν, M] = Σ_k w^(ν)[z,k,c] U^(ν)[i1..iν,k,M]

where "·A" contracts one tensor index with A. T_ν depends on the element, not on the
node, so it is built once per element. For the highest order, picking the element of each
node is fused with the first contraction (a one-hot over elements), so the largest
per-node tensor ever built is [n_node, C, d^(N-1), M] rather than [n_node, C, d^N, M].
The loops over orders and output irreps run at trace time only.
"""

from __future__ import annotations

import functools

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


def _contract_last(tensor: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """[n, C, d, ..., d, M] · [n, C, d] → [n, C, d, ..., M] (one tensor index fewer)."""
    return jnp.einsum("nc...im,nci->nc...m", tensor, x)


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
        irreps_in = str(x.irreps)
        one_hot = jax.nn.one_hot(species, self.num_species, dtype=x.dtype)  # [n, Z]
        # x of each node copied into the slot of its element: [n, Z, C, d].
        x_by_element = one_hot[:, :, None, None] * x.array[:, None, :, :]

        irreps_out = e3nn.Irreps(self.irreps_out)
        if any(mul != 1 for mul, _ in irreps_out):
            raise ValueError(f"irreps_out must have multiplicity 1 per irrep, got {irreps_out}")
        bases = {order: symmetric_bases(irreps_in, order, str(irreps_out)) for order in range(1, self.correlation + 1)}

        irreps, chunks = [], []
        for _, ir in irreps_out:
            out = None  # per node; on entering order ν it has ν open tensor indices
            for order in range(self.correlation, 0, -1):
                basis = bases[order].get(ir)
                if basis is None:
                    if out is not None:
                        out = _contract_last(out, x.array)
                    continue
                weights = self.param(
                    f"w{order}_{ir}",
                    nn.initializers.normal(stddev=basis.shape[-2] ** -0.5),
                    (self.num_species, basis.shape[-2], num_channels),
                )
                # T_ν per element: [Z, C, d^ν, M]
                per_element = jnp.einsum("...km,zkc->zc...m", jnp.asarray(basis, x.dtype), weights.astype(x.dtype))
                if out is None:
                    # Highest order: select the element and contract once, in one product.
                    out = jnp.einsum("zc...im,nzci->nc...m", per_element, x_by_element)
                else:
                    out = _contract_last(out + per_element[species], x.array)
            if out is not None:
                irreps.append(ir)
                chunks.append(out[:, :, None, :])  # [n, C, 1, M]
        return e3nn.from_chunks(e3nn.Irreps(irreps), chunks, (x.shape[0], num_channels), x.dtype)
