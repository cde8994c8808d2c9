"""Blocks of one shape stacked on a leading "layers" axis and run with `lax.scan`.

Scanning keeps compile time flat in depth (one traced block per stack) and gives remat one place to act.
Activations inside blocks are tagged with `checkpoint_name`; a remat policy chooses which to keep.
"""
from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from mmdit_jax.attention import LSE_NAME
from mmdit_jax.layers import Modulation
from mmdit_jax.quant.formats import is_quantized
from mmdit_jax.sharding import constrain

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # no remat: keep every residual
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block in backward
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
    "qkv_attn": jax.checkpoint_policies.save_only_these_names("qkv", "attn_out", LSE_NAME),
    "attn": jax.checkpoint_policies.save_only_these_names("attn_out", LSE_NAME),
}


def _in_modulation(blocks):
    """nnx filter: the variables of the blocks' adaLN `Modulation` layers (LoRA factors included)."""
    prefixes = [path for path, node in nnx.iter_graph(blocks) if isinstance(node, Modulation)]
    return lambda path, _: any(tuple(path[:len(p)]) == tuple(p) for p in prefixes)


class Stack(nnx.Module):
    """`n` copies of `make_block(rngs)` with parameters stacked on axis 0."""

    def __init__(self, make_block: Callable[[nnx.Rngs], nnx.Module], n: int, *, rngs: nnx.Rngs):
        self.n = n

        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def create(r):
            return make_block(r)

        self.blocks = create(rngs)

    def __call__(self, carry, *args, cond=None, remat: str = "none", skip=None, after=None):
        """carry = block(carry, *args) for each block in order; `args` are shared by all blocks.

        `cond` (optional): the conditioning vector of adaLN blocks. Each block's `modulations(cond)` is
        then computed for all layers at once, before the scan (one matmul over the stacked adaLN
        kernels, and one for their gradient), and the block is called as block(carry, mods, *args).
        Inside the scan those kernels, a third of an MMDiT block's weights, would be copied out of the
        stack at every step and their gradients written back into a zeroed stack.

        `skip` (n,) bools, optional: blocks where it is True pass the carry through unchanged
        (skip-layer guidance); a `lax.cond`, so skipped blocks cost nothing.

        `after` (fn, xs), optional: after block i, skipped or not, carry, y_i = fn(carry, xs_i), with xs
        (a pytree, leading axis n, may be None) scanned along the blocks; the call then returns
        (carry, ys). ControlNets collect their blocks' outputs this way and the base adds their residuals."""
        if cond is None:
            graphdef, state = nnx.split(self.blocks)

            def run(c, xs):
                return nnx.merge(graphdef, xs)(c, *args)
        else:
            graphdef, adaln, state = nnx.split(self.blocks, _in_modulation(self.blocks), ...)
            # cond is repeated per layer so the product is a batched matmul on the kernels as stored; with
            # cond shared, XLA first transposes every stacked kernel (and its gradient) on CPU
            conds = jax.numpy.broadcast_to(cond, (self.n,) + cond.shape)
            def modulations(a, s, c):
                return nnx.merge(graphdef, a, s).modulations(c)

            if any(is_quantized(x.dtype) for x in jax.tree.leaves(adaln)):
                # one layer at a time: batched, the int8 / fp8 kernels of all layers would be converted
                # to the compute dtype at once (a float copy of a third of the blocks' weights)
                mods = jax.lax.map(lambda xs: modulations(*xs), (adaln, state, conds))
            else:
                mods = jax.vmap(modulations)(adaln, state, conds)
            # whole over "tensor" (gathered here, once for all layers): each block cuts them into
            # chunks that would otherwise straddle the shards at every layer
            mods = jax.tree.map(lambda m: constrain(m, ("layers", "batch") + (None,) * (m.ndim - 2)), mods)
            # inside the scan the adaLN variables are only shapes: nothing reads them there
            hollow = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), adaln)
            state = (state, mods)

            def run(c, xs):
                mods_i = jax.tree.map(lambda m: constrain(m, ("batch",) + (None,) * (m.ndim - 1)), xs[1])
                return nnx.merge(graphdef, hollow, xs[0])(c, mods_i, *args)

        if skip is None:
            def body(c, xs):
                return run(c, xs), None
        else:
            def body(c, xs):
                xs, skip_this = xs
                return jax.lax.cond(skip_this, lambda c_, _: c_, run, c, xs), None
            state = (state, jax.numpy.asarray(skip, bool))

        if after is not None:
            add, after_xs = after
            inner = body

            def body(c, xs):
                xs, x_after = xs
                return add(inner(c, xs)[0], x_after)
            state = (state, after_xs)

        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        if remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
        carry, ys = jax.lax.scan(body, carry, state)
        return carry if after is None else (carry, ys)
