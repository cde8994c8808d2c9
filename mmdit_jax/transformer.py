"""The public transformer object: config + params + a pure `apply`, for every family."""
from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmdit_jax.dtypes import parse_dtype
from mmdit_jax.errors import MMDiTError
from mmdit_jax.families import detect, family_of_config, family_of_diffusers_config
from mmdit_jax.io import orbax_io
from mmdit_jax.io.component import ComponentWeights
from mmdit_jax.io.float8 import dequantized
from mmdit_jax.io.sources import open_component
from mmdit_jax.layers import Buffer
from mmdit_jax.quant.formats import parse_quantize
from mmdit_jax.quant.model import quantize_module
from mmdit_jax.structure import Structure

def default_dtype() -> str:
    """Sampling's dtype when none is given: bfloat16 on GPU and TPU (float32 activations there take the
    memory-hungry attention paths and half the matmul rate), float32 on CPU (exact, and as fast)."""
    return "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"


def abstract_module(config, dtype=jnp.float32, quantize=None):
    """The model's structure with ShapeDtypeStructs for values: no memory is allocated. `quantize`
    ("int8", "fp8", a `mmdit_jax.quant.QuantSpec`): block kernels stored quantised (mmdit_jax.quant)."""
    fam = family_of_config(config)
    # built outside any ambient mesh (a jitted step traces under one): the parameters' out_sharding
    # metadata holds logical axis names, which only sharding.py maps to mesh axes
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        module = nnx.eval_shape(lambda: fam.build(config, param_dtype=dtype, rngs=nnx.Rngs(0)))
    spec = parse_quantize(quantize)
    return module if spec is None else quantize_module(module, spec)


def count_params(config) -> int:
    """Trainable parameters of `config`'s network (buffers such as SD3's position table excluded)."""
    state = nnx.state(abstract_module(config), nnx.Param)
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(state)))


class Transformer:
    """`apply(params, latents, sigma, context, pooled, guidance=None)` is pure (jit/grad/vmap-able);
    calling the object runs a jitted apply with `self.params`.

    latents (B, H, W, C) NHWC; sigma (B,) in [0, 1]; context (B, L, context_dim); pooled (B, pooled_dim);
    returns the velocity (noise - data), (B, H, W, C)."""

    def __init__(self, config, params, dtype=jnp.float32, quantize=None):
        """`quantize`: None, or the format of the block kernels in `params` (see `load_transformer`)."""
        self.config = config
        self.family = family_of_config(config)
        self.dtype = parse_dtype(dtype)
        self.quantize = parse_quantize(quantize)
        self._structure = Structure(abstract_module(config, self.dtype, self.quantize))
        self.params = params
        self._jitted = jax.jit(self.apply, static_argnames=("remat", "skip_layers", "controlnet_blocks_repeat"))

    @classmethod
    def init(cls, config, seed: int = 0, dtype="float32"):
        """Randomly initialised weights (the references' init: xavier linears, zero adaLN and output)."""
        dtype = parse_dtype(dtype)
        fam = family_of_config(config)
        module = nnx.jit(lambda: fam.build(config, param_dtype=dtype, rngs=nnx.Rngs(seed)))()
        return cls(config, nnx.state(module).to_pure_dict(), dtype)

    def module(self, params) -> nnx.Module:
        return self._structure.module(params)

    def apply(self, params, latents, sigma, context, pooled, guidance=None, *, remat: str = "none",
              skip_layers: tuple[int, ...] = (), references=None, **control):
        """`skip_layers` (SD3 family only): blocks bypassed, as diffusers' skip-layer guidance does.
        `references` (FLUX.2 only): reference latents attended to alongside `latents`.
        `control`: ControlNet residuals as the family's model names them (`controlnet_block_samples`, ...)."""
        kw, module = {}, self.module(params)
        if references is not None:
            if "references" not in inspect.signature(type(module).__call__).parameters:
                raise MMDiTError(f"references are supported for FLUX.2 models, not {self.config.family}")
            kw["references"] = list(references)
        if skip_layers:
            if self.family.sampling is None or not self.family.sampling.skip_layer_guidance:
                raise MMDiTError(f"skip_layers is supported for SD3-family models, not {self.config.family}")
            kw["skip_layers"] = tuple(int(i) for i in skip_layers)
        return module(latents, sigma, context, pooled, guidance, remat=remat, **kw, **control)

    def __call__(self, latents, sigma, context, pooled, guidance=None, *, remat: str = "none",
                 skip_layers: tuple[int, ...] = (), references=None, **control):
        return self._jitted(self.params, latents, sigma, context, pooled, guidance, remat=remat,
                            skip_layers=tuple(skip_layers), references=references, **control)

    def trainable_mask(self):
        """Pytree of bools over `params`: False for buffers (never updated by an optimizer)."""
        return self._structure.map_variables(lambda v: not isinstance(v, Buffer))

    def param_shardings(self, mesh, rules=None):
        """NamedShardings for `params` on `mesh`, from the logical axis annotations and rules table."""
        return self._structure.shardings(mesh, rules)


def transformer_weights(path, dtype="float32") -> ComponentWeights:
    """Config, abstract params and the source of an SD3/SD3.5/FLUX transformer (nothing read yet)."""
    dtype = parse_dtype(dtype)
    src = open_component(path, "transformer")
    if src.orbax:
        config = family_of_diffusers_config(src.config, src.origin).config_from_diffusers(src.config,
                                                                                        src.origin)
        return ComponentWeights(config, Structure(abstract_module(config, dtype)).abstract_params(), src.origin)
    fam, layout, tensors = detect(dequantized(src.tensors, src.origin), src.config, src.origin)
    if src.config is not None:
        config = fam.config_from_diffusers(src.config, src.origin)
    else:
        shapes = {k: (tensors.shape(k) if hasattr(tensors, "shape") else np.shape(tensors[k]))
                  for k in tensors}
        try:
            config = fam.config_from_weights(shapes, layout, src.origin)
        except KeyError as e:
            raise MMDiTError(f"{src.origin}: cannot detect the {fam.name} configuration, key {e} "
                             "is missing") from None
    template = Structure(abstract_module(config, dtype)).abstract_params()
    return ComponentWeights(config, template, src.origin, fam.plan(config), tensors, layout)


def load_transformer(path, dtype="float32", *, mesh=None, shardings=None, quantize=None) -> Transformer:
    """An SD3/SD3.5/FLUX transformer from a diffusers pipeline/component folder, a single file or an
    Orbax folder written by mmdit-convert. With `mesh` (or an explicit `shardings` pytree) each
    parameter is placed straight on its sharding from the logical-axis rules, never gathered first.
    `quantize` "int8" | "fp8": every block kernel stored in that format with per-output-channel scales,
    quantised as it is read (mmdit_jax.quant); the model computes in `dtype`."""
    spec = parse_quantize(quantize)
    weights = transformer_weights(path, dtype)
    model = Transformer(weights.config, None, dtype, spec)
    if mesh is not None and shardings is None:
        shardings = model.param_shardings(mesh)
    if spec is None:
        model.params = weights.params(shardings)
    else:
        from mmdit_jax.quant.model import load_quantized, sites

        model.params = load_quantized(weights, sites(abstract_module(model.config, model.dtype, spec)), spec,
                                      model.dtype, shardings)
    return model


def save_transformer(model: Transformer, folder) -> None:
    """Writes `model` as an Orbax component folder (config.json + params/) that `load_transformer`
    restores directly. The folder must not exist yet; it appears only once complete."""
    import os

    from mmdit_jax.io.files import atomic_folder, write_json

    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder):
        raise MMDiTError(f"{folder}: already exists; not overwriting")
    with atomic_folder(folder) as tmp:
        write_json(os.path.join(tmp, "config.json"), model.config.to_diffusers())
        orbax_io.save_params(tmp, model.params)
