"""Model definitions: the image tokenizer (quantizer, VQGAN, discriminator) and the GPT prior (:mod:`clipgen.models.gpt`)."""

from clipgen.models.quantizer import FSQ, Quantized, VectorQuantizer, build_quantizer
from clipgen.models.vqgan import VQGAN, load_vqgan

__all__ = ["FSQ", "Quantized", "VQGAN", "VectorQuantizer", "build_quantizer", "load_vqgan"]
