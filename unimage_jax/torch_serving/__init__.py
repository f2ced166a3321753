"""PyTorch serving of exported UniMAGE weights (no JAX needed): ``pip install unimage_jax[torch]``."""

from unimage_jax.torch_serving.model import UniMAGETorch, load_exported, visibility  # noqa: F401
