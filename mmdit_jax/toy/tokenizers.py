"""Tokenizers for the toy captions, written as ordinary transformers tokenizer folders.

- CLIP: byte-level BPE with CLIP's byte alphabet (every byte and every byte + "</w>" is a token, so any
  text encodes) plus merges learned from the caption vocabulary by the BPE algorithm, until each caption
  word is one token; "<|startoftext|>" and
  "<|endoftext|>" take the two largest ids, as in the released vocabulary (the pooling rule takes the
  argmax id as the EOS position).
- T5: a Unigram model (SentencePiece's algorithm, as T5TokenizerFast runs it) whose pieces are "<pad>",
  "</s>", "<unk>", the word boundary, single letters and one "▁word" piece per caption word, the words
  scored above the letters so a caption word is always one piece. This is the vocabulary a unigram model
  trained on the caption corpus converges to; it is written directly (exact, deterministic, and no
  sentencepiece dependency), and loaded back with transformers' tokenizers only.
"""
from __future__ import annotations

import json
import os

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_chars() -> list[str]:
    """CLIP's byte -> printable character table: printable latin-1 bytes map to themselves, the others
    to code points from 256 up, in byte order."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | \
        set(range(ord("®"), ord("ÿ") + 1))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def bpe_merges(words) -> list[tuple[str, str]]:
    """Byte-pair merges learned from `words` by the BPE algorithm: repeatedly merge the most frequent
    adjacent pair (ties broken by the pair itself) until every word is one symbol. Encoding applies
    merges in this order, so each training word comes out as exactly one token (merges built per word
    independently would interfere: "t o" from "top" would split "bottom")."""
    seqs = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in dict.fromkeys(words)}
    merges = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs.values():
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = max(counts, key=lambda p: (counts[p], tuple(-ord(c) for c in "".join(p))))
        merges.append(best)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = tuple(out)


def clip_vocab(words) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of a byte-level BPE where each of `words` (lowercase ASCII) is one token."""
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars]
    merges = bpe_merges(words)
    tokens += [a + b for a, b in merges]
    tokens += [CLIP_BOS, CLIP_EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return vocab, [f"{a} {b}" for a, b in merges]


def write_clip_tokenizer(folder: str, words, max_length: int = 16, pad_token: str = CLIP_EOS):
    """A CLIPTokenizer folder (vocab.json, merges.txt, tokenizer configs). CLIP-L pads with EOS,
    OpenCLIP-G's tokenizer with "!" (pass pad_token="!"). Returns the tokenizer."""
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    vocab, merges = clip_vocab(words)
    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_path, "w") as f:
        json.dump(vocab, f)
    with open(merges_path, "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab=vocab_path, merges=merges_path, model_max_length=max_length, pad_token=pad_token,
                        bos_token=CLIP_BOS, eos_token=CLIP_EOS, unk_token=CLIP_EOS)
    tok.save_pretrained(folder)
    return tok


def t5_pieces(words) -> list[tuple[str, float]]:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    pieces += [("▁" + w, -1.0) for w in words]
    return pieces


def write_t5_tokenizer(folder: str, words, max_length: int = 512):
    """A T5TokenizerFast folder (tokenizer.json + configs). Returns the tokenizer."""
    from transformers import T5TokenizerFast

    os.makedirs(folder, exist_ok=True)
    tok = T5TokenizerFast(vocab=t5_pieces(words), extra_ids=0, model_max_length=max_length)
    tok.save_pretrained(folder)
    return tok
