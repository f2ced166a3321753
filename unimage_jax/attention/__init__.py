from unimage_jax.attention.reference import reference_attention, visibility
from unimage_jax.attention.dispatch import attention

__all__ = ["attention", "reference_attention", "visibility"]
