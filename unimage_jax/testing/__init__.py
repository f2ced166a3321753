"""Fixtures for tests, benchmarks and tools; nothing in the runtime imports this package.

``layouts``: synthetic packed-row metadata (random rows, StoryWorld-like rows) for attention
tests and benchmarks. ``attention_aot``: the attention step (and a toy train step around it)
compiled ahead of time for a TPU topology description on a CPU host.
"""
