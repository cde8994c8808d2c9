"""What a run trains: the whole network (FullMode), LoRA adapters on a frozen base (LoraMode), or a
student with a guidance embedder regressing a frozen teacher's CFG velocity (DistillMode).

The step sees two trees: `trained` (TrainState.params: what the optimizer, EMA and checkpoints hold)
and `frozen` (a third step argument, never differentiated: the LoRA base or the teacher, optionally
bfloat16, in the model's shardings). Full mode has no frozen tree. `TrainMode(cfg, ...)` gives the mode
the config asks for; each mode overrides only what it does differently from full training.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmdit_jax.errors import MMDiTError
from mmdit_jax.families import ByFamily
from mmdit_jax.io import paths
from mmdit_jax.training import objective

LORA_DIR = "lora"
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
GUIDANCE_EMBEDDER = ByFamily(lambda fam: fam.guidance_embedder)  # the parameter's name by family


def cast_floats(tree, dtype):
    """Float leaves cast to `dtype`; quantised kernels (int8 / float8 storage, mmdit_jax.quant) kept."""
    from mmdit_jax.quant.formats import is_quantized

    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                        and not is_quantized(x.dtype) else x, tree)


def _converter(net, dtype):
    """How the frozen tree is made from float params: quantised (`net.quantize`) or cast to `dtype`."""
    if getattr(net, "quantize", None) is None:
        return lambda p: cast_floats(p, jnp.dtype(dtype))
    from mmdit_jax.quant.model import quantize_params, sites
    from mmdit_jax.transformer import abstract_module

    site_list = sites(abstract_module(net.config, net.dtype, net.quantize))
    return lambda p: quantize_params(p, site_list, net.quantize, net.dtype)


class TrainMode:
    """The interface, with full training's behaviour; `net_config` is the trained network's (the
    student's when distilling)."""

    def __new__(cls, cfg, base_config, teacher_config=None):
        if cls is TrainMode:  # the mode the config asks for
            cls = LoraMode if cfg.lora.enabled else DistillMode if cfg.distill.enabled else FullMode
        return super().__new__(cls)

    def __init__(self, cfg, base_config, teacher_config=None):
        self.cfg = cfg
        self.base_config = base_config
        self.net_config = base_config

    # -- the trained tree --------------------------------------------------------------------------
    def trainable_mask(self, model):
        return model.trainable_mask()

    def trained_shardings(self, model, mesh):
        return model.param_shardings(mesh)

    def init_fn(self, seed: int):
        """None (the network's own initialisation) or a function making the initial trained tree."""
        return None

    def initial_trained(self, base_params, seed: int):
        """The trained tree to start from (host arrays), or None for the network's own init."""
        return base_params

    # -- the frozen tree ---------------------------------------------------------------------------
    def frozen_net(self, model):
        """(network, dtype) of the frozen tree, or None when there is none."""
        return None

    def frozen_params(self, base_params, teacher_params):
        return None

    def base_net(self, model):
        """The network the base transformer runs as (a LoRA base may be quantised)."""
        return model

    def frozen(self, base_params, teacher_params, model, mesh):
        """(frozen tree placed in its shardings, those shardings); (None, None) without a frozen tree."""
        net_dtype = self.frozen_net(model)
        if net_dtype is None:
            return None, None
        net, dtype = net_dtype
        params = self.frozen_params(base_params, teacher_params)
        sh = net.param_shardings(mesh)
        if getattr(net, "quantize", None) is not None:
            if jax.tree.structure(params) == jax.tree.structure(sh):
                return jax.device_put(params, sh), sh  # read quantised (load_transformer(quantize=))
            # quantised from the float params as placed in the float network's shardings
            params = jax.device_put(params, model.param_shardings(mesh))
            return jax.jit(_converter(net, dtype), out_shardings=sh)(params), sh
        return jax.jit(_converter(net, dtype), out_shardings=sh)(jax.device_put(params, sh)), sh

    def frozen_abstract(self, model, mesh):
        """What `frozen` places, as ShapeDtypeStructs carrying its shardings (nothing allocated), and
        those shardings; (None, None) without a frozen tree."""
        net_dtype = self.frozen_net(model)
        if net_dtype is None:
            return None, None
        from mmdit_jax.structure import Structure
        from mmdit_jax.transformer import abstract_module

        net, dtype = net_dtype
        sh = net.param_shardings(mesh)
        cast = jax.eval_shape(_converter(net, dtype), Structure(abstract_module(net.config)).abstract_params())
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), cast, sh), sh

    # -- forward passes and the loss -----------------------------------------------------------------
    def velocity(self, model, trained, frozen, x, sigma, ctx, pooled, guidance, *, compute, remat="none",
                 rng=None):
        """The trained network's velocity (compute-dtype forward; gradients reach `trained` in float32)."""
        args = (x.astype(compute), sigma, ctx.astype(compute), pooled.astype(compute), guidance)
        return model.apply(cast_floats(trained, compute), *args, remat=remat)

    def draw_guidance(self, key, sigma):
        """Per-sample guidance the training loss is taken at (None: the model's fixed loss.guidance)."""
        return None

    def eval_guidance(self, sigma):
        """The validation loss's guidance values, fixed (None: the model's fixed loss.guidance)."""
        return None

    def loss(self, model, apply_fn, params, frozen, batch, null_text, weighting: str, *, compute):
        """The loss on `batch` (latents, eps, sigma, context, pooled[, guidance]); `apply_fn` is the
        trained network's velocity; `null_text`: the empty caption's (context, pooled) or None."""
        sigma = batch["sigma"]
        has_guidance = bool(getattr(model.config, "guidance_embed", False))
        guidance = jnp.full(sigma.shape, self.cfg.loss.guidance, jnp.float32) if has_guidance else None
        return objective.flow_loss(apply_fn, params, batch["latents"], batch["eps"], sigma, batch["context"],
                                   batch["pooled"], guidance, weighting)

    def sampling_params(self, trained, frozen):
        """Params of the trained network as a plain model runs them (LoRA merged into the base)."""
        return trained

    # -- outputs -------------------------------------------------------------------------------------
    @property
    def base_transformer(self) -> str | None:
        """The transformer a workdir's sampler loads under the trained tree (LoRA: the frozen base)."""
        return None

    writes_export = False  # whether the mode has an output file of its own (`write_export`)

    def export(self, state, workdir: str, model) -> str | None:
        """The mode's own output file, from the EMA (or the params), written into `workdir`; returns its
        path (None: the mode has none)."""
        if not self.writes_export:
            return None
        tree = state.ema if state.ema is not None else state.params
        return self.write_export(jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), tree),
                                 workdir, model)

    def write_export(self, trained, workdir: str, model) -> str | None:
        """Writes the mode's own output file from host arrays; modes with `writes_export` override it."""
        return None


class FullMode(TrainMode):
    """The whole network is trained; nothing is frozen."""


class LoraMode(TrainMode):
    """LoRA adapters (cfg.lora.adapter) on the frozen base (cfg.lora.base_dtype)."""

    def __init__(self, cfg, base_config, teacher_config=None):
        super().__init__(cfg, base_config)
        self.lora_config = cfg.lora.adapter
        # the adapters' static part (which kernels, columns, rows): fixed by the config, not the seed
        try:
            template = jax.eval_shape(lambda: _lora(base_config, self.lora_config, 0))
        except MMDiTError as e:  # e.g. block indices this network does not have
            key = "lora.single_blocks" if "single" in str(e) else "lora.blocks"
            raise MMDiTError(f"--set={key}: {e}") from None
        self._items = [(k, name, template.parts[k][name]) for k in sorted(template.parts)
                       for name in sorted(template.parts[k])]

    def trainable_mask(self, model):
        return jax.tree.map(lambda _: True, self.abstract_trained())

    def abstract_trained(self):
        return jax.eval_shape(lambda: self.lora_weights(_lora(self.base_config, self.lora_config, 0)))

    def trained_shardings(self, model, mesh):  # adapters are small: replicated
        from mmdit_jax.training.state import replicated

        return jax.tree.map(lambda _: replicated(mesh), self.abstract_trained())

    def init_fn(self, seed: int):
        return lambda: self.lora_weights(_lora(self.base_config, self.lora_config, seed))

    def initial_trained(self, base_params, seed: int):
        return None  # made by init_fn inside the state's jit

    def lora_weights(self, lora) -> dict:
        """LoRA -> the trained tree: {"0000": {"A", "B"}, ...} (plain keys: Orbax paths stay simple)."""
        return {f"{i:04d}": dict(lora.weights[k][n]) for i, (k, n, _) in enumerate(self._items)}

    def lora_of(self, trained):
        from mmdit_jax.lora import LoRA

        weights, parts = {}, {}
        for i, (k, n, part) in enumerate(self._items):
            weights.setdefault(k, {})[n] = trained[f"{i:04d}"]
            parts.setdefault(k, {})[n] = part
        return LoRA(weights, parts, self.base_config.family)

    def frozen_net(self, model):
        return self.base_net(model), self.cfg.lora.base_dtype

    def base_net(self, model):
        """The network the frozen base runs as: `model` itself, or with lora.base_quantize its quantised
        form (block kernels int8 / fp8, scales in lora.base_dtype; mmdit_jax.quant)."""
        q = self.cfg.lora.base_quantize
        if q is None:
            return model
        from mmdit_jax.transformer import Transformer

        return Transformer(model.config, None, self.cfg.lora.base_dtype, q)

    def frozen_params(self, base_params, teacher_params):
        return base_params

    def velocity(self, model, trained, frozen, x, sigma, ctx, pooled, guidance, *, compute, remat="none",
                 rng=None):
        from mmdit_jax.lora import apply_lora

        args = (x.astype(compute), sigma, ctx.astype(compute), pooled.astype(compute), guidance)
        rate = self.lora_config.dropout
        lora = self.lora_of(cast_floats(trained, compute))
        return apply_lora(self.base_net(model), cast_floats(frozen, compute), lora, *args, dropout=rate,
                          rng=rng if rate > 0 else None, remat=remat)

    def sampling_params(self, trained, frozen):
        from mmdit_jax.lora import merge

        return merge(frozen, self.lora_of(trained))

    @property
    def base_transformer(self) -> str | None:
        return self.cfg.model.pretrained

    writes_export = True

    def write_export(self, trained, workdir: str, model) -> str:
        """WORKDIR/lora/pytorch_lora_weights.safetensors (diffusers / PEFT keys), plus
        lora_<format>.safetensors for kohya / comfyui; atomic writes."""
        from mmdit_jax.lora import save_lora

        lora = self.lora_of(trained)
        folder = paths.join(workdir, LORA_DIR)
        paths.makedirs(folder)
        path = paths.join(folder, LORA_FILE)
        save_lora(lora, path, model, "diffusers")
        fmt = self.cfg.lora.format
        if fmt != "diffusers":
            save_lora(lora, paths.join(folder, f"lora_{fmt}.safetensors"), model, fmt)
        return path


class DistillMode(TrainMode):
    """A student with a guidance embedder regresses the frozen teacher's CFG velocity at per-sample
    guidance in [distill.guidance_min, distill.guidance_max]."""

    def __init__(self, cfg, base_config, teacher_config=None):
        super().__init__(cfg, base_config)
        from mmdit_jax.transformer import Transformer

        teacher_config = teacher_config or base_config
        if getattr(base_config, "guidance_embed", False):
            self.net_config = base_config  # continuing a student
        else:
            self.net_config = dataclasses.replace(base_config, guidance_embed=True)
        self.teacher = Transformer(teacher_config, None, "float32")
        self.teacher_has_guidance = bool(getattr(teacher_config, "guidance_embed", False))

    def initial_trained(self, base_params, seed: int):
        if not getattr(self.base_config, "guidance_embed", False):
            return with_guidance_embedder(self.net_config, base_params, seed)
        return base_params

    def frozen_net(self, model):
        return self.teacher, self.cfg.distill.teacher_dtype

    def frozen_params(self, base_params, teacher_params):
        return teacher_params

    def draw_guidance(self, key, sigma):
        d = self.cfg.distill  # uniform in [guidance_min, guidance_max]
        return jax.random.uniform(key, sigma.shape, jnp.float32, d.guidance_min, d.guidance_max)

    def eval_guidance(self, sigma):
        d, n = self.cfg.distill, sigma.shape[0]  # spread evenly over [guidance_min, guidance_max]
        return (d.guidance_min + (d.guidance_max - d.guidance_min) * (jnp.arange(n) + 0.5) / n).astype(jnp.float32)

    def loss(self, model, apply_fn, params, frozen, batch, null_text, weighting: str, *, compute):
        nc, npl = null_text if null_text is not None else (None, None)
        return objective.distill_loss(apply_fn, params, self, frozen, batch["latents"], batch["eps"],
                                      batch["sigma"], batch["context"], batch["pooled"], nc, npl,
                                      batch["guidance"], weighting, compute=compute,
                                      teacher_guidance=self.cfg.loss.guidance)

    def teacher_cfg_velocity(self, frozen, x, sigma, ctx, pooled, null_ctx, null_pooled, g, *, compute,
                             embedded_guidance):
        """uncond + g (cond - uncond) of the teacher, cond and uncond in one batch, no gradient."""
        b = x.shape[0]
        nc = jnp.broadcast_to(null_ctx.astype(ctx.dtype), ctx.shape)
        npl = jnp.broadcast_to(null_pooled.astype(pooled.dtype), pooled.shape)
        tg = jnp.full((2 * b,), embedded_guidance, jnp.float32) if self.teacher_has_guidance else None
        both = self.teacher.apply(cast_floats(jax.lax.stop_gradient(frozen), compute),
                                  jnp.concatenate([x, x]).astype(compute), jnp.concatenate([sigma, sigma]),
                                  jnp.concatenate([ctx, nc]).astype(compute),
                                  jnp.concatenate([pooled, npl]).astype(compute), tg).astype(jnp.float32)
        cond, uncond = both[:b], both[b:]
        gg = g.reshape((-1,) + (1,) * (x.ndim - 1))
        return jax.lax.stop_gradient(uncond + gg * (cond - uncond))


def _lora(config, lora_config, seed):
    from mmdit_jax.lora import init_lora

    return init_lora(config, lora_config, seed)


def with_guidance_embedder(student_config, params, seed: int):
    """`params` (a teacher's) plus a fresh guidance embedder: random input layer, zero output layer, so
    the student starts as the teacher at every guidance value."""
    from mmdit_jax.layers import MLPEmbedder
    from mmdit_jax.structure import Structure
    from mmdit_jax.transformer import abstract_module

    name = GUIDANCE_EMBEDDER[student_config.family]
    emb = MLPEmbedder(256, student_config.hidden_size, zero_out=True, rngs=nnx.Rngs(seed))
    emb = nnx.state(emb).to_pure_dict()
    out = dict(params)
    out[name] = emb
    want = jax.tree.structure(Structure(abstract_module(student_config)).abstract_params())
    if jax.tree.structure(out) != want:
        raise MMDiTError("distill: the teacher's parameters do not extend to the student's (teacher config "
                         "and weights disagree)")
    return out
