"""The channel-wise message (mpnn.nn.tensor_product) equals e3nn-jax's generic tensor
product followed by the per-(path, channel) weights and the neighbor sum: values and
gradients, for the irreps MACE and NequIP use."""

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpnn.nn.tensor_product import channelwise_messages, message_irreps


def reference(node_feats, edge_sh, weights, senders, receivers, irreps_out):
    messages = e3nn.tensor_product(node_feats[senders], edge_sh, filter_ir_out=e3nn.Irreps(irreps_out)).regroup()
    return e3nn.scatter_sum(messages * weights, dst=receivers, output_size=node_feats.shape[0])


@pytest.mark.parametrize(
    "irreps_in, l_max, irreps_out",
    [
        ("3x0e", 2, "0e+1o+2e"),  # MACE's first layer
        ("3x0e+3x1o", 2, "0e+1o+2e"),  # MACE's later layers
        ("3x0e+3x1o+3x2e", 3, "0e+1o+2e+3o"),  # MACE's paper size
        ("2x0e+2x0o+2x1o+2x1e", 1, "0e+0o+1o+1e"),  # NequIP with parity
    ],
)
def test_channelwise_messages_equal_e3nn(irreps_in, l_max, irreps_out):
    n_node, n_edge = 5, 17
    rng = np.random.default_rng(0)
    x = e3nn.normal(irreps_in, jax.random.PRNGKey(1), (n_node,), dtype=jnp.float64)
    sh = e3nn.spherical_harmonics(e3nn.Irreps.spherical_harmonics(l_max), jnp.asarray(rng.normal(size=(n_edge, 3))), normalize=True)
    senders, receivers = jnp.asarray(rng.integers(0, n_node, n_edge)), jnp.asarray(rng.integers(0, n_node, n_edge))
    irreps = message_irreps(e3nn.Irreps(irreps_in), sh.irreps, e3nn.Irreps(irreps_out))
    weights = jnp.asarray(rng.normal(size=(n_edge, irreps.num_irreps)))

    ours = jax.jit(channelwise_messages, static_argnums=5)(x, sh, weights, senders, receivers, irreps_out)
    theirs = jax.jit(reference, static_argnums=5)(x, sh, weights, senders, receivers, irreps_out)
    assert ours.irreps == theirs.irreps == irreps
    np.testing.assert_allclose(ours.array, theirs.array, rtol=1e-12, atol=1e-12)

    # Gradients with respect to everything that carries positions or parameters.
    probe = jnp.asarray(rng.normal(size=ours.shape))

    def loss(f, x, sh_array, w):
        return jnp.sum(probe * f(x, e3nn.IrrepsArray(sh.irreps, sh_array), w, senders, receivers, irreps_out).array)

    g_ours = jax.jit(jax.grad(lambda *a: loss(channelwise_messages, *a), argnums=(0, 1, 2)))(x, sh.array, weights)
    g_theirs = jax.jit(jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2)))(x, sh.array, weights)
    for a, b in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_channel_blocks_give_the_same_messages(monkeypatch):
    """Large message tensors are built a block of channels at a time: same values, same gradients."""
    import mpnn.nn.tensor_product as tp

    n_node, n_edge, irreps_in, irreps_out = 4, 9, "4x0e+4x1o", "0e+1o+2e"
    rng = np.random.default_rng(1)
    x = e3nn.normal(irreps_in, jax.random.PRNGKey(2), (n_node,), dtype=jnp.float64)
    sh = e3nn.spherical_harmonics(e3nn.Irreps.spherical_harmonics(2), jnp.asarray(rng.normal(size=(n_edge, 3))), normalize=True)
    senders, receivers = jnp.asarray(rng.integers(0, n_node, n_edge)), jnp.asarray(rng.integers(0, n_node, n_edge))
    weights = jnp.asarray(rng.normal(size=(n_edge, message_irreps(x.irreps, sh.irreps, e3nn.Irreps(irreps_out)).num_irreps)))

    def energy(x_array, w):
        out = channelwise_messages(e3nn.IrrepsArray(x.irreps, x_array), sh, w, senders, receivers, irreps_out)
        return jnp.sum(jnp.sin(out.array))

    whole = jax.jit(jax.value_and_grad(energy, argnums=(0, 1)))(x.array, weights)
    monkeypatch.setattr(tp, "MAX_BLOCK_BYTES", 1)  # one channel per block
    assert tp._channel_blocks(10, 4) == 4
    blocked = jax.jit(jax.value_and_grad(energy, argnums=(0, 1)))(x.array, weights)
    for a, b in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(blocked)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("irreps_in, irreps_out", [("6x0e+4x1o", "5x0e+3x1o+2x2e"), ("3x0e+2x0o+3x1o+2x1e", "4x0e+2x0o+3x1o+1x1e")])  # 2x2e: no input
def test_species_linear_equals_e3nn_indexed_linear(irreps_in, irreps_out, dense, monkeypatch):
    """SpeciesLinear has e3nn.flax.Linear(num_indexed_weights=...)'s parameters (same
    names, shapes and initial values: saved models load in either) and gives its values
    and gradients, by the dense route (few elements) and by e3nn's gather (many)."""
    from mpnn.nn import blocks

    monkeypatch.setattr(blocks, "DENSE_MAX_SPECIES", 100 if dense else 0)
    num_species, n_node = 4, 11
    species = jnp.asarray(np.random.default_rng(0).integers(0, num_species, n_node))
    x = e3nn.normal(irreps_in, jax.random.PRNGKey(1), (n_node,))
    ours = blocks.SpeciesLinear(irreps_out, num_species)
    theirs = e3nn.flax.Linear(irreps_out, num_indexed_weights=num_species, force_irreps_out=True)
    params = theirs.init(jax.random.PRNGKey(2), species, x)
    mine = ours.init(jax.random.PRNGKey(2), species, x)
    assert jax.tree_util.tree_structure(mine) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(mine), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    a, b = ours.apply(params, species, x), theirs.apply(params, species, x)
    assert a.irreps == b.irreps and a.zero_flags == b.zero_flags
    np.testing.assert_allclose(a.array, b.array, rtol=1e-12, atol=1e-12)
    loss = lambda module: jax.grad(
        lambda p, xa: jnp.sum(jnp.sin(module.apply(p, species, e3nn.IrrepsArray(irreps_in, xa)).array)), argnums=(0, 1)
    )(params, x.array)
    for g_ours, g_theirs in zip(jax.tree_util.tree_leaves(loss(ours)), jax.tree_util.tree_leaves(loss(theirs))):
        np.testing.assert_allclose(g_ours, g_theirs, rtol=1e-12, atol=1e-12)
