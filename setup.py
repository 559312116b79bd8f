from setuptools import setup

setup(
    name="fastcifar",
    version="0.1.0",
    description="Train <=50K-parameter CIFAR-10 networks fast: FFCV data, device-side augmentation, "
                "Triton fused GroupNorm+ReLU",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # benchmarks/ runs from the checkout (python -m benchmarks...): no top-level "benchmarks" in site-packages
    packages=["fastcifar", "fastcifar.data", "fastcifar_kernels"],
    # the import name `kernels` belongs to another PyPI project; ours installs as fastcifar_kernels
    package_dir={"fastcifar_kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy>=1.24",
        "ffcv>=1.0.2",
        "triton>=3.0; platform_system == 'Linux'",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "pillow>=9.0",
    ],
    extras_require={"test": ["pytest>=7"]},
)
