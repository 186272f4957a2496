"""Other Triton releases for the compiled-code report, installed beside the one the package runs with.

The kernels are compiled by whatever Triton the GPU they run on has, which need not be the release installed here
(the project's GPU machine has triton 3.6.0; CI installs a newer one). :func:`triton_path` installs a release once
into a cache folder of its own (``pip install --no-deps --target``, nothing else in the environment changes), and
the report's worker process puts that folder first on its ``PYTHONPATH``, so that the same captured launches are
compiled by that release's compiler and ``ptxas``.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# The Triton release of the project's GPU machine: CI compiles every benchmark launch with it as well.
GPU_MACHINE_TRITON = "3.6.0"

_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def cache_root() -> Path:
    """``$GENKERNELS_CACHE`` or ``$XDG_CACHE_HOME/genkernels`` (``~/.cache/genkernels``)."""
    if os.environ.get("GENKERNELS_CACHE"):
        return Path(os.environ["GENKERNELS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "genkernels"


def installed_version(folder: Path) -> str | None:
    """The version of the Triton installed in ``folder`` (from its dist-info), or None."""
    versions = [path.name[len("triton-"):-len(".dist-info")] for path in folder.glob("triton-*.dist-info")]
    return versions[0] if len(versions) == 1 and (folder / "triton" / "__init__.py").exists() else None


def triton_path(version: str) -> str:
    """A folder holding Triton ``version`` alone (installed on first use), to put first on ``PYTHONPATH``.

    Raises ``ValueError`` for a malformed version and ``RuntimeError`` with pip's output when the release cannot be
    installed (no package index reachable, no wheel for this platform)."""
    if not isinstance(version, str) or not _VERSION.match(version):
        raise ValueError(f"triton version: expected a release such as {GPU_MACHINE_TRITON!r}, got {version!r}")
    folder = cache_root() / f"triton-{version}"
    if installed_version(folder) == version:
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Installed into a fresh folder and renamed into place, so that concurrent callers never see half an install.
    staging = Path(tempfile.mkdtemp(prefix=f".triton-{version}-", dir=folder.parent))
    try:
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                                 "--disable-pip-version-check", "--target", str(staging), f"triton=={version}"],
                                capture_output=True, text=True)
        if result.returncode != 0 or installed_version(staging) != version:
            raise RuntimeError(f"could not install triton=={version} for the compiled-code report "
                               f"(pip exited {result.returncode}):\n{(result.stdout + result.stderr)[-2000:]}")
        try:
            staging.rename(folder)
        except OSError:  # another process installed it first (or a stale folder is in the way)
            if installed_version(folder) != version:
                shutil.rmtree(folder, ignore_errors=True)
                staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(folder)
