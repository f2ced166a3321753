from unimage_jax.attention.reference import reference_attention, visibility
