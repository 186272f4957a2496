"""Training data that needs no download: images, text and audio, with fixed train/test splits and batch orders.

* Images are integer tensors ``[N, C, H, W]`` of levels ``0 .. L-1`` plus the level count ``L``
  (:class:`ImageData`). The default is scikit-learn's digits (1,797 grey 8x8 images of 17 levels, 0..16, with
  their labels 0..9), shipped inside scikit-learn. ``--data`` takes a folder of PNG/JPEG files (8-bit, ``L = 256``;
  grey when every file is grey, else RGB) or an ``.npy`` array of integers (``[N, H, W]`` or ``[N, C, H, W]``;
  ``L = 256`` for uint8, else its maximum + 1).
* Text (:class:`TextData`) is character level: the ids of a string over its sorted alphabet. The default corpus is
  Python's own help topics (``pydoc_data.topics``, keys sorted, about 465k characters); ``--data`` takes a UTF-8
  file.
* Audio (:class:`AudioData`) is 8 kHz mu-law audio, 256 classes, cut into equal segments. The default is a seeded
  synthetic set of voiced sounds (:func:`synthetic_voices`); ``--data`` takes a folder of 8 kHz mono 16-bit WAV
  files.

Every split is fixed: the last :data:`TEST_FRACTION` of a seeded permutation (images, audio; seed
:data:`SPLIT_SEED`, not the run's seed) or of the text is held out. :class:`BatchOrder` fixes which items every
step trains on, as a pure function of the seed and the step, so a resumed run draws exactly the batches of the run
that never stopped, and every process of a data-parallel run takes its equal share of the same global batch.
"""
from __future__ import annotations

import dataclasses
import math
import os
import wave
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from genkernels.kernels.checks import check_int

TEST_FRACTION = 0.1
SPLIT_SEED = 0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SAMPLE_RATE = 8000
MU_LAW_CLASSES = 256
DIGITS_LEVELS = 17


class DataError(ValueError):
    """Training data that cannot be used: names the file or option and says what was expected."""


# ----------------------------------------------------------------------------------------------------------------
# Containers
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ImageData:
    """``images`` int64 ``[N, C, H, W]`` of levels ``0 .. levels-1``; ``labels`` int64 ``[N]`` or None."""

    images: torch.Tensor
    levels: int
    labels: Optional[torch.Tensor]
    source: str

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])

    def subset(self, index: torch.Tensor) -> "ImageData":
        labels = None if self.labels is None else self.labels[index]
        return ImageData(self.images[index], self.levels, labels, self.source)

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        return self.images[index]


@dataclasses.dataclass
class TextData:
    """``ids`` int64 ``[T]``: the text's characters as indices into ``alphabet``. An item is a window of
    ``window`` consecutive ids (a model's context plus the next character)."""

    ids: torch.Tensor
    alphabet: str
    source: str
    window: int = 0

    def __len__(self) -> int:
        return max(0, self.ids.shape[0] - self.window + 1)

    def with_window(self, window: int) -> "TextData":
        """The same text with items of ``window`` characters (a ``DataError`` if the text is shorter)."""
        if self.ids.shape[0] < window:
            raise DataError(f"{self.source} holds {self.ids.shape[0]} characters here, fewer than one window of "
                            f"{window} (the context plus one); use a longer text or a smaller --block-size")
        return dataclasses.replace(self, window=window)

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        """Windows ``[len(index), window]`` starting at the positions ``index``."""
        return self.ids[index[:, None] + torch.arange(self.window)]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.alphabet[i] for i in ids)


@dataclasses.dataclass
class AudioData:
    """``segments`` int64 ``[N, T]`` of mu-law classes ``0 .. 255`` at ``sample_rate``."""

    segments: torch.Tensor
    sample_rate: int
    source: str

    def __len__(self) -> int:
        return self.segments.shape[0]

    def subset(self, index: torch.Tensor) -> "AudioData":
        return AudioData(self.segments[index], self.sample_rate, self.source)

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        return self.segments[index]


def split_items(data, test_fraction: float = TEST_FRACTION):
    """``(train, test)``: the last ``test_fraction`` of a permutation seeded with :data:`SPLIT_SEED` is held out
    (at least one item on each side)."""
    count = len(data)
    if count < 2:
        raise DataError(f"{data.source} holds {count} item(s); a train/test split needs at least 2")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(SPLIT_SEED))
    test_count = min(count - 1, max(1, round(count * test_fraction)))
    return data.subset(order[:count - test_count]), data.subset(order[count - test_count:])


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------
def load_digits() -> ImageData:
    """scikit-learn's digits: 1,797 images ``[1797, 1, 8, 8]`` of 17 grey levels, labels 0..9."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images.astype(np.int64)).reshape(-1, 1, 8, 8)
    return ImageData(images, DIGITS_LEVELS, torch.from_numpy(bunch.target.astype(np.int64)),
                     "scikit-learn digits")


def load_images(path: Optional[str | os.PathLike] = None) -> ImageData:
    """The images at ``path`` (a folder of PNG/JPEG files, or an ``.npy`` file), or the digits when None."""
    if path is None:
        return load_digits()
    path = Path(path)
    if path.is_dir():
        return _image_folder(path)
    if path.suffix.lower() == ".npy" and path.is_file():
        return _image_array(path)
    raise DataError(f"--data {path}: expected a folder of {'/'.join(IMAGE_SUFFIXES)} images or an .npy file")


def _image_folder(folder: Path) -> ImageData:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"--data {folder}: the folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    pictures = [_read_picture(file) for file in files]
    channels = 3 if any(p.ndim == 3 for p in pictures) else 1
    first_size = pictures[0].shape[:2]
    arrays = []
    for file, picture in zip(files, pictures):
        if picture.shape[:2] != first_size:
            raise DataError(f"{file} is {picture.shape[1]}x{picture.shape[0]} pixels but {files[0].name} is "
                            f"{first_size[1]}x{first_size[0]}: every image of --data must have one size")
        if picture.ndim == 2:
            picture = np.repeat(picture[:, :, None], channels, axis=2)
        arrays.append(picture.reshape(first_size + (channels,)))
    images = torch.from_numpy(np.stack(arrays).astype(np.int64)).permute(0, 3, 1, 2).contiguous()
    return ImageData(images, 256, None, str(folder))


def _read_picture(file: Path) -> np.ndarray:
    """8-bit pixels ``[H, W]`` (grey) or ``[H, W, 3]`` (colour; alpha dropped) of one image file."""
    try:
        from PIL import Image
    except ImportError:
        return _read_picture_matplotlib(file)
    try:
        with Image.open(file) as image:
            grey = image.mode in ("1", "L", "LA", "I", "I;16")
            return np.asarray(image.convert("L" if grey else "RGB"), dtype=np.uint8)
    except (OSError, ValueError) as error:
        raise DataError(f"{file} cannot be read as an image: {error}") from error


def _read_picture_matplotlib(file: Path) -> np.ndarray:
    import matplotlib.image

    try:
        picture = matplotlib.image.imread(file)
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"{file} cannot be read as an image: {error}") from error
    if picture.dtype != np.uint8:  # PNGs come back as floats in [0, 1]
        picture = np.rint(picture * 255).astype(np.uint8)
    if picture.ndim == 3:
        picture = picture[:, :, :3]
        if (picture == picture[:, :, :1]).all():
            picture = picture[:, :, 0]
    return picture


def _image_array(file: Path) -> ImageData:
    try:
        array = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"{file} cannot be read as a numpy array: {error}") from error
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4 or not np.issubdtype(array.dtype, np.integer) or array.size == 0:
        raise DataError(f"{file} holds a {array.dtype} array of shape {list(array.shape)}; expected non-empty "
                        "integer images [N, H, W] or [N, C, H, W]")
    if array.min() < 0:
        raise DataError(f"{file} holds a negative pixel value {array.min()}; expected levels 0 .. L-1")
    levels = 256 if array.dtype == np.uint8 else int(array.max()) + 1
    return ImageData(torch.from_numpy(array.astype(np.int64)), max(levels, 2), None, str(file))


# ----------------------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------------------
def python_help_topics() -> str:
    """The text of Python's help topics (``pydoc_data.topics``), the topics in sorted key order."""
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics))


def load_text(path: Optional[str | os.PathLike] = None) -> TextData:
    """Character ids of the UTF-8 file at ``path`` (or of :func:`python_help_topics` when None)."""
    if path is None:
        text, source = python_help_topics(), "Python help topics"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"--data {path} cannot be read as UTF-8 text: {error}") from error
        source = str(path)
    if not text:
        raise DataError(f"--data {source} holds zero characters; expected a non-empty UTF-8 text")
    alphabet = "".join(sorted(set(text)))
    lookup = {char: i for i, char in enumerate(alphabet)}
    ids = torch.tensor([lookup[char] for char in text], dtype=torch.int64)
    return TextData(ids, alphabet, source)


def split_text(data: TextData, test_fraction: float = TEST_FRACTION) -> tuple[TextData, TextData]:
    """``(train, test)``: the last ``test_fraction`` of the characters is held out."""
    cut = data.ids.shape[0] - max(1, round(data.ids.shape[0] * test_fraction))
    return (dataclasses.replace(data, ids=data.ids[:cut]), dataclasses.replace(data, ids=data.ids[cut:]))


def sliding_windows(length: int, block_size: int, limit: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows that score a text of ``length`` ids with a model of context ``B = block_size``:
    ``(starts, first)``, int64 ``[W]``.

    Window ``w`` holds the ``B + 1`` ids at positions ``starts[w] .. starts[w] + B``: ``B`` inputs, each predicting
    the next id, so its targets sit at positions ``starts[w] + 1 + j`` for ``j = 0 .. B - 1``, and it scores the
    targets with ``j >= first[w]``. Windows advance by the stride ``S = max(1, B // 2)``: ``starts[w] = min(w S,
    length - B - 1)`` (the last window ends at the text's last id). The first window scores all its targets
    (``first[0] = 0``); every later one scores just those the previous window did not reach, ``first[w] =
    starts[w-1] + B - starts[w] >= B - S``, so every one of them is predicted from at least ``B - S + 1`` ids of
    context. Every id after the first (which is context only) is scored exactly once, in order: positions
    ``1 .. starts[-1] + B``. ``limit``: at most this many windows, from the start (the scored text then ends
    with the last window kept)."""
    block_size = check_int(block_size, "block_size", low=1)
    length = check_int(length, "length", low=block_size + 1)
    if limit is not None:
        check_int(limit, "limit", low=1)
    stride = max(1, block_size // 2)
    count = 1 + math.ceil((length - 1 - block_size) / stride)
    starts = (torch.arange(count) * stride).clamp(max=length - block_size - 1)
    first = torch.zeros(count, dtype=torch.int64)
    first[1:] = starts[:-1] + block_size - starts[1:]
    return starts[:limit], first[:limit]


# ----------------------------------------------------------------------------------------------------------------
# Audio
# ----------------------------------------------------------------------------------------------------------------
def synthetic_voices(count: int = 96, seconds: float = 1.0, seed: int = SPLIT_SEED,
                     sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """``count`` seeded voiced sounds ``[count, seconds * sample_rate]`` in [-1, 1].

    Each sound is a harmonic series ``sum_k a_k sin(2 pi k phi(t))`` over the harmonics below 3.5 kHz, with
    ``a_k = 1/k`` shaped by one random formant peak (a Gaussian bump over 300..2500 Hz), on a pitch contour
    ``f0(t) = f0 * (1 + glide * t / seconds) * (1 + 0.03 sin(2 pi 5 t))`` (a glide of -30%..+30% and vibrato;
    ``f0`` uniform in 90..320 Hz, ``phi`` its running integral); times an envelope ``(1 - exp(-t / 0.02)) *
    exp(-t / decay)`` (decay 0.3..1.5 s); plus Gaussian noise of standard deviation 0.005; scaled to a peak of 0.8.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    sounds = np.empty((count, t.shape[0]))
    for i in range(count):
        f0, glide = rng.uniform(90.0, 320.0), rng.uniform(-0.3, 0.3)
        formant, width = rng.uniform(300.0, 2500.0), rng.uniform(200.0, 800.0)
        pitch = f0 * (1 + glide * t / seconds) * (1 + 0.03 * np.sin(2 * np.pi * 5.0 * t))
        phase = np.cumsum(pitch) / sample_rate
        voice = np.zeros_like(t)
        for k in range(1, int(3500.0 / (f0 * 1.3)) + 1):
            weight = (1.0 / k) * (0.3 + np.exp(-0.5 * ((k * f0 - formant) / width) ** 2))
            voice += weight * np.sin(2 * np.pi * k * phase)
        envelope = (1 - np.exp(-t / 0.02)) * np.exp(-t / rng.uniform(0.3, 1.5))
        sound = voice * envelope + rng.normal(0.0, 0.005, t.shape)
        sounds[i] = 0.8 * sound / np.abs(sound).max()
    return sounds


def read_wav(file: Path) -> np.ndarray:
    """The samples of an 8 kHz mono 16-bit WAV file as floats in [-1, 1)."""
    try:
        with wave.open(str(file), "rb") as reader:
            rate, channels, width = reader.getframerate(), reader.getnchannels(), reader.getsampwidth()
            frames = reader.readframes(reader.getnframes())
    except (OSError, EOFError, wave.Error) as error:
        raise DataError(f"{file} cannot be read as a WAV file: {error}") from error
    if (rate, channels, width) != (SAMPLE_RATE, 1, 2):
        raise DataError(f"{file} is {rate} Hz, {channels} channel(s), {8 * width}-bit; expected {SAMPLE_RATE} Hz "
                        "mono 16-bit")
    return np.frombuffer(frames, dtype="<i2").astype(np.float64) / 32768.0


def write_wav(file: Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write ``audio`` (floats in [-1, 1]) as a mono 16-bit WAV file."""
    pcm = np.clip(np.rint(np.asarray(audio) * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(file), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(sample_rate)
        writer.writeframes(pcm.tobytes())


def load_audio(path: Optional[str | os.PathLike], segment_length: int) -> AudioData:
    """Mu-law segments ``[N, segment_length]`` cut from the WAV files of the folder ``path`` (or from
    :func:`synthetic_voices` when None); a clip's remainder shorter than a segment is dropped."""
    from genkernels.models.wavenet import mu_law_encode

    check_int(segment_length, "segment_length", low=2)
    if path is None:
        clips, source = list(synthetic_voices()), "synthetic voices"
    else:
        folder = Path(path)
        files = sorted(folder.glob("*.wav")) if folder.is_dir() else []
        if not files:
            raise DataError(f"--data {folder}: expected a folder of .wav files (8 kHz mono 16-bit); found none")
        clips, source = [read_wav(file) for file in files], str(folder)
    segments = [clip[start:start + segment_length] for clip in clips
                for start in range(0, clip.shape[0] - segment_length + 1, segment_length)]
    if not segments:
        raise DataError(f"--data {source}: no clip holds one segment of {segment_length} samples")
    audio = torch.from_numpy(np.stack(segments)).float().clamp(-1.0, 1.0)
    return AudioData(mu_law_encode(audio, MU_LAW_CLASSES).long(), SAMPLE_RATE, source)


# ----------------------------------------------------------------------------------------------------------------
# Batch order
# ----------------------------------------------------------------------------------------------------------------
class BatchOrder:
    """Which items each training step reads: epoch ``e`` walks a permutation of the ``count`` items seeded with
    ``(seed, e)`` in consecutive global batches of ``batch_size`` (the last partial one dropped); process ``rank``
    of ``world_size`` takes the ``rank``-th equal slice of each global batch.

    The order is a function of ``(seed, step)`` alone: it has no state to save, and a data-parallel run sees,
    summed over its processes, exactly the batches of a single-process run.
    """

    def __init__(self, count: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.count, self.batch_size, self.seed = count, batch_size, seed
        self.rank, self.world_size = rank, world_size
        if batch_size > count:
            raise DataError(f"--batch-size {batch_size} is larger than the training data ({count} items)")
        if batch_size % world_size:
            raise DataError(f"--batch-size {batch_size} is not divisible by the world size {world_size}: every "
                            "process must take an equal share of the global batch")
        self.batches_per_epoch = count // batch_size
        self._epoch, self._permutation = -1, None

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def indices(self, step: int) -> torch.Tensor:
        """This process's item indices at training step ``step`` (0-based)."""
        epoch, position = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._permutation = epoch, torch.randperm(self.count, generator=generator)
        start = position * self.batch_size + self.rank * self.local_batch_size
        return self._permutation[start:start + self.local_batch_size]

    def state(self) -> dict:
        """What fixes the order (saved with a checkpoint, compared on resume)."""
        return {"count": self.count, "batch_size": self.batch_size, "seed": self.seed}


def evaluation_batches(count: int, batch_size: int, limit: Optional[int] = None):
    """Consecutive index ranges covering ``min(count, limit)`` items in batches of at most ``batch_size``."""
    total = count if limit is None else min(count, limit)
    for start in range(0, total, batch_size):
        yield torch.arange(start, min(total, start + batch_size))


def mean_over_batches(values: Sequence[tuple[float, int]]) -> float:
    """The item-weighted mean of per-batch means ``(mean, items)``."""
    items = sum(n for _, n in values)
    return math.fsum(v * n for v, n in values) / items
