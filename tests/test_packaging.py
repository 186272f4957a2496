"""What an installed genkernels carries: one version everywhere, typing markers, the licence and changelog."""
from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("genkernels.kernels", "genkernels.models", "genkernels.bench")


@pytest.mark.parametrize("name", PACKAGES)
def test_every_package_reports_the_distribution_version_and_is_typed(name):
    package = importlib.import_module(name)
    assert package.__version__ == importlib.metadata.version("genkernels")
    assert (Path(package.__file__).parent / "py.typed").is_file()


def test_the_distribution_names_its_licence_and_the_changelog_its_version():
    metadata = importlib.metadata.metadata("genkernels")
    assert "Apache" in (metadata.get("License") or "") and "Apache License" in (REPO / "LICENSE").read_text()
    assert f"## {importlib.metadata.version('genkernels')}" in (REPO / "CHANGELOG.md").read_text()
