"""The train state and its creation directly in the target sharding.

Parameters are created inside a jit whose out_shardings are the model's logical-axis shardings, so a
large model is never materialised whole on one host; the optimizer state follows its parameters.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mmdit_jax.families import family_of_config


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any  # float32 master weights (the Transformer params pytree)
    opt_state: Any
    ema: Any  # same tree as params, or None when EMA is off
    rng: jax.Array  # raw uint32 PRNG key


def replicated(mesh):
    return NamedSharding(mesh, P())


def init_params_fn(config, seed: int):
    fam = family_of_config(config)

    def init():
        module = fam.build(config, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
        return nnx.state(module).to_pure_dict()

    return init


def state_from_params_fn(tx, seed: int, use_ema: bool):
    def make(params):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          ema=jax.tree.map(jnp.copy, params) if use_ema else None,
                          rng=jax.random.PRNGKey(seed))
    return make


def create_state(model, tx, mesh, seed: int, use_ema: bool, params=None, *, abstract_only=False, mode=None):
    """(state or its abstract twin, state shardings). `params`: pretrained weights to start from
    (placed into the model's shardings); None: the references' initialisation with `seed`. `mode`
    (training.modes.TrainMode): what is trained (e.g. LoRA adapters: their init and shardings).

    abstract_only: return ShapeDtypeStructs carrying shardings (the restore target) and compute nothing."""
    param_sh = mode.trained_shardings(model, mesh) if mode is not None else model.param_shardings(mesh)
    make = state_from_params_fn(tx, seed, use_ema)
    rep = replicated(mesh)
    init = (mode.init_fn(seed) if mode is not None else None) or init_params_fn(model.config, seed)

    def from_init():
        return make(init())

    abstract = jax.eval_shape(from_init)
    # optimizer moments take their parameter's sharding; counters and the key are replicated
    sh = _state_shardings(abstract, param_sh, rep)
    if abstract_only:
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sh), sh
    if params is None:
        return jax.jit(from_init, out_shardings=sh)(), sh
    params = jax.device_put(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params), param_sh)
    return jax.jit(make, in_shardings=(param_sh,), out_shardings=sh)(params), sh


def _state_shardings(abstract: TrainState, param_sh, rep):
    shapes = {tuple(_key(k) for k in path): a.shape
              for path, a in jax.tree_util.tree_leaves_with_path(abstract.params)}
    shards = {tuple(_key(k) for k in path): s for path, s in jax.tree_util.tree_leaves_with_path(param_sh)}

    def opt_leaf(path, leaf):
        # optax states nest a params-shaped tree under named fields: match the params' path as a suffix
        keys = tuple(_key(k) for k in path)
        for n in range(len(keys)):
            if shapes.get(keys[n:]) == leaf.shape:
                return shards[keys[n:]]
        return rep

    opt_sh = jax.tree_util.tree_map_with_path(opt_leaf, abstract.opt_state)
    return TrainState(step=rep, params=param_sh, opt_state=opt_sh,
                      ema=param_sh if abstract.ema is not None else None, rng=rep)


def _key(k):
    return getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
