"""One-file training checkpoints: model, optimizers, EMA, step, random states and the run's configuration.

A checkpoint is a ``torch.save`` dict (:data:`FORMAT`) with ``family``, ``config`` (what fixes the model and the
data order), ``step``, ``model`` / ``optimizers`` / ``ema`` state dicts, ``rng`` (torch CPU and CUDA, numpy and
Python states, and each process's training generator) and ``data_order``. It is written to a temporary file in the
same folder and renamed over the old one, so an interrupted write never replaces a good checkpoint. Restoring every
state makes a resumed run reproduce the run that never stopped.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

FORMAT = "genkernels-train/1"
FILE_NAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot resume this run: names the file and what does not match."""


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (plus the format tag) to ``path`` atomically: a temporary file, then a rename."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"format": FORMAT, **payload}, temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def load(path: Path, family: str, config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint at ``path``, checked to come from a run of ``family`` with this ``config``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume: there is no checkpoint {path} to resume from")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch.load raises many types for a damaged file
        raise CheckpointError(f"{path} cannot be read as a checkpoint: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a genkernels training checkpoint (format {FORMAT})")
    if payload["family"] != family:
        raise CheckpointError(f"{path} is a checkpoint of model {payload['family']!r}; this run trains {family!r}")
    saved = payload["config"]
    different = sorted(key for key in set(saved) | set(config) if saved.get(key) != config.get(key))
    if different:
        listing = "; ".join(f"{key}: checkpoint {saved.get(key)!r}, this run {config.get(key)!r}"
                            for key in different)
        raise CheckpointError(f"{path} was written by a run with another configuration ({listing}); resume with "
                              "the same options or choose another --out")
    return payload


def rng_state() -> dict[str, Any]:
    """This process's global random states: torch (CPU and every CUDA device), numpy and Python."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(), "python": random.getstate()}


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`rng_state`'s snapshot."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def generator_state(generator: torch.Generator) -> torch.Tensor:
    """The state of ``generator`` on the CPU (a CUDA generator's state is a CPU byte tensor too)."""
    return generator.get_state().cpu()


def restore_generator(generator: torch.Generator, state: Optional[torch.Tensor]) -> None:
    """Set ``generator`` back to a state from :func:`generator_state`."""
    if state is not None:
        generator.set_state(state)
