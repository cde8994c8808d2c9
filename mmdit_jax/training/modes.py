"""What a run trains: the whole network ("full"), LoRA adapters on a frozen base ("lora"), or a student
with a guidance embedder regressing a frozen teacher's CFG velocity ("distill").

The step sees two trees: `trained` (TrainState.params: what the optimizer, EMA and checkpoints hold)
and `frozen` (a third step argument, never differentiated: the LoRA base or the teacher, optionally
bfloat16, in the model's shardings). Full mode has no frozen tree and computes exactly what the trainer
did before modes existed.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmdit_jax.errors import MMDiTError
from mmdit_jax.io import paths

LORA_DIR = "lora"
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
GUIDANCE_EMBEDDER = {"sd3": "g_embedder", "flux": "guidance_in"}


def cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


class TrainMode:
    """kind "full" | "lora" | "distill"; `net_config` is the trained network's (the student's)."""

    def __init__(self, cfg, base_config, teacher_config=None):
        self.cfg = cfg
        self.kind = "lora" if cfg.lora.enabled else "distill" if cfg.distill.enabled else "full"
        self.base_config = base_config
        self.net_config = base_config
        self.teacher = None
        self.lora_config = None
        if self.kind == "lora":
            from mmdit_jax.lora import LoraConfig

            lc = cfg.lora
            self.lora_config = LoraConfig(targets=lc.targets, rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout,
                                          embedders=lc.embedders, blocks=lc.blocks, single_blocks=lc.single_blocks)
            # the adapters' static part (which kernels, columns, rows): fixed by the config, not the seed
            try:
                template = jax.eval_shape(lambda: _lora(base_config, self.lora_config, 0))
            except MMDiTError as e:  # e.g. block indices this network does not have
                key = "lora.single_blocks" if "single" in str(e) else "lora.blocks"
                raise MMDiTError(f"--set={key}: {e}") from None
            self._items = [(k, name, template.parts[k][name]) for k in sorted(template.parts)
                           for name in sorted(template.parts[k])]
        elif self.kind == "distill":
            from mmdit_jax.transformer import Transformer

            teacher_config = teacher_config or base_config
            if getattr(base_config, "guidance_embed", False):
                self.net_config = base_config  # continuing a student
            else:
                self.net_config = dataclasses.replace(base_config, guidance_embed=True)
            self.teacher = Transformer(teacher_config, None, "float32")
            self.teacher_has_guidance = bool(getattr(teacher_config, "guidance_embed", False))

    # -- the trained tree --------------------------------------------------------------------------
    def trainable_mask(self, model):
        if self.kind == "lora":
            return jax.tree.map(lambda _: True, self.abstract_trained())
        return model.trainable_mask()

    def abstract_trained(self):
        return jax.eval_shape(lambda: self.lora_weights(_lora(self.base_config, self.lora_config, 0)))

    def trained_shardings(self, model, mesh):
        if self.kind == "lora":  # adapters are small: replicated
            from mmdit_jax.training.state import replicated

            return jax.tree.map(lambda _: replicated(mesh), self.abstract_trained())
        return model.param_shardings(mesh)

    def init_fn(self, seed: int):
        """None (the network's own initialisation) or a function making the initial trained tree."""
        if self.kind == "lora":
            return lambda: self.lora_weights(_lora(self.base_config, self.lora_config, seed))
        return None

    def initial_trained(self, base_params, seed: int):
        """The trained tree to start from (host arrays), or None for the network's own init."""
        if self.kind == "lora":
            return None  # made by init_fn inside the state's jit
        if self.kind == "distill" and not getattr(self.base_config, "guidance_embed", False):
            return with_guidance_embedder(self.net_config, base_params, seed)
        return base_params

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

    # -- the frozen tree ---------------------------------------------------------------------------
    def frozen(self, base_params, teacher_params, model, mesh):
        """(frozen tree placed in its shardings, those shardings); (None, None) in full mode."""
        if self.kind == "full":
            return None, None
        net, dtype = self._frozen_net(model)
        params = base_params if self.kind == "lora" else teacher_params
        sh = net.param_shardings(mesh)
        cast = jax.jit(lambda p: cast_floats(p, jnp.dtype(dtype)), out_shardings=sh)
        return cast(jax.device_put(params, sh)), sh

    def frozen_abstract(self, model, mesh):
        """What `frozen` places, as ShapeDtypeStructs carrying its shardings (nothing allocated), and
        those shardings; (None, None) in full mode."""
        if self.kind == "full":
            return None, None
        from mmdit_jax.structure import Structure
        from mmdit_jax.transformer import abstract_module

        net, dtype = self._frozen_net(model)
        sh = net.param_shardings(mesh)
        cast = jax.eval_shape(lambda p: cast_floats(p, jnp.dtype(dtype)),
                              Structure(abstract_module(net.config)).abstract_params())
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), cast, sh), sh

    def _frozen_net(self, model):
        if self.kind == "lora":
            return model, self.cfg.lora.base_dtype
        return self.teacher, self.cfg.distill.teacher_dtype

    # -- forward passes ----------------------------------------------------------------------------
    def velocity(self, model, trained, frozen, x, sigma, ctx, pooled, guidance, *, compute, remat="none",
                 rng=None):
        """The trained network's velocity (compute-dtype forward; gradients reach `trained` in float32)."""
        args = (x.astype(compute), sigma, ctx.astype(compute), pooled.astype(compute), guidance)
        if self.kind == "lora":
            from mmdit_jax.lora import apply_lora

            rate = self.cfg.lora.dropout
            return apply_lora(model, cast_floats(frozen, compute), self.lora_of(cast_floats(trained, compute)),
                              *args, dropout=rate, rng=rng if rate > 0 else None, remat=remat)
        return model.apply(cast_floats(trained, compute), *args, remat=remat)

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

    def sampling_params(self, trained, frozen):
        """Params of the trained network as a plain model runs them (LoRA merged into the base)."""
        if self.kind == "lora":
            from mmdit_jax.lora import merge

            return merge(frozen, self.lora_of(trained))
        return trained

    # -- outputs -------------------------------------------------------------------------------------
    def export(self, state, workdir: str, model) -> str | None:
        """LoRA mode: WORKDIR/lora/pytorch_lora_weights.safetensors (diffusers / PEFT keys) from the EMA
        (or the params), plus lora_<format>.safetensors for kohya / comfyui; atomic writes."""
        if self.kind != "lora":
            return None
        from mmdit_jax.lora import save_lora

        tree = state.ema if state.ema is not None else state.params
        lora = self.lora_of(jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), tree))
        folder = paths.join(workdir, LORA_DIR)
        paths.makedirs(folder)
        path = paths.join(folder, LORA_FILE)
        save_lora(lora, path, model, "diffusers")
        if self.cfg.lora.format != "diffusers":
            save_lora(lora, paths.join(folder, f"lora_{self.cfg.lora.format}.safetensors"), model,
                      self.cfg.lora.format)
        return path


def full_mode(cfg, net_config) -> TrainMode:
    """Full training of `net_config`'s network whatever cfg.lora / cfg.distill say (direct step users)."""
    return TrainMode(cfg.replace(lora=type(cfg.lora)(), distill=type(cfg.distill)()), net_config)


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
