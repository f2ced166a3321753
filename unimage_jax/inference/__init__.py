"""Inference: KV cache, token sampling, rectified-flow sampling with guidance, the director."""
