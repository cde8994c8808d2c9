"""ControlNets for every family: the public object, its loader, and several nets at once.

A family with ControlNets names their `ControlNetKind` (families.py: how to configure, build, map and run
its nets) as `Family.controlnet`. A net's `residuals(...)` returns the keyword arguments its base model takes
(`controlnet_block_samples`, ...), so `base(latents, ..., **residuals)` applies them.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmdit_jax.errors import MMDiTError
from mmdit_jax.families import ControlNetKind, families
from mmdit_jax.io.component import ComponentWeights
from mmdit_jax.io.sources import open_component
from mmdit_jax.structure import Structure


def kinds() -> dict[str, ControlNetKind]:
    """Every family's ControlNet kind by its diffusers class."""
    return {f.controlnet.diffusers_class: f.controlnet for f in families().values() if f.controlnet is not None}


def kind_of_config(config) -> ControlNetKind:
    match = [k for k in kinds().values() if isinstance(config, k.config_class)]
    if not match:
        raise MMDiTError(f"{type(config).__name__} is not a ControlNet configuration")
    return match[0]


def abstract_module(config, dtype=jnp.float32):
    kind = kind_of_config(config)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        return nnx.eval_shape(lambda: kind.build(config, param_dtype=dtype, rngs=nnx.Rngs(0)))


class ControlNet:
    """config + params of one net; `residuals(...)` is pure in its params (jit/grad-able)."""

    def __init__(self, config, params, dtype=jnp.float32):
        from mmdit_jax.dtypes import parse_dtype

        self.config = config
        self.kind = kind_of_config(config)
        self.dtype = parse_dtype(dtype)
        self._structure = Structure(abstract_module(config, self.dtype))
        self.params = params

    @classmethod
    def init(cls, config, seed: int = 0, dtype="float32"):
        """Randomly initialised (zero control embedding and output projections, as diffusers')."""
        from mmdit_jax.dtypes import parse_dtype

        dtype = parse_dtype(dtype)
        kind = kind_of_config(config)
        module = nnx.jit(lambda: kind.build(config, param_dtype=dtype, rngs=nnx.Rngs(seed)))()
        return cls(config, nnx.state(module).to_pure_dict(), dtype)

    def module(self, params) -> nnx.Module:
        return self._structure.module(params)

    def check_base(self, base_config, origin: str = "ControlNet") -> None:
        """One error line unless this net can steer a base model of `base_config`."""
        self.config.check_base(base_config, origin)

    def residuals(self, params, latents, sigma, context, pooled, control, scale=1.0, *, guidance=None,
                  control_mode=None, base=None, remat: str = "none") -> dict:
        """The base model's residual keyword arguments. `base`: the base model's module (see
        `Transformer.module`), needed by nets that read the base's patch tokens."""
        if base is not None:
            self.check_base(base.config)
        return self.kind.residuals(self.module(params), base, latents, sigma, context, pooled, control, scale,
                                   guidance, control_mode, remat)

    def trainable_mask(self):
        from mmdit_jax.layers import Buffer

        return self._structure.map_variables(lambda v: not isinstance(v, Buffer))

    def param_shardings(self, mesh, rules=None):
        return self._structure.shardings(mesh, rules)


def add_residuals(total: dict | None, more: dict) -> dict:
    """Two nets' residuals summed as diffusers' Multi* models do: per keyword, the shorter stack of the
    two bounds the sum (they zip), and a None on either side leaves the first net's value."""
    if total is None:
        return dict(more)
    out = {}
    for key, a in total.items():
        b = more.get(key)
        if a is None or b is None:
            out[key] = a
            continue
        k = min(a.shape[0], b.shape[0])
        out[key] = a[:k] + b[:k]
    return out


def multi_residuals(nets: Sequence[tuple[ControlNet, dict]], latents, sigma, context, pooled,
                    controls: Sequence, scales: Sequence, *, guidance=None, control_modes=None, base=None,
                    remat: str = "none") -> dict:
    """Several nets at once (diffusers' SD3MultiControlNetModel / FluxMultiControlNetModel): net i
    reads controls[i] with scales[i] (and control_modes[i]); their residuals are summed. One net with
    several controls runs once per control, as FluxMultiControlNetModel does."""
    n = len(controls)
    if len(scales) != n or (control_modes is not None and len(control_modes) != n):
        raise MMDiTError(f"{n} control inputs need as many scales (got {len(scales)})"
                         + ("" if control_modes is None else f" and control modes (got {len(control_modes)})"))
    if len(nets) not in (1, n):
        raise MMDiTError(f"{len(nets)} ControlNets for {n} control inputs: give one input per net")
    total = None
    for i in range(n):
        net, params = nets[i if len(nets) > 1 else 0]
        mode = None if control_modes is None else control_modes[i]
        total = add_residuals(total, net.residuals(params, latents, sigma, context, pooled, controls[i], scales[i],
                                                   guidance=guidance, control_mode=mode, base=base, remat=remat))
    return total


def controlnet_weights(path, dtype="float32") -> ComponentWeights:
    """Config, abstract params and source of a ControlNet (nothing read yet)."""
    from mmdit_jax.dtypes import parse_dtype

    dtype = parse_dtype(dtype)
    src = open_component(path, "controlnet")
    known = kinds()
    if src.config is not None:
        cls = src.config.get("_class_name")
        if cls not in known:
            raise MMDiTError(f"{src.origin}: config.json names {cls!r}, not a ControlNet; supported: "
                             f"{', '.join(known)}")
        kind = known[cls]
        config = kind.config_class.from_diffusers(src.config, src.origin)
        template = Structure(abstract_module(config, dtype)).abstract_params()
        if src.orbax:
            return ComponentWeights(config, template, src.origin)
        layout = kind.detect_layout(list(src.tensors))
        if layout != "diffusers":
            raise MMDiTError(f"{src.origin}: weights are not in the diffusers {cls} key layout")
        return ComponentWeights(config, template, src.origin, kind.plan(config), src.tensors, layout)
    keys = list(src.tensors)
    for kind in known.values():
        layout = kind.detect_layout(keys)
        if layout is None:
            continue
        shapes = {k: (src.tensors.shape(k) if hasattr(src.tensors, "shape") else np.shape(src.tensors[k]))
                  for k in keys}
        try:
            config = kind.config_from_weights(shapes, layout, src.origin)
        except KeyError as e:
            raise MMDiTError(f"{src.origin}: cannot detect the ControlNet configuration, key {e} is "
                             "missing") from None
        template = Structure(abstract_module(config, dtype)).abstract_params()
        return ComponentWeights(config, template, src.origin, kind.plan(config), src.tensors, layout)
    raise MMDiTError(f"{src.origin}: not a ControlNet file this library reads (SD3 / FLUX ControlNet keys "
                     f"not found); first keys: {', '.join(keys[:5])}")


def load_controlnet(path, dtype="float32", *, mesh=None, shardings=None, base=None) -> ControlNet:
    """A ControlNet from a diffusers folder (config.json `_class_name` SD3ControlNetModel or
    FluxControlNetModel; a pipeline folder's controlnet/), an Orbax folder, or a Stability AI SD3.5
    ControlNet single file. `base` (a Transformer or its config): fail now, in one line, unless the net
    can steer it."""
    weights = controlnet_weights(path, dtype)
    if base is not None:
        weights.config.check_base(getattr(base, "config", base), weights.origin)
    net = ControlNet(weights.config, None, dtype)
    if mesh is not None and shardings is None:
        shardings = net.param_shardings(mesh)
    net.params = weights.params(shardings)
    return net
