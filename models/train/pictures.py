"""Pictures of a training run: sample grids, spectrograms and the loss curve (matplotlib, imported lazily).

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so writing them changes no global plotting state.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def image_grid(images: torch.Tensor, columns: int = 8, padding: int = 1) -> np.ndarray:
    """Tile ``images`` ``[N, C, H, W]`` (values in [0, 1], clipped; C = 1 or 3) into one ``[rows*(H+p)+p,
    columns*(W+p)+p, C]`` array, row-major, with ``padding`` pixels of white between and around the tiles."""
    images = images.detach().float().clamp(0, 1).cpu().numpy()
    count, channels, height, width = images.shape
    columns = max(1, min(columns, count))
    rows = max(1, math.ceil(count / columns))
    grid = np.ones((rows * (height + padding) + padding, columns * (width + padding) + padding, channels))
    for i, image in enumerate(images):
        top = padding + (i // columns) * (height + padding)
        left = padding + (i % columns) * (width + padding)
        grid[top:top + height, left:left + width] = image.transpose(1, 2, 0)
    return grid


def save_image_grid(images: torch.Tensor, path: Path, title: str = "", columns: int = 8) -> None:
    """Write :func:`image_grid` of ``images`` (values in [0, 1]) with ``columns`` tiles a row to the PNG ``path``."""
    grid = image_grid(images, columns)
    figure = _figure(6, 6 * grid.shape[0] / grid.shape[1] + (0.4 if title else 0))
    axes = figure.add_axes((0, 0, 1, 0.93 if title else 1))
    if grid.shape[2] == 1:
        axes.imshow(grid[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        axes.imshow(grid, interpolation="nearest")
    axes.set_axis_off()
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=100)


def save_spectrograms(clips: Sequence[np.ndarray], sample_rate: int, path: Path) -> None:
    """Write the spectrogram of each audio clip (one panel per clip, frequency up to ``sample_rate / 2``; windows of
    256 samples with 75% overlap)."""
    figure = _figure(8, 2 * len(clips))
    for i, clip in enumerate(clips):
        clip = np.asarray(clip, dtype=np.float64)
        window = max(8, min(256, clip.shape[0] // 4))  # 32 ms at 8 kHz; shorter for clips too short for four
        axes = figure.add_subplot(len(clips), 1, i + 1)
        axes.specgram(clip, NFFT=window, Fs=sample_rate, noverlap=3 * window // 4, cmap="magma")
        axes.set_ylabel("Hz")
    figure.axes[-1].set_xlabel("seconds")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def read_log(path: Path) -> list[dict]:
    """The records of a ``log.jsonl`` file, one JSON object per line."""
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def save_loss_plot(log_path: Path, path: Path) -> None:
    """Write the loss curve (and any other ``*_loss`` series) of the run logged at ``log_path``."""
    records = read_log(log_path)
    figure = _figure(7, 4)
    axes = figure.add_subplot(1, 1, 1)
    names = ["loss"] + sorted({key for record in records for key in record if key.endswith("_loss")})
    for name in names:
        points = [(record["step"], record[name]) for record in records if name in record]
        if points:
            steps, values = zip(*points)
            axes.plot(steps, values, label=name)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
