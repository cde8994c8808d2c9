"""FLUX.2 text encoders against their oracles: the Qwen3 / Mistral decoders against transformers (every
hidden state, padded batches, left and right padding, GQA, head_dim != hidden / heads, sliding window),
and the prompt encoding against diffusers' Flux2KleinPipeline / Flux2Pipeline on tiny random models with
tiny BPE tokenizers (nothing downloaded)."""
import os

import numpy as np
import pytest

from conftest import max_rel_err
from flux2_text_tiny import (MISTRAL_TEMPLATE, mistral3_model, mistral_model, mistral_tokenizer,
                             pipeline_folder, qwen3_model, qwen_tokenizer, text_processor)

TOL = 2e-5
PROMPTS = ["a photo of a cat on the mat", "the big red dog", "blue sky [IMG] over the sea, a cat on the mat "
           "and the big red dog under the blue sky, a photo of a cat"]


def _ids_and_mask(vocab, seed=0):
    """3 rows of 9 ids: right-padded, unpadded, left-padded (a pad before any token: the all-masked rows)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (3, 9))
    mask = np.ones((3, 9), np.int64)
    mask[0, 6:] = 0
    mask[2, :4] = 0
    return ids, mask


def _torch_hidden(model, ids, mask):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True,
                    use_cache=False)
    return [h.numpy() for h in out.hidden_states]


def _check_all_layers(folder, model, vocab, **load_kw):
    from mmdit_jax.text.decoder_weights import load_decoder

    ids, mask = _ids_and_mask(vocab)
    want = _torch_hidden(model, ids, mask)
    loaded = load_decoder(folder, "float32", subfolder="", **load_kw)
    got = np.asarray(loaded.module()(ids, mask))
    assert got.shape == (len(want),) + want[0].shape
    errs = [max_rel_err(g, w) for g, w in zip(got, want)]
    assert max(errs) < TOL, errs
    # rematerialisation changes nothing forward
    np.testing.assert_allclose(np.asarray(loaded.module()(ids, mask, remat="full")), got, rtol=0, atol=1e-6)
    return loaded, got


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory):
    # attention biases on (Qwen3's optional attention_bias), to cover them
    model = qwen3_model(61, layers=5, attention_bias=True)
    folder = str(tmp_path_factory.mktemp("qwen3"))
    model.save_pretrained(folder, max_shard_size="20KB")
    return folder, model


def test_qwen3_every_hidden_state(qwen3_folder):
    folder, model = qwen3_folder
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    loaded, got = _check_all_layers(folder, model, 61)
    assert loaded.config.qk_norm and loaded.config.attention_bias and loaded.config.final_norm
    # the first 3 layers alone (no final norm) give the same first hidden states
    from mmdit_jax.text.decoder_weights import load_decoder

    part = load_decoder(folder, "float32", subfolder="", layers=3)
    assert not part.config.final_norm and part.config.layers == 3
    ids, mask = _ids_and_mask(61)
    np.testing.assert_array_equal(np.asarray(part.module()(ids, mask, (3, 1))), got[[3, 1]])


def test_mistral3_every_hidden_state(tmp_path):
    model = mistral3_model(53, layers=4)
    model.save_pretrained(str(tmp_path), max_shard_size="20KB")
    loaded, _ = _check_all_layers(str(tmp_path), model, 53)
    cfg = loaded.config
    assert not cfg.qk_norm and cfg.head_dim == 6 and cfg.hidden == 35 and cfg.sliding_window is None


@pytest.mark.parametrize("rename", [
    # Mistral3ForConditionalGeneration as transformers >= 4.52 lays it out in memory
    {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
     "vision_tower.": "model.vision_tower.", "multi_modal_projector.": "model.multi_modal_projector."},
    # a bare MistralModel (no prefix at all)
    {"language_model.model.": "", "vision_tower.": None, "multi_modal_projector.": None}])
def test_key_layouts(tmp_path, rename):
    """The same weights under the other spellings transformers versions and classes save give the same
    parameters."""
    import shutil

    from safetensors.numpy import save_file

    from mmdit_jax.io.sources import component_tensors
    from mmdit_jax.text.decoder_weights import load_decoder

    model = mistral3_model(53, layers=2, seed=7)
    model.save_pretrained(str(tmp_path / "saved"))
    tensors = component_tensors(str(tmp_path / "saved"))
    out = {}
    for key in tensors:
        new = key
        for old, repl in rename.items():
            if key.startswith(old):
                new = None if repl is None else repl + key[len(old):]
        if new is not None:
            out[new] = np.asarray(tensors[key])
    os.makedirs(tmp_path / "renamed")
    save_file(out, str(tmp_path / "renamed" / "model.safetensors"))
    shutil.copy(tmp_path / "saved" / "config.json", tmp_path / "renamed" / "config.json")
    want = load_decoder(str(tmp_path / "saved"), subfolder="").params
    got = load_decoder(str(tmp_path / "renamed"), subfolder="").params
    assert [p for p, _ in jax_leaves(want)] == [p for p, _ in jax_leaves(got)]
    for (path, a), b in zip(jax_leaves(want), [x for _, x in jax_leaves(got)]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves_with_path(tree)


def test_mistral_sliding_window(tmp_path):
    """A text-only MistralForCausalLM (keys under `model.`, LM head beside) with a window shorter than the
    prompt."""
    model = mistral_model(47, layers=3, sliding_window=3)
    model.save_pretrained(str(tmp_path))
    loaded, _ = _check_all_layers(str(tmp_path), model, 47)
    assert loaded.config.sliding_window == 3


# ---------------------------------------------------------------- prompt encoding: klein (Qwen3)

def _default(fn, name):
    import inspect

    return inspect.signature(fn).parameters[name].default


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    tok = qwen_tokenizer("right")
    model = qwen3_model(len(tok), layers=28, seed=3)
    folder = pipeline_folder(str(tmp_path_factory.mktemp("klein")), "Flux2KleinPipeline", model, tok)
    return folder, model, tok


def test_klein_encode_prompt(klein):
    """mj.load_text_encoders on a Flux2KleinPipeline folder == the pipeline's encode_prompt (layers 9, 18,
    27 of 28: only 27 layers are loaded)."""
    import torch
    from diffusers import Flux2KleinPipeline

    import mmdit_jax as mj

    folder, model, tok = klein
    pipe = Flux2KleinPipeline(scheduler=None, vae=None, text_encoder=model, tokenizer=tok, transformer=None)
    enc = mj.load_text_encoders(folder)
    assert enc.model.config.layers == 27 and not enc.model.config.final_norm
    assert enc.context_length(40) == 40 and enc.layers == (9, 18, 27)
    assert _default(pipe.encode_prompt, "max_sequence_length") == enc.default_max_sequence_length
    assert _default(pipe.encode_prompt, "text_encoder_out_layers") == enc.layers
    with torch.no_grad():
        want, _ = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=40)
    context, pooled = enc(PROMPTS, max_sequence_length=40)
    assert pooled is None and context.shape == (3, 40, 3 * 37) and context.dtype == np.float32
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPTS[1]}], tokenize=False,
                                  add_generation_prompt=True, enable_thinking=False)
    assert "<think>\n\n</think>" in ids  # the template's thinking switch is exercised
    assert max_rel_err(context, want.numpy()) < TOL


def test_klein_layers_and_last_layer(klein):
    """Other layers (the pipeline's text_encoder_out_layers), the last one (after the final norm), a single
    prompt string, left padding."""
    import torch
    from diffusers import Flux2KleinPipeline

    from mmdit_jax.flux2.text import klein_tokens, load_flux2_text_encoders

    folder, model, _ = klein
    tok = qwen_tokenizer("left")
    enc = load_flux2_text_encoders(folder, variant="klein", layers=(28, 0, 5))
    enc.tokenize = lambda prompts, n: klein_tokens(tok, prompts, n)  # the left-padding tokenizer
    assert enc.model.config.final_norm and enc.model.config.layers == 28
    with torch.no_grad():
        want = Flux2KleinPipeline._get_qwen3_prompt_embeds(model, tok, PROMPTS[:2], max_sequence_length=33,
                                                            hidden_states_layers=(28, 0, 5))
        one = Flux2KleinPipeline._get_qwen3_prompt_embeds(model, tok, "a cat", max_sequence_length=33,
                                                           hidden_states_layers=(28, 0, 5))
    assert max_rel_err(enc(PROMPTS[:2], max_sequence_length=33)[0], want.numpy()) < TOL
    assert max_rel_err(enc("a cat", max_sequence_length=33)[0], one.numpy()) < TOL


# ---------------------------------------------------------------- prompt encoding: dev (Mistral 3)

@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    tok = mistral_tokenizer("left")
    model = mistral3_model(len(tok), layers=30, seed=4)
    folder = pipeline_folder(str(tmp_path_factory.mktemp("dev")), "Flux2Pipeline", model, tok,
                             chat_template=MISTRAL_TEMPLATE)
    return folder, model, tok


def test_dev_encode_prompt(dev):
    """mj.load_text_encoders on a Flux2Pipeline folder == the pipeline's encode_prompt (system message,
    layers 10, 20, 30 of 30: the last one after the final norm), left padding, one prompt truncated."""
    import torch
    from diffusers import Flux2Pipeline
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    import mmdit_jax as mj
    from mmdit_jax.flux2 import text as flux2_prompt

    assert flux2_prompt.SYSTEM_MESSAGE == SYSTEM_MESSAGE
    folder, model, tok = dev
    processor = text_processor(tok, MISTRAL_TEMPLATE)
    pipe = Flux2Pipeline(scheduler=None, vae=None, text_encoder=model, tokenizer=processor, transformer=None)
    enc = mj.load_text_encoders(folder)
    assert enc.model.config.layers == 30 and enc.model.config.final_norm and enc.layers == (10, 20, 30)
    assert _default(pipe.encode_prompt, "max_sequence_length") == enc.default_max_sequence_length
    assert _default(pipe.encode_prompt, "text_encoder_out_layers") == enc.layers
    n = 48
    with torch.no_grad():
        want, _ = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=n)
    context, pooled = enc(PROMPTS, max_sequence_length=n)
    assert pooled is None and context.shape == (3, n, 3 * 35)
    ids, mask = enc.tokenize(PROMPTS, n)
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[2].all()  # left padding; the long prompt cut
    assert max_rel_err(context, want.numpy()) < TOL


def test_dev_right_padding(dev):
    import torch
    from diffusers import Flux2Pipeline

    from mmdit_jax.flux2.text import dev_tokens, load_flux2_text_encoders

    folder, model, _ = dev
    tok = mistral_tokenizer("right")
    enc = load_flux2_text_encoders(folder, variant="dev", layers=(3, 7))
    assert enc.model.config.layers == 7
    enc.tokenize = lambda prompts, n: dev_tokens(tok, MISTRAL_TEMPLATE, prompts, n)
    with torch.no_grad():
        want = Flux2Pipeline._get_mistral_3_small_prompt_embeds(model, text_processor(tok, MISTRAL_TEMPLATE),
                                                                PROMPTS[:2], max_sequence_length=50,
                                                                hidden_states_layers=(3, 7))
    assert max_rel_err(enc(PROMPTS[:2], max_sequence_length=50)[0], want.numpy()) < TOL


# ---------------------------------------------------------------- bad input

def test_errors(klein, tmp_path):
    import shutil

    import mmdit_jax as mj
    from mmdit_jax.flux2.text import load_flux2_text_encoders

    folder, _, _ = klein
    # a missing shard
    broken = str(tmp_path / "broken")
    shutil.copytree(folder, broken)
    shard = sorted(n for n in os.listdir(os.path.join(broken, "text_encoder")) if n.endswith(".safetensors"))[1]
    os.remove(os.path.join(broken, "text_encoder", shard))
    with pytest.raises(mj.MMDiTError, match=f"shard files missing: {shard}"):
        mj.load_text_encoders(broken)
    # a text encoder of another architecture
    other = str(tmp_path / "other")
    shutil.copytree(folder, other)
    import json

    with open(os.path.join(other, "text_encoder", "config.json")) as f:
        cfg = json.load(f)
    cfg.update(model_type="t5", architectures=["T5EncoderModel"])
    with open(os.path.join(other, "text_encoder", "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(mj.MMDiTError, match=r"text_encoder/config.json: text encoder architecture "
                                            r"'T5EncoderModel' is not a Qwen3 or Mistral"):
        mj.load_text_encoders(other)
    # a hidden-state index the model does not have
    with pytest.raises(mj.MMDiTError, match="hidden-state index 29 out of range for 28 layers"):
        load_flux2_text_encoders(folder, variant="klein", layers=(9, 29))
    # no tokenizer
    shutil.rmtree(os.path.join(other, "tokenizer"))
    with open(os.path.join(other, "text_encoder", "config.json"), "w") as f:
        json.dump(dict(cfg, model_type="qwen3"), f)
    with pytest.raises(mj.MMDiTError, match="tokenizer"):
        mj.load_text_encoders(other)


# ---------------------------------------------------------------- on a mesh

MESH_SCRIPT = """
import sys
import jax, numpy as np
import mmdit_jax as mj
from mmdit_jax.sharding import make_mesh
from mmdit_jax.flux2.text import load_flux2_text_encoders
folder, prompts = sys.argv[1], sys.argv[2:]
dev0 = jax.devices()[0]
# float32 through the public loader; bfloat16 on the first two layers only (over 27 random layers its
# rounding differences, sharded or not, grow past any useful tolerance)
cases = {"float32": lambda **kw: mj.load_text_encoders(folder, "float32", **kw),
         "bfloat16": lambda **kw: load_flux2_text_encoders(folder, "bfloat16", variant="klein", layers=(1, 2), **kw)}
for dtype, load in cases.items():
    want = np.asarray(load()(prompts, max_sequence_length=24)[0]).astype(np.float32)
    enc = load(mesh=make_mesh({"fsdp": 8}))
    leaves = jax.tree.leaves(enc.model.params)
    per = sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == dev0)
    total = sum(x.nbytes for x in leaves)
    print(dtype, "bytes on device 0:", per, "of", total)
    assert per <= 1.25 * total / 8, (per, total)
    assert {x.dtype for x in leaves} == {np.dtype(jax.numpy.dtype(dtype))}
    got = np.asarray(enc(prompts, max_sequence_length=24)[0]).astype(np.float32)
    err = np.abs(got - want).max() / np.abs(want).max()
    print(dtype, "sharded vs one device:", err)
    # bfloat16: sharded contractions add bfloat16 partial sums (a few bfloat16 ulps, 2^-8 each)
    assert err < (1e-5 if dtype == "float32" else 3e-2), err
print("OK")
"""


@pytest.mark.slow
def test_sharded_load(tmp_path):
    """With a mesh, every parameter goes straight to its shards (about 1/8 of the bytes per device under
    fsdp 8) and the encoding is unchanged."""
    import subprocess
    import sys

    tok = qwen_tokenizer("right")
    # widths that 8 divides, so every parameter can be split
    model = qwen3_model(384, layers=28, seed=5, hidden_size=40, head_dim=8, intermediate_size=64)
    folder = pipeline_folder(str(tmp_path / "klein"), "Flux2KleinPipeline", model, tok)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", MESH_SCRIPT, folder, *PROMPTS[:2]], env=env, capture_output=True,
                         text=True, timeout=600)
    print(res.stdout)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr[-3000:]
