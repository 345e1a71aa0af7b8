from setuptools import setup

# `kernels/` is installed as `swinv2_fast.kernels`, never as a top-level package: PyPI already has a
# package called `kernels` (Hugging Face's), which transformers probes for.
setup(
    name="swinv2_fast",
    version="0.1.0",
    description="Swin Transformer V2 with fused window attention",
    python_requires=">=3.10",
    packages=["swinv2_fast", "swinv2_fast.kernels"],
    package_dir={"swinv2_fast": "swinv2_fast", "swinv2_fast.kernels": "kernels"},
    # a GPU tile sweep's record (python -m swinv2_fast.kernels.sweep), read by block_config when present
    package_data={"swinv2_fast.kernels": ["tuned_tiles.json"]},
    install_requires=["torch>=2.4", "safetensors>=0.4"],
    extras_require={
        "test": ["pytest>=8", "transformers==5.18.0", "timm==1.0.29"],
    },
)
