"""unimage_jax: the UniMAGE director model (Mixture-of-Transformers) in JAX/Flax."""

__version__ = "0.1.0"
