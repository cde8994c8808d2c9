"""CLIP and T5 encoders against transformers on random tiny configs, loaded from transformers folders."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import max_rel_err
from text_tiny import clip_model, ids_with_eos, t5_model

VOCAB = 64


@pytest.mark.parametrize("with_projection,act,eos", [
    (False, "quick_gelu", 2),  # CLIP-L style, legacy config: pool at argmax(ids)
    (True, "gelu", 7),  # OpenCLIP-G style with projection, pool at the first eos_token_id
])
def test_clip_matches_transformers(tmp_path, rng, with_projection, act, eos):
    import torch

    from mmdit_jax.text import load_clip

    ref = clip_model(VOCAB, act=act, eos=eos, projection=24 if with_projection else None)
    ref.save_pretrained(tmp_path)
    # eos == 2: EOS must be the largest id (as in CLIP's vocab); otherwise pad with EOS itself, as
    # CLIP-L's tokenizer does, so "first occurrence" differs from "any occurrence".
    eos_id = VOCAB - 1 if eos == 2 else eos
    ids = ids_with_eos(rng, VOCAB, [5, 11], 16, eos_id, pad=eos_id if eos != 2 else 0)
    if eos != 2:
        ids[ids == eos] = 3
        ids[0, 5:], ids[1, 11:] = eos, eos
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), output_hidden_states=True)
    enc = load_clip(tmp_path)
    got = enc.module()(jnp.asarray(ids))
    hidden = out.hidden_states
    assert got["hidden_states"].shape[0] == len(hidden) == 4
    for i, h in enumerate(hidden):
        assert max_rel_err(got["hidden_states"][i], h.numpy()) < 1e-5, i
    assert max_rel_err(got["last_hidden_state"], out.last_hidden_state.numpy()) < 1e-5
    if with_projection:
        assert max_rel_err(got["text_embeds"], out.text_embeds.numpy()) < 1e-5
    else:
        assert max_rel_err(got["pooled"], out.pooler_output.numpy()) < 1e-5
    # the two rows pool at different positions: a wrong pooling rule would not match both
    assert not np.allclose(got["pooled"][0], got["pooled"][1])


@pytest.mark.parametrize("max_distance,L", [(128, 160), (20, 48)])
def test_t5_matches_transformers(tmp_path, rng, max_distance, L):
    import torch

    from mmdit_jax.text import load_t5

    ref = t5_model(VOCAB, relative_attention_max_distance=max_distance)
    # sharded save: the loader must read the index and every shard
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids = ids_with_eos(rng, VOCAB, [L // 3, L - 1], L, eos=1, pad=0)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).last_hidden_state.numpy()
    enc = load_t5(tmp_path)
    got = enc.module()(jnp.asarray(ids))
    assert max_rel_err(got, want) < 1e-5


def test_relative_buckets_match_transformers():
    import torch
    from transformers.models.t5.modeling_t5 import T5Attention

    from mmdit_jax.text.t5 import relative_buckets

    for L, nb, md in ((300, 32, 128), (40, 16, 20), (9, 32, 128)):
        rel = torch.arange(L)[None, :] - torch.arange(L)[:, None]
        want = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=nb, max_distance=md)
        np.testing.assert_array_equal(relative_buckets(L, nb, md), want.numpy())


def test_bf16_errors(tmp_path, rng):
    """bfloat16 weights: outputs stay finite and close to float32, T5 even with very large activations
    (T5-XXL's residual stream reaches 1e4+)."""
    import torch

    from mmdit_jax.text import load_clip, load_t5

    t5 = t5_model(VOCAB, std=1.0)
    with torch.no_grad():
        t5.shared.weight.mul_(1e4)
    t5.save_pretrained(tmp_path / "t5")
    ids = ids_with_eos(rng, VOCAB, [7, 30], 32, eos=1, pad=0)
    with torch.no_grad():
        want = t5(torch.from_numpy(ids)).last_hidden_state.numpy()
    f32 = np.asarray(load_t5(tmp_path / "t5").module()(jnp.asarray(ids)))
    bf16_enc = load_t5(tmp_path / "t5", jnp.bfloat16)
    # the precision-critical output projection stays float32, as in transformers
    assert bf16_enc.params["layers"]["blocks"]["wo"]["kernel"].dtype == jnp.float32
    assert bf16_enc.params["layers"]["blocks"]["wi_0"]["kernel"].dtype == jnp.bfloat16
    bf16 = np.asarray(bf16_enc.module()(jnp.asarray(ids)))
    assert np.isfinite(bf16).all()
    assert max_rel_err(f32, want) < 1e-5
    t5_err = max_rel_err(bf16, want)
    assert t5_err < 3e-2, t5_err

    clip = clip_model(VOCAB, projection=24)
    clip.save_pretrained(tmp_path / "clip")
    cids = ids_with_eos(rng, VOCAB, [4, 12], 16, VOCAB - 1, pad=0)
    with torch.no_grad():
        cwant = clip(torch.from_numpy(cids), output_hidden_states=True)
    got = load_clip(tmp_path / "clip", jnp.bfloat16).module()(jnp.asarray(cids))
    clip_err = max(max_rel_err(got["hidden_states"][-2], cwant.hidden_states[-2].numpy()),
                   max_rel_err(got["text_embeds"], cwant.text_embeds.numpy()))
    assert clip_err < 3e-2, clip_err
    print(f"bf16 max rel err: T5 {t5_err:.2e} CLIP {clip_err:.2e}")


def test_t5_bias_reaches_cudnn_in_the_query_dtype(monkeypatch):
    """cuDNN takes the bias only in q/k/v's dtype: T5 in bfloat16 passes its position bias as bfloat16
    (cuDNN can not run on CPU: the call is recorded and answered by the XLA kernel)."""
    from flax import nnx

    attn = importlib.import_module("mmdit_jax.attention")  # the package exports a function of that name
    from mmdit_jax.text.t5 import T5Config, T5Encoder

    seen = []

    def fake(q, k, v, bias=None, is_causal=False, scale=None, implementation=None):
        seen.append((implementation, q.dtype, None if bias is None else bias.dtype))
        return attn._xla(q, k, v, bias, is_causal, scale)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    cfg = T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=24, layers=1, heads=4, num_buckets=8,
                   max_distance=16)
    enc = T5Encoder(cfg, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    with attn.attention_backend("xla"):
        want = np.asarray(enc(ids))
    with attn.attention_backend("cudnn"):
        got = np.asarray(enc(ids))
    assert seen == [("cudnn", jnp.bfloat16, jnp.bfloat16)]
    np.testing.assert_array_equal(got, want)  # the cast is exact: the table is stored in bfloat16
