"""LoRA: low-rank adapters on the transformers' Linears, merged or on the activations, and their files
in the ecosystem's layouts (diffusers / PEFT, kohya / ComfyUI)."""
from mmdit_jax.lora.adapter import LoRA, LoraConfig, Part, init_lora
from mmdit_jax.lora.apply import apply_lora, merge
from mmdit_jax.lora.formats import FORMATS, load_lora, lora_tensors, read_lora, save_lora

__all__ = ["FORMATS", "LoRA", "LoraConfig", "Part", "apply_lora", "init_lora", "load_lora", "lora_tensors",
           "merge", "read_lora", "save_lora"]
