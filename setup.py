"""unimage-jax: a JAX/Flax, TPU-native UniMAGE director model (Mixture-of-Transformers)."""

from setuptools import find_packages, setup

setup(
    name="unimage_jax",
    version="0.1.0",
    description="UniMAGE director model in JAX/Flax: multi-shot scripts and consistent keyframes",
    python_requires=">=3.11",
    packages=find_packages(include=["unimage_jax", "unimage_jax.*", "data_pipelines", "data_pipelines.*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "tensorflow-datasets>=4.9.7",
        "array-record>=0.7",
        "sentencepiece>=0.2",
        "ml-collections>=1.0",
        "absl-py>=2.1",
        "chex>=0.1.88",
        "numpy>=1.26",
        "pillow>=10",
        "safetensors>=0.4",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
    ],
    extras_require={
        # The CPU build of torch is preinstalled-able as a local file; .ci/run pins it first.
        "torch": ["torch>=2.4", "transformers>=4.51", "diffusers>=0.32"],
        "test": ["pytest>=8", "hypothesis>=6.100", "pytest-timeout>=2.3", "pytest-xdist>=3.6"],
        # libtpu for ahead-of-time TPU compiles on any host; 0.0.42.x is the build jax 0.10.2 uses
        "tpu": ["libtpu==0.0.42.*"],
    },
)
