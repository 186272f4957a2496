"""Installs the ``genkernels`` distribution.

The repository keeps its three packages at the top level (``kernels/``, ``models/``, ``bench/``); they are mapped
into the ``genkernels`` namespace here so that the plain names never collide with other installed packages.
"""
from setuptools import setup

PACKAGE_DIRS = {
    "genkernels.kernels": "kernels",
    "genkernels.models": "models",
    "genkernels.models.train": "models/train",
    "genkernels.bench": "bench",
    "genkernels.bench.cases": "bench/cases",
}

setup(
    packages=list(PACKAGE_DIRS),
    package_dir=PACKAGE_DIRS,
    package_data={"genkernels.kernels": ["py.typed"], "genkernels.models": ["py.typed"],
                  "genkernels.bench": ["py.typed", "results/*.json", "results/*.md"]},
)
