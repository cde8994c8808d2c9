"""CLIP text transformer (OpenAI CLIP-L/14 and OpenCLIP bigG/14 text towers) in Flax NNX.

token + learned position embeddings -> pre-LN causal transformer layers -> final LayerNorm. Pooled
output = final-normed state at the EOS position; `text_projection` (no bias) maps it to `text_embeds`.
Every layer's output is returned (before the final LayerNorm) so "penultimate layer" conditioning
(SD3, `clip_skip`) can pick any of them.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mmdit_jax.attention import attention
from mmdit_jax.layers import Linear, layer_norm, merge_heads, ones, param, split_heads, zeros
from mmdit_jax.stacking import Stack

embed_init = nnx.initializers.normal(0.02)

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # OpenCLIP bigG
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    ffn: int = 3072
    max_positions: int = 77
    act: str = "quick_gelu"
    eps: float = 1e-5
    projection_dim: int | None = None  # None: no text_projection
    # transformers' pooling rule: eos_token_id == 2 (the value in the original OpenAI/SD configs) means
    # "argmax of the ids" (EOS has the largest id in CLIP's vocab); any other id means "first position
    # holding that id".
    eos_token_id: int = 2


class LayerNorm(nnx.Module):
    """Affine LayerNorm, statistics in float32 (torch's nn.LayerNorm computes them in float32 too)."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(ones, rngs.params(), (dim,), param_dtype, ("norm",))
        self.bias = param(zeros, rngs.params(), (dim,), param_dtype, ("norm",))

    def __call__(self, x):
        y = layer_norm(x.astype(jnp.float32), self.eps)
        return y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class CLIPLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, param_dtype, rngs: nnx.Rngs):
        d = cfg.width
        self.heads, self.act = cfg.heads, cfg.act
        self.ln1 = LayerNorm(d, cfg.eps, param_dtype=param_dtype, rngs=rngs)
        self.q = Linear(d, d, axes=("embed", "qkv"), param_dtype=param_dtype, rngs=rngs)
        self.k = Linear(d, d, axes=("embed", "qkv"), param_dtype=param_dtype, rngs=rngs)
        self.v = Linear(d, d, axes=("embed", "qkv"), param_dtype=param_dtype, rngs=rngs)
        self.out = Linear(d, d, axes=("qkv", "embed"), param_dtype=param_dtype, rngs=rngs)
        self.ln2 = LayerNorm(d, cfg.eps, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Linear(d, cfg.ffn, axes=("embed", "mlp"), param_dtype=param_dtype, rngs=rngs)
        self.fc2 = Linear(cfg.ffn, d, axes=("mlp", "embed"), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        # x: float32 residual stream; the matmuls run in the parameter dtype.
        h = self.ln1(x)
        q, k, v = (split_heads(f(h), self.heads) for f in (self.q, self.k, self.v))
        x = x + self.out(merge_heads(attention(q, k, v, is_causal=True))).astype(jnp.float32)
        h = ACTIVATIONS[self.act](self.fc1(self.ln2(x)))
        return x + self.fc2(h).astype(jnp.float32)


class CLIPText(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.width
        self.token_embedding = param(embed_init, rngs.params(), (cfg.vocab_size, d), param_dtype,
                                     ("vocab", "embed"))
        self.position_embedding = param(embed_init, rngs.params(), (cfg.max_positions, d), param_dtype,
                                        ("pos", "embed"))
        self.layers = Stack(lambda r: CLIPLayer(cfg, param_dtype=param_dtype, rngs=r), cfg.layers,
                            rngs=rngs)
        self.final_ln = LayerNorm(d, cfg.eps, param_dtype=param_dtype, rngs=rngs)
        self.text_projection = (Linear(d, cfg.projection_dim, axes=("embed", "embed_out"), use_bias=False,
                                       param_dtype=param_dtype, rngs=rngs)
                                if cfg.projection_dim else None)

    def __call__(self, ids):
        """ids (B, L) int -> dict of float32 arrays:
        hidden_states (layers + 1, B, L, D): embeddings then each layer's output (as transformers'
        `hidden_states`, so [-2] is the penultimate layer); last_hidden_state (B, L, D) after the final
        LayerNorm; pooled (B, D) (`pooler_output`); text_embeds (B, P) when there is a projection."""
        L = ids.shape[1]
        x = (self.token_embedding[...][ids] + self.position_embedding[...][:L][None]).astype(jnp.float32)
        graphdef, state = nnx.split(self.layers.blocks)

        def body(h, layer_state):
            h = nnx.merge(graphdef, layer_state)(h)
            return h, h

        _, per_layer = jax.lax.scan(body, x, state)
        hidden = jnp.concatenate([x[None], per_layer], axis=0)
        last = self.final_ln(per_layer[-1])
        if self.cfg.eos_token_id == 2:
            eos = jnp.argmax(ids, axis=-1)
        else:
            eos = jnp.argmax((ids == self.cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
        out = {"hidden_states": hidden, "last_hidden_state": last, "pooled": pooled}
        if self.text_projection is not None:
            out["text_embeds"] = self.text_projection(pooled).astype(jnp.float32)
        return out
