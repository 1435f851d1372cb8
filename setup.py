"""big_contrast: one JAX/Flax trainer for contrastive pretraining (CLIP/ALIGN, more to come)."""

from setuptools import find_packages, setup

setup(
    name="big_contrast",
    version="0.1.0",
    description="JAX/Flax contrastive pretraining on CPU, GPU and TPU",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["big_contrast", "big_contrast.*"]),
    python_requires=">=3.11",
    install_requires=[
        # jax 0.10.x on Python 3.11, 0.12.x on 3.12+ (both supported and tested).
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "array-record>=0.8.6",
        "tensorflow-datasets>=4.9.10",  # TF-free data sources only; TensorFlow is not needed
        "ml-collections>=1.1.0",
        "tensorboardX>=2.6.5",
        "pillow>=10",
        "numpy>=2.0",
        "sentencepiece>=0.2.0",
        "msgpack>=1.0",
        "absl-py>=2.0",
    ],
    extras_require={
        # pytest-xdist: the README's test command runs the suite in two processes.
        "test": ["pytest>=8", "pytest-xdist>=3", "pycocoevalcap>=1.2"],  # CIDEr-D reference
        # jax's accelerator wheels (README, "Running on TPU VMs and GPU hosts").
        "tpu": ["jax[tpu]>=0.10.2"],
        "cuda12": ["jax[cuda12]>=0.10.2"],
    },
)
