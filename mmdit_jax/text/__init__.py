"""Text encoders (CLIP-L, OpenCLIP bigG, T5 v1.1, Qwen3 / Mistral decoders) and prompt encoding as the diffusers
pipelines do it (each family's set lives in its package)."""
from mmdit_jax.text.clip import CLIPText, CLIPTextConfig
from mmdit_jax.flux.text import FluxTextEncoders
from mmdit_jax.flux2.text import Flux2TextEncoders
from mmdit_jax.sd3.text import SD3TextEncoders
from mmdit_jax.text.decoder import DecoderConfig, DecoderLM
from mmdit_jax.text.decoder_weights import load_decoder
from mmdit_jax.text.encoders import load_text_encoders
from mmdit_jax.text.t5 import T5Config, T5Encoder
from mmdit_jax.text.weights import Loaded, load_clip, load_t5

__all__ = ["CLIPText", "CLIPTextConfig", "DecoderConfig", "DecoderLM", "Flux2TextEncoders", "FluxTextEncoders",
           "Loaded", "SD3TextEncoders", "T5Config", "T5Encoder", "load_clip", "load_decoder", "load_t5",
           "load_text_encoders"]
