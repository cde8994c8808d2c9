"""Tiny FLUX.2 text encoders built on the spot (no downloads): byte-level BPE tokenizers with chat templates
shaped like Qwen3's (enable_thinking) and Mistral Small 3's (system prompt, text parts), random Qwen3 and
Mistral 3 models, and pipeline folders holding them."""
import json
import os

SENTENCES = ["a photo of a cat on the mat", "the big red dog", "blue sky over the sea", "a cat",
             "You are an AI that reasons about image descriptions. You give structured responses focusing on "
             "object relationships, object\nattribution and actions without speculation."]

# Qwen3's template reduced to what the klein pipeline exercises: user turns, the generation prompt and the
# empty think block that enable_thinking=False adds
QWEN_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
                 "{% endif %}{% endif %}")
# Mistral Small 3's template reduced likewise: BOS, the system prompt, user turns; content as text parts
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
                    "[SYSTEM_PROMPT]{{ message['content'][0]['text'] }}[/SYSTEM_PROMPT]"
                    "{% elif message['role'] == 'user' %}[INST]{% for part in message['content'] %}"
                    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}[/INST]"
                    "{% endif %}{% endfor %}")


def bpe_tokenizer(specials, vocab_size=600, **kw):
    """A byte-level BPE trained on SENTENCES, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, **kw)


def qwen_tokenizer(padding_side="right"):
    tok = bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
                        pad_token="<|endoftext|>", eos_token="<|im_end|>", padding_side=padding_side)
    tok.chat_template = QWEN_TEMPLATE
    return tok


def mistral_tokenizer(padding_side="left"):
    tok = bpe_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]",
                         "[/SYSTEM_PROMPT]", "[IMG]"],
                        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                        padding_side=padding_side)
    return tok


def text_processor(tokenizer, chat_template):
    """A processor holding only the tokenizer: transformers' ProcessorMixin.apply_chat_template is what
    Flux2Pipeline calls on its PixtralProcessor (whose image part needs torchvision and plays no role for
    text prompts)."""
    from transformers.processing_utils import ProcessorMixin

    class TextProcessor(ProcessorMixin):
        def __init__(self, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(tokenizer, chat_template=chat_template)

    return TextProcessor(tokenizer, chat_template=chat_template)


def _randomize(model, seed):
    """Every weight random (norm scales around 1), so no default value hides a mistake."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else 0.2 * noise)
    return model.eval()


def qwen3_model(vocab, layers=5, seed=0, **kw):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = dict(vocab_size=vocab, hidden_size=37, intermediate_size=51, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, head_dim=10, rms_norm_eps=1e-6,
               rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True)
    cfg.update(kw)
    return _randomize(Qwen3ForCausalLM(Qwen3Config(**cfg)), seed)


def mistral3_model(vocab, layers=5, seed=1, **kw):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text = dict(model_type="mistral", vocab_size=vocab, hidden_size=35, intermediate_size=45,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=6,
                rms_norm_eps=1e-5, sliding_window=None, rope_theta=1e9)
    text.update(kw)
    vision = dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8)
    return _randomize(Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision)),
                      seed)


def mistral_model(vocab, layers=4, seed=2, **kw):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = dict(vocab_size=vocab, hidden_size=35, intermediate_size=45, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, head_dim=6, rms_norm_eps=1e-5, rope_theta=1e4)
    cfg.update(kw)
    return _randomize(MistralForCausalLM(MistralConfig(**cfg)), seed)


def pipeline_folder(folder, class_name, model, tokenizer, chat_template=None, shard="40KB"):
    """A pipeline folder with model_index.json, text_encoder/ (sharded safetensors) and tokenizer/
    (`chat_template`: written as a processor would, chat_template.jinja)."""
    os.makedirs(folder, exist_ok=True)
    tok_class = "PixtralProcessor" if class_name == "Flux2Pipeline" else "Qwen2TokenizerFast"
    enc_class = type(model).__name__
    index = {"_class_name": class_name, "_diffusers_version": "0.42.1",
             "text_encoder": ["transformers", enc_class], "tokenizer": ["transformers", tok_class],
             "transformer": ["diffusers", "Flux2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f)
    model.save_pretrained(os.path.join(folder, "text_encoder"), max_shard_size=shard)
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    if chat_template is not None:
        with open(os.path.join(folder, "tokenizer", "chat_template.jinja"), "w") as f:
            f.write(chat_template)
    return folder
