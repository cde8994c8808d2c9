"""An NNX module's structure held apart from its parameters.

Models are kept as (structure, params): params stay a plain nested dict of arrays that jit, grad, optax
and orbax take as they are, and the module is rebuilt around them wherever it is needed (cheap, and fine
inside a trace).
"""
from __future__ import annotations

import jax
from flax import nnx


class Structure:
    def __init__(self, abstract: nnx.Module):
        """`abstract`: the module built under `nnx.eval_shape` (no memory allocated)."""
        self.graphdef, self.template = nnx.split(abstract)

    def abstract_params(self) -> dict:
        """The params pytree with ShapeDtypeStructs as leaves."""
        return self.template.to_pure_dict()

    def module(self, params) -> nnx.Module:
        state = jax.tree.map(lambda x: x, self.template)  # a fresh copy: replace_by_pure_dict mutates
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    def map_variables(self, fn) -> dict:
        """A pytree shaped like the params with fn(variable) at each leaf."""
        out: dict = {}
        for path, v in self.template.flat_state():
            node = out
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = fn(v)
        return out

    def shardings(self, mesh, rules=None) -> dict:
        """NamedShardings for the params on `mesh`, from the logical axis annotations and rules table."""
        from mmdit_jax.sharding import LOGICAL_RULES, variable_sharding

        return self.map_variables(lambda v: variable_sharding(v, mesh, rules or LOGICAL_RULES))
