"""The shared Llama-family model core and its Hugging Face config/weights adapter."""
from kernels.models.config import DecoderConfig
from kernels.models.decoder import DecoderLM
from kernels.models.hf_io import load_config, load_pretrained, save_pretrained

__all__ = ["DecoderConfig", "DecoderLM", "load_config", "load_pretrained", "save_pretrained"]
