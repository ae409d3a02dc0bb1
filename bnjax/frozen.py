"""Frozen batch norm for fine-tuning: freeze the statistics, the other weights, or both.

Two independent switches, combinable:

(a) *Frozen statistics*: run the model with every BN layer in eval mode (``use_running_average=True``, e.g.
    ``model.apply(variables, x, train=False)`` inside the loss) and do not request ``mutable``. Layers
    normalize with the running statistics, which never change; gradients still reach every parameter,
    BN's scale and bias included. Usual when fine-tuning with small batches whose statistics are noisy.

(b) *Only BN's scale and bias trainable*: :func:`train_only_batch_norm` wraps an optimizer so that every
    other parameter gets a zero update (``optax.multi_transform`` with ``optax.set_to_zero``), even under
    weight decay. Note that ``optax.masked(tx, mask)`` alone is *not* a freeze: it passes the raw gradient
    through as the update of masked-out leaves.

BN layers are recognised from the variables themselves: a module whose path holds ``mean`` and ``var`` in
``batch_stats`` (``bnjax.BatchNorm``, ``flax.linen.BatchNorm``, ``bnjax.renorm.BatchRenorm``).

Example, (a) and (b) together:

>>> import flax.linen as nn, jax, jax.numpy as jnp, optax, bnjax
>>> class Net(nn.Module):
...     @nn.compact
...     def __call__(self, x, train):
...         x = bnjax.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
...         return nn.Dense(1)(nn.relu(x))
>>> model, x, y = Net(), jax.random.normal(jax.random.key(0), (8, 3)), jnp.zeros((8, 1))
>>> variables = model.init(jax.random.key(1), x, train=False)
>>> params = variables["params"]
>>> tx = train_only_batch_norm(optax.adamw(1e-3, weight_decay=1e-2), variables)
>>> opt_state = tx.init(params)
>>> def loss(params, x, y):
...     out = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=False)
...     return jnp.mean((out - y) ** 2)
>>> grads = jax.grad(loss)(params, x, y)
>>> updates, opt_state = tx.update(grads, opt_state, params)
>>> params = optax.apply_updates(params, updates)
>>> bool(jnp.all(updates["Dense_0"]["kernel"] == 0)), bool(jnp.all(updates["BatchNorm_0"]["scale"] != 0))
(True, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

BATCH_NORM = "batch_norm"
FROZEN = "frozen"


def batch_norm_param_labels(variables: Mapping[str, Any]) -> Any:
    """A tree shaped like ``variables["params"]``: ``"batch_norm"`` on BN layers' params, else ``"frozen"``.

    Raises:
      ValueError: when ``variables`` has no ``params`` or no ``batch_stats`` (nothing marks the BN layers), or
        no BN layer is found (e.g. ``nnx.State`` objects instead of nested dicts).
    """
    for name in ("params", "batch_stats"):
        if name not in variables:
            raise ValueError(
                f"variables has collections {sorted(variables)}; BN layers are found through 'params' and "
                "'batch_stats', so pass the full variables of the model."
            )
    stats = variables["batch_stats"]

    def label(path, _):
        node = stats
        for entry in path[:-1]:
            key = getattr(entry, "key", None)
            if not isinstance(node, Mapping) or key not in node:
                return FROZEN
            node = node[key]
        is_bn = isinstance(node, Mapping) and "mean" in node and "var" in node
        return BATCH_NORM if is_bn else FROZEN

    labels = jax.tree_util.tree_map_with_path(label, variables["params"])
    if BATCH_NORM not in jax.tree.leaves(labels):
        raise ValueError(
            "no BN layer found: no module path in 'params' holds 'mean' and 'var' in 'batch_stats', so every "
            "parameter would be frozen. Pass the model's variables as nested dicts: linen's variables, or "
            "bnjax.as_functional(nnx_model).variables for NNX (not nnx.State objects); Equinox models are not "
            "labelled (freeze with eqx.partition and optax.multi_transform). Got "
            f"params of type {type(variables['params']).__name__} and batch_stats of type "
            f"{type(variables['batch_stats']).__name__}."
        )
    return labels


def train_only_batch_norm(
    tx: optax.GradientTransformation, variables: Mapping[str, Any]
) -> optax.GradientTransformation:
    """``tx`` on the BN layers' ``scale``/``bias``; an exact zero update for every other parameter.

    Args:
      tx: the optimizer for the BN parameters (its state is only kept for them).
      variables: the model's variables (``params`` and ``batch_stats``), used to find the BN layers.

    Returns:
      An ``optax.GradientTransformation`` over the full ``params`` tree.
    """
    labels = batch_norm_param_labels(variables)
    return optax.multi_transform({BATCH_NORM: tx, FROZEN: optax.set_to_zero()}, labels)
