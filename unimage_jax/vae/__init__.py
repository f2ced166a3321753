"""Image autoencoders: the FLUX-style VAE (Flax NNX) that maps images to the 16-channel latents."""
