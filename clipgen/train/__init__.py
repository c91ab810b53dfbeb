"""Training loops, one module per trainable stage (toy CLIP, VQGAN, GPT prior)."""
