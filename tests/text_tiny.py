"""Tiny tokenizers and transformers text models built on the spot (no downloads) for the text tests."""
import json
import os

import numpy as np

WORDS = ["a", "photo", "of", "cat", "dog", "the", "red", "on", "mat", "big", "blue", "sky"]


def byte_chars():
    """CLIP's byte -> printable unicode table: printable latin-1 bytes map to themselves, the rest to
    code points from 256 up, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def write_clip_tokenizer(folder, max_length=16, pad_token="<|endoftext|>"):
    """A CLIP BPE tokenizer over single bytes plus merges building WORDS; EOS gets the largest id (as in
    the real vocab, which the argmax pooling rule relies on). Returns the vocab size."""
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    chars = byte_chars()
    tokens = chars + [c + "</w>" for c in chars]
    merges = []
    for w in WORDS:
        if len(w) < 2:
            continue
        cur = w[0]
        for i, ch in enumerate(w[1:], 1):
            nxt = ch + ("</w>" if i == len(w) - 1 else "")
            merges.append(f"{cur} {nxt}")
            cur = cur + nxt
            if cur not in tokens:
                tokens.append(cur)
    merges = list(dict.fromkeys(merges))
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab=os.path.join(folder, "vocab.json"), merges=os.path.join(folder, "merges.txt"),
                        model_max_length=max_length, pad_token=pad_token)
    tok.save_pretrained(folder)
    return tok, len(vocab)


def make_t5_tokenizer():
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab += [("▁" + w, -1.0) for w in WORDS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0), len(vocab)


def clip_model(vocab, width=32, heads=4, layers=3, ffn=48, positions=16, act="quick_gelu", eos=2,
               projection=None, seed=0, std=0.3):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from conftest import randomize_torch_

    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=positions, hidden_act=act,
                         projection_dim=projection or width, eos_token_id=eos, bos_token_id=vocab - 2,
                         pad_token_id=vocab - 1)
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return randomize_torch_(cls(cfg).eval(), std=std, seed=seed)


def t5_model(vocab, d_model=32, d_kv=8, heads=4, d_ff=48, layers=3, seed=0, std=0.3, **kw):
    import torch
    from transformers import T5Config, T5EncoderModel

    from conftest import randomize_torch_

    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_kv=d_kv, num_heads=heads, d_ff=d_ff, num_layers=layers,
                   feed_forward_proj="gated-gelu", **kw)
    torch.manual_seed(seed)
    return randomize_torch_(T5EncoderModel(cfg).eval(), std=std, seed=seed)


def ids_with_eos(rng, vocab, lengths, L, eos, pad):
    """(B, L) ids: BOS-free random tokens, EOS at position `length`, then padding."""
    out = np.full((len(lengths), L), pad, np.int64)
    for i, n in enumerate(lengths):
        out[i, :n] = rng.integers(0, vocab - 2, n)
        out[i, n] = eos
    return out
