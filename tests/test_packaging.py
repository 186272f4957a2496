"""What an installed genkernels carries: one version everywhere, typing markers, the licence and changelog."""
from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
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


def test_the_bare_folder_names_reexport_the_installed_packages():
    """From the repository root ``import kernels`` (as transformers does when it probes for a package of that
    name) must not load a second copy of the submodules, whose op registrations would replace the real ones."""
    code = ("import sys, kernels, models, genkernels.kernels as real; "
            "print(kernels.flash_attention is real.flash_attention, "
            "sorted({m.split('.')[0] for m in sys.modules if m.startswith(('kernels.', 'models.'))}))")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[0] == "True []"
