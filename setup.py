from setuptools import find_packages, setup

setup(
    name="mmdit-jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of the MMDiT family (SD3, SD3.5, FLUX.1) with reference parity",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Only the library is installed; train/, sample/, convert/ are thin scripts for a checkout.
    packages=find_packages(include=["mmdit_jax", "mmdit_jax.*"]),
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "numpy",
        "ml_dtypes",
        "transformers",  # tokenizers only
        "safetensors",
        "grain",
        "array-record",  # precomputed latents
        "msgpack",
        "absl-py",
        "Pillow",
        "tensorboardX",  # training scalars and sample grids
        "etils[epath]",  # gs:// and s3:// paths (io/paths.py), as Orbax reads them
        "fsspec",
        "gcsfs",  # gs:// through epath / fsspec
        "s3fs",  # s3:// through epath / fsspec
    ],
    extras_require={
        # Accelerator builds of JAX; the plain install stays CPU-only. "cuda" follows JAX's current CUDA
        # major version; "cuda12" is for drivers that predate it.
        "cuda": ["jax[cuda13]>=0.7"],
        "cuda12": ["jax[cuda12]>=0.7"],
        "tpu": ["jax[tpu]>=0.7"],
        "test": [
            "torch==2.13.0",  # CPU build; oracle only
            "diffusers",
            "peft",  # diffusers' LoRA loading, to check our LoRA files against it
            "sentencepiece",
            "pytest",
            "pytest-xdist",
            "ruff",  # tests/test_lint.py: pyflakes rules over the tree
            "gcp-storage-emulator",  # tests/test_object_storage.py: local GCS
            "moto[server]",  # tests/test_object_storage.py: local S3
        ],
    },
    entry_points={
        "console_scripts": [
            "mmdit-convert=mmdit_jax.cli.convert:run",
            "mmdit-sample=mmdit_jax.cli.sample:run",
            "mmdit-train=mmdit_jax.cli.train:run",
            "mmdit-precompute=mmdit_jax.cli.precompute:run",
            "mmdit-info=mmdit_jax.info:run",
        ],
    },
)
