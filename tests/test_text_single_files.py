"""Text encoders from single .safetensors files: bare clip_l / clip_g / t5xxl files and SD3 bundles."""
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import max_rel_err
from text_tiny import clip_model, ids_with_eos, t5_model

VOCAB = 64


def _numpy(module, prefix="", rename=None):
    out = {}
    for k, v in module.state_dict().items():
        k = rename(k) if rename else k
        out[prefix + k] = v.detach().numpy().copy()
    return out


def _clip_out(ref, ids):
    import torch

    with torch.no_grad():
        return ref(torch.from_numpy(ids), output_hidden_states=True)


@pytest.fixture(scope="module")
def refs():
    # widths of 128 with 64-wide heads: single files carry no head count, the loader assumes 64
    clip_l = clip_model(VOCAB, width=128, heads=2, ffn=96, layers=2, eos=2, seed=1)  # no projection
    clip_g = clip_model(VOCAB, width=128, heads=2, ffn=96, layers=3, act="gelu", eos=2, projection=40, seed=2)
    t5 = t5_model(VOCAB, seed=3)
    return clip_l, clip_g, t5


def _check_clip(enc, ref, ids, *, proj):
    out = _clip_out(ref, ids)
    got = enc.module()(jnp.asarray(ids))
    for i, h in enumerate(out.hidden_states):
        assert max_rel_err(got["hidden_states"][i], h.numpy()) < 1e-5
    if proj:
        assert max_rel_err(got["text_embeds"], out.text_embeds.numpy()) < 1e-5
    else:
        assert max_rel_err(got["pooled"], out.pooler_output.numpy()) < 1e-5
    return got


def test_bare_clip_files(tmp_path, rng, refs):
    from mmdit_jax.io.safetensors_io import save_file
    from mmdit_jax.text import load_clip

    clip_l, clip_g, _ = refs
    ids = ids_with_eos(rng, VOCAB, [3, 9], 16, VOCAB - 1, pad=VOCAB - 1)
    # transformers 5 CLIPTextModel keys (no `text_model.`), plus the position_ids buffer old exports keep
    flat = _numpy(clip_l)
    flat["embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    save_file(flat, str(tmp_path / "clip_l.safetensors"))
    enc = load_clip(tmp_path / "clip_l.safetensors")
    assert enc.config.projection_dim is None and enc.config.act == "quick_gelu" and enc.config.heads == 2
    _check_clip(enc, clip_l, ids, proj=False)

    # ComfyUI clip_g: CLIPTextModelWithProjection keys; the activation is not in the shapes, so a
    # 128-wide tower needs it named (a 1280-wide one is detected as OpenCLIP bigG -> gelu)
    save_file(_numpy(clip_g), str(tmp_path / "clip_g.safetensors"))
    assert load_clip(tmp_path / "clip_g.safetensors").config.act == "quick_gelu"
    enc = load_clip(tmp_path / "clip_g.safetensors", act="gelu")
    assert enc.config.projection_dim == 40 and enc.config.layers == 3
    _check_clip(enc, clip_g, ids, proj=True)


def test_bare_t5_file(tmp_path, rng, refs):
    import torch

    from mmdit_jax.io.safetensors_io import save_file
    from mmdit_jax.text import load_t5

    t5 = refs[2]
    flat = _numpy(t5)
    flat["encoder.embed_tokens.weight"] = flat["shared.weight"]  # tied copy, as t5xxl_fp16 files hold
    flat = {k: v.astype(np.float16) for k, v in flat.items()}  # half-precision file, float32 model
    save_file(flat, str(tmp_path / "t5xxl_fp16.safetensors"))
    enc = load_t5(tmp_path / "t5xxl_fp16.safetensors")
    assert (enc.config.heads, enc.config.d_kv, enc.config.layers) == (4, 8, 3)
    ids = ids_with_eos(rng, VOCAB, [5, 20], 24, eos=1, pad=0)
    with torch.no_grad():
        t5h = type(t5)(t5.config).eval()
        t5h.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in flat.items()
                             if k in t5h.state_dict()})
        want = t5h(torch.from_numpy(ids)).last_hidden_state.numpy()
    assert max_rel_err(enc.module()(jnp.asarray(ids)), want) < 1e-5


def test_sd3_bundled_file(tmp_path, rng, refs):
    import torch

    from mmdit_jax.errors import MMDiTError
    from mmdit_jax.io.safetensors_io import save_file
    from mmdit_jax.text import load_clip, load_t5

    clip_l, clip_g, t5 = refs
    # SD3 files: the towers under `text_model.` (transformers 4 layout), no text_projection for CLIP-L
    nest = lambda k: k if k.startswith("text_") else "text_model." + k
    flat = {"model.diffusion_model.x_embedder.proj.bias": np.zeros(4, np.float32)}
    flat.update(_numpy(clip_l, "text_encoders.clip_l.transformer.", nest))
    flat.update(_numpy(clip_g, "text_encoders.clip_g.transformer."))
    flat.update(_numpy(t5, "text_encoders.t5xxl.transformer."))
    path = str(tmp_path / "sd3_medium_incl_clips_t5xxl.safetensors")
    save_file(flat, path)

    ids = ids_with_eos(rng, VOCAB, [6, 2], 16, VOCAB - 1, pad=0)
    with pytest.raises(MMDiTError, match="several text encoders"):
        load_clip(path)
    enc_l = load_clip(path, prefix="clip_l", identity_projection=True)
    got = _check_clip(enc_l, clip_l, ids, proj=False)
    # diffusers gives the bundled CLIP-L an identity text_projection
    np.testing.assert_allclose(got["text_embeds"], got["pooled"], rtol=1e-6, atol=1e-6)
    enc_g = load_clip(path, prefix="clip_g")
    assert enc_g.config.act == "gelu"  # named by the bundle
    _check_clip(enc_g, clip_g, ids, proj=True)

    enc_t5 = load_t5(path)  # the only T5 in the file
    tids = ids_with_eos(rng, VOCAB, [4, 11], 12, eos=1, pad=0)
    with torch.no_grad():
        want = t5(torch.from_numpy(tids)).last_hidden_state.numpy()
    assert max_rel_err(enc_t5.module()(jnp.asarray(tids)), want) < 1e-5


def test_bad_files_raise_clear_errors(tmp_path, refs):
    from mmdit_jax.errors import MMDiTError
    from mmdit_jax.io.safetensors_io import save_file
    from mmdit_jax.text import load_clip, load_t5

    flat = _numpy(refs[0])
    del flat["encoder.layers.1.mlp.fc2.bias"]
    save_file(flat, str(tmp_path / "broken.safetensors"))
    with pytest.raises(MMDiTError, match="missing keys.*encoder.layers.1.mlp.fc2.bias"):
        load_clip(tmp_path / "broken.safetensors")
    with pytest.raises(MMDiTError, match="no t5xxl text encoder"):
        load_t5(tmp_path / "broken.safetensors")
    with pytest.raises(MMDiTError, match="no such file"):
        load_clip(tmp_path / "absent.safetensors")
