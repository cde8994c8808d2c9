"""Where a component's parameters come from, resolved once for every loader and for the converter.

A loader (transformer, VAE, CLIP, T5) works out its config and abstract params (`template`, in the
wanted dtype) and either a key plan over checkpoint tensors or an Orbax component folder. `params()`
then fills the whole tree (what `load_*` return); `stream()` yields it one parameter at a time (what
`mmdit-convert` writes, so memory holds one array, never the model).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax

from mmdit_jax.io import orbax_io, rules


@dataclasses.dataclass
class ComponentWeights:
    config: object
    template: dict  # pure dict of ShapeDtypeStructs, in the wanted dtypes
    origin: str  # the file or folder named in messages
    plan: Sequence[rules.Entry] | None = None  # None: an Orbax component folder (`origin`)
    tensors: Mapping | None = None
    layout: str | None = None

    @property
    def orbax(self) -> bool:
        return self.plan is None

    def leaves(self) -> list[tuple[tuple, object]]:
        return [(tuple(getattr(k, "key", k) for k in p), t)
                for p, t in jax.tree_util.tree_leaves_with_path(self.template)]

    def params(self, shardings=None) -> dict:
        """The whole params tree as jax.Arrays, placed on `shardings` (a matching pytree) when given:
        each array goes straight to its sharding, never gathered on one device first."""
        if self.orbax:
            return orbax_io.restore_params(self.origin, self.template, shardings)
        template = self.template
        if shardings is not None:
            template = jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s),
                                    template, shardings)
        return rules.import_params(self.plan, self.tensors, self.layout, template, self.origin)

    def check(self) -> None:
        """Fail now (from names and shapes only) if the parameters can not be produced."""
        if self.orbax:
            orbax_io.check_saved(self.origin, self.template)
        else:
            rules.check(self.plan, self.tensors, self.layout, self.template, self.origin)

    def stream(self):
        """Yield (path, numpy array in the template's dtype) one parameter (or Orbax group) at a time,
        after checking everything."""
        if self.orbax:
            orbax_io.check_saved(self.origin, self.template)
            for group in orbax_io.restore_groups(self.origin, self.leaves()):
                yield from group.items()
        else:
            yield from rules.iter_params(self.plan, self.tensors, self.layout, self.template, self.origin)
