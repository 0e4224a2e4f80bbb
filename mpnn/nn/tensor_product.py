"""Channel-wise ("uvu") tensor product of node features with edge harmonics, summed over
neighbors: the message of MACE and NequIP, written as a few dense contractions.

    A[n] = Σ_{e: recv(e)=n} w[e] ⊙ (x[send(e)] ⊗ Y[e])

with x of irreps C x (ir_1 + ir_2 + ..) (every irrep with the same multiplicity C), Y the
edge harmonics, w one weight per (channel, path) and edge. The result is exactly
`e3nn.tensor_product(x[senders], Y, filter_ir_out).regroup() * w`, scattered to the
receivers (same irreps, same order, same weight layout), computed differently:

    T[e, i, q] = Σ_j Y[e, j] · K[i, j, q]       K: the tensor product of one channel
    m[e, q, u] = w[e, path(q), u] · Σ_i T[e, i, q] · x[send(e), i, u]
    A[n, q, u] = Σ_{e→n} m[e, q, u]

i runs over the components of one channel of x, q over the output components of one
channel (every path, e.g. 21 for 0e+1o ⊗ 0e+1o+2e → 0e+1o+2e), u over channels. Channels
lead nowhere and sit last, so every step streams whole rows of C floats; the [n_edge,
q, C] messages are built once (e3nn-jax's generic product, which concatenates per-path
chunks and broadcasts weights irrep by irrep, took 2-3× longer on CPU, forward and
backward; see benchmarks/speed.py).
"""

from __future__ import annotations

import functools

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np


def _channel_plan(irreps_in: e3nn.Irreps, irreps_sh: e3nn.Irreps, irreps_out: e3nn.Irreps):
    """(output irreps of one channel, multiplicity = number of paths, in e3nn's regrouped
    order; K [d_channel, d_sh, q]; `_paths`) for C x irreps_in. K is `e3nn.tensor_product`
    of one channel with the harmonics, read off on basis vectors (e3nn's own product,
    normalisation included; float64 when JAX runs in 64 bits)."""
    single = str(e3nn.Irreps([(1, ir) for _, ir in irreps_in]))
    return _plan(single, str(e3nn.Irreps(irreps_sh)), str(e3nn.Irreps(irreps_out)), bool(jax.config.jax_enable_x64))


@functools.lru_cache(maxsize=None)
def _plan(irreps_channel: str, irreps_sh: str, irreps_out: str, x64: bool):
    with jax.ensure_compile_time_eval():  # constants, also when first called inside a jit
        x = e3nn.IrrepsArray(irreps_channel, jnp.eye(e3nn.Irreps(irreps_channel).dim))
        y = e3nn.IrrepsArray(irreps_sh, jnp.eye(e3nn.Irreps(irreps_sh).dim))
        out = e3nn.tensor_product(x[:, None], y[None, :], filter_ir_out=e3nn.Irreps(irreps_out)).regroup()
        coefficients = np.asarray(out.array)
    return out.irreps, coefficients, _paths(coefficients, out.irreps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _sum_into(messages: jnp.ndarray, receivers: jnp.ndarray, n_node: int) -> jnp.ndarray:
    """segment_sum of [n_edge, q, C] messages over receivers, with a transpose that gathers
    a materialised [n_node, q, C] cotangent.

    Left to itself XLA fuses the cotangent's producers (the next layer's slices, padded
    and added) into the gather and into each of its consumers, recomputing them for
    every edge element: 2× slower backward on CPU. A dot is never fused into a loop, so
    the cotangent goes through one with the identity (n_node·q·C² flops, ~1 % of a
    layer) and is gathered from a plain buffer. (optimization_barrier would say this
    better, but XLA:CPU drops it before fusion.)"""
    return jax.ops.segment_sum(messages, receivers, n_node)


def _sum_into_fwd(messages, receivers, n_node):
    return _sum_into(messages, receivers, n_node), receivers


def _sum_into_bwd(n_node, receivers, cotangent):
    identity = jnp.eye(cotangent.shape[-1], dtype=cotangent.dtype)
    materialised = jnp.einsum("nqc,cd->nqd", cotangent, identity)
    return materialised[receivers], None


_sum_into.defvjp(_sum_into_fwd, _sum_into_bwd)


def _paths(coefficients: np.ndarray, per_channel: e3nn.Irreps) -> list[tuple[int, int, np.ndarray]]:
    """(first output component, dimension, the input components it reads) of each path."""
    paths, q = [], 0
    for mul, ir in per_channel:
        for _ in range(mul):
            inputs = np.flatnonzero(np.any(coefficients[:, :, q : q + ir.dim] != 0, axis=(1, 2)))
            paths.append((q, ir.dim, inputs))
            q += ir.dim
    return paths


MAX_BLOCK_BYTES = 256 * 2**20  # largest [n_edge, q, channels] message tensor built at once


def _channel_blocks(bytes_per_channel: int, channels: int) -> int:
    """The fewest blocks, a divisor of `channels`, that keep a block under MAX_BLOCK_BYTES."""
    for n_blocks in range(1, channels + 1):
        if channels % n_blocks == 0 and bytes_per_channel * channels // n_blocks <= MAX_BLOCK_BYTES:
            return n_blocks
    return channels


def is_channelwise(irreps: e3nn.Irreps) -> bool:
    """Every irrep with one multiplicity (what `channelwise_messages` takes)."""
    return len({mul for mul, _ in irreps}) == 1


def message_irreps(irreps_in: e3nn.Irreps, irreps_sh: e3nn.Irreps, irreps_out: e3nn.Irreps) -> e3nn.Irreps:
    """The irreps of the summed messages: C x (each path's output irrep), regrouped."""
    per_channel, _, _ = _channel_plan(irreps_in, irreps_sh, irreps_out)
    return e3nn.Irreps([(mul * irreps_in[0].mul, ir) for mul, ir in per_channel])


def channelwise_messages(
    node_feats: e3nn.IrrepsArray,  # [n_node, C x irreps]
    edge_sh: e3nn.IrrepsArray,  # [n_edge, sh irreps]
    weights: jnp.ndarray,  # [n_edge, message_irreps.num_irreps], e3nn's order: (path, channel)
    senders: jnp.ndarray,
    receivers: jnp.ndarray,
    irreps_out: e3nn.Irreps,
) -> e3nn.IrrepsArray:
    """Σ over incoming edges of weights ⊙ (node_feats[senders] ⊗ edge_sh), filtered to
    `irreps_out`: IrrepsArray [n_node, message_irreps(...)] (see the module doc)."""
    channels, n_node, n_edge = node_feats.irreps[0].mul, node_feats.shape[0], edge_sh.shape[0]
    per_channel, coefficients, paths = _channel_plan(node_feats.irreps, edge_sh.irreps, irreps_out)

    x = jnp.swapaxes(node_feats.mul_to_axis(channels).array, 1, 2)[senders]  # [n_edge, d, C]
    t = jnp.einsum("ej,ijq->eiq", edge_sh.array, jnp.asarray(coefficients, x.dtype))  # [n_edge, d, q]
    w = weights.reshape(n_edge, per_channel.num_irreps, channels)

    def summed_messages(x, w):  # [n_edge, d, c], [n_edge, paths, c] → [n_node, q, c]
        # Path by path (each reads one input irrep): broadcasts XLA fuses into one loop
        # over [n_edge, q, c]; a batched dot over all of i, or a gather to expand w, ran
        # 2-3× slower.
        pieces = []
        for path, (q, dim, inputs) in enumerate(paths):
            z = sum(t[:, i, q : q + dim, None] * x[:, i, None, :] for i in inputs)
            pieces.append(w[:, path, None, :] * z)
        return _sum_into(jnp.concatenate(pieces, axis=1), receivers, n_node)

    # Channels never mix here, so large messages are built a block of channels at a
    # time (rematerialised in the backward pass): the [n_edge, q, C] tensors of the
    # "paper" MACE on 864 atoms would take ~3 GB each.
    n_blocks = _channel_blocks(n_edge * coefficients.shape[-1] * x.dtype.itemsize, channels)
    if n_blocks == 1:
        summed = summed_messages(x, w)
    else:
        split = lambda a: jnp.moveaxis(a.reshape(a.shape[:2] + (n_blocks, channels // n_blocks)), 2, 0)
        blocks = jax.lax.map(jax.checkpoint(lambda xw: summed_messages(*xw)), (split(x), split(w)))
        summed = jnp.moveaxis(blocks, 0, 2).reshape(n_node, -1, channels)  # [n_node, q, C]

    # Back to e3nn's layout: per output irrep (path, channel, component). split, not
    # slices: its transpose is one concatenate, not a sum of padded copies.
    sizes = np.cumsum([mul * ir.dim for mul, ir in per_channel])[:-1]
    chunks = [
        jnp.swapaxes(block.reshape(n_node, mul, ir.dim, channels), 2, 3).reshape(n_node, mul * channels * ir.dim)
        for (mul, ir), block in zip(per_channel, jnp.split(summed, sizes, axis=1))
    ]
    irreps = message_irreps(node_feats.irreps, edge_sh.irreps, irreps_out)
    return e3nn.IrrepsArray(irreps, jnp.concatenate(chunks, axis=1))
