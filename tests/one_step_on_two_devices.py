"""Run by tests/test_parallel.py in a process with two CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=2): one training step on the same
global batch with 1 device and with 2 devices; prints the largest differences as JSON.

    python tests/one_step_on_two_devices.py CONFIG.yaml
"""

import dataclasses
import json
import sys

import jax
import numpy as np
from optax.tree_utils import tree_get

from mpnn.config import load_config, loss_weights
from mpnn.data.graphs import fixed_batch_shape
from mpnn.training import parallel
from mpnn.training.loop import make_train_step, setup

assert jax.device_count() == 2, jax.devices()
config = load_config(sys.argv[1], ["train.n_devices=2"])
two = setup(config)
mesh_1 = parallel.make_mesh(1)
step_1 = make_train_step(two.potential, two.optimizer, two.config, mesh_1)
batch_size = config.train.batch_size  # the same global batch on one device
batch_of_one = dataclasses.replace(two, mesh=mesh_1, train_shape=fixed_batch_shape(two.train_graphs, batch_size), graphs_per_device=batch_size)

global_batch = [[i for part in two.plan(1)[0] for i in part]]  # the step's graphs, on one device
dtype = two.potential.np_dtype
weights = {k: np.asarray(v, dtype) for k, v in loss_weights(config.train, 1).items()}
lr_scale = np.ones((), dtype)
initial = jax.device_get(two.state)
state_1, loss_1, _ = step_1(parallel.replicate(initial, mesh_1), batch_of_one.batch(global_batch)[0], lr_scale, weights)
state_2, loss_2, _ = two.train_step(two.state, two.batch(two.plan(1)[0])[0], lr_scale, weights)


def largest(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(jax.device_get(a)), jax.tree_util.tree_leaves(jax.device_get(b))))


print(json.dumps({
    "graphs_per_device": [len(part) for part in two.plan(1)[0]],
    "loss_1": float(loss_1),
    "loss_2": float(loss_2),
    "params_difference": largest(state_1.params, state_2.params),
    "params_change": largest(state_1.params, initial.params),
    # Adam's first moment after one step is 0.1 × the gradient
    "first_moment_difference": largest(tree_get(state_1.opt_state, "mu"), tree_get(state_2.opt_state, "mu")),
    "first_moment_size": largest(tree_get(state_1.opt_state, "mu"), tree_get(initial.opt_state, "mu")),
    "params_sharding": str(jax.tree_util.tree_leaves(state_2.params)[0].sharding.spec),
}))
