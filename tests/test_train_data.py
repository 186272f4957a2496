"""Training data: the shipped sets, folders of PNG/JPEG/WAV files, text files, the splits and the batch order."""
import wave

import numpy as np
import pytest
import torch

from genkernels.models.train import data

PIL = pytest.importorskip("PIL.Image")  # matplotlib depends on Pillow, so the dev extra has it


def write_png(path, array):
    PIL.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def write_wav_file(path, samples_int16, rate=8000, channels=1):
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(np.asarray(samples_int16, dtype="<i2").tobytes())


def mu_law_reference(audio, mu=255):
    """Mu-law classes from the formula, in float64 numpy (round half to even like torch.round)."""
    companded = np.sign(audio) * np.log1p(mu * np.abs(audio)) / np.log1p(mu)
    return np.rint((companded + 1) / 2 * mu).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------
def test_digits_are_sklearn_digits_as_levels():
    from sklearn.datasets import load_digits

    reference = load_digits()
    digits = data.load_images(None)
    assert digits.images.shape == (1797, 1, 8, 8) and digits.images.dtype == torch.int64
    assert digits.levels == 17
    np.testing.assert_array_equal(digits.images[:, 0].numpy(), reference.images.astype(np.int64))
    np.testing.assert_array_equal(digits.labels.numpy(), reference.target)


def test_split_is_fixed_disjoint_and_complete():
    digits = data.load_images(None)
    train, test = data.split_items(digits)
    again_train, _ = data.split_items(digits)
    assert len(test) == round(1797 * data.TEST_FRACTION) and len(train) + len(test) == 1797
    assert torch.equal(train.images, again_train.images)
    # every image lands on exactly one side: compare the multisets of (image, label) rows
    rows = lambda d: sorted(map(tuple, torch.cat([d.images.flatten(1), d.labels[:, None]], 1).tolist()))  # noqa
    everything = rows(digits)
    assert sorted(rows(train) + rows(test)) == everything


def test_png_folder_grey_and_colour(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (3, 6, 5))
    for i, image in enumerate(grey):
        write_png(tmp_path / f"{i}.png", image)
    loaded = data.load_images(tmp_path)
    assert loaded.levels == 256 and loaded.labels is None
    np.testing.assert_array_equal(loaded.images[:, 0].numpy(), grey)  # sorted file names: 0, 1, 2

    colour = rng.integers(0, 256, (6, 5, 3))
    write_png(tmp_path / "3.png", colour)  # one RGB file makes the whole folder RGB
    loaded = data.load_images(tmp_path)
    assert loaded.images.shape == (4, 3, 6, 5)
    np.testing.assert_array_equal(loaded.images[0].numpy(), np.repeat(grey[0][None], 3, axis=0))
    np.testing.assert_array_equal(loaded.images[3].numpy(), colour.transpose(2, 0, 1))


def test_jpeg_file_is_read(tmp_path):
    image = np.full((8, 8, 3), 200, dtype=np.uint8)
    PIL.fromarray(image).save(tmp_path / "a.jpg", quality=95)
    loaded = data.load_images(tmp_path)
    assert loaded.images.shape == (1, 3, 8, 8)
    assert (loaded.images - 200).abs().max() <= 3  # JPEG is lossy; a flat image stays close


def test_npy_array(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, (4, 2, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", array)
    loaded = data.load_images(tmp_path / "x.npy")
    assert loaded.levels == 256 and loaded.images.shape == (4, 1, 2, 3)
    np.testing.assert_array_equal(loaded.images[:, 0].numpy(), array)
    np.save(tmp_path / "small.npy", np.array([[[0, 3]], [[1, 2]]], dtype=np.int16))
    assert data.load_images(tmp_path / "small.npy").levels == 4


def test_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("no pictures here")
    with pytest.raises(data.DataError, match="holds no image files"):
        data.load_images(tmp_path)


def test_corrupt_image_names_the_file(tmp_path):
    write_png(tmp_path / "good.png", np.zeros((4, 4)))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(data.DataError, match="broken.png cannot be read as an image"):
        data.load_images(tmp_path)


def test_mixed_image_sizes_name_the_file(tmp_path):
    write_png(tmp_path / "a.png", np.zeros((4, 4)))
    write_png(tmp_path / "b.png", np.zeros((4, 5)))
    with pytest.raises(data.DataError, match=r"b.png is 5x4 pixels but a.png is 4x4"):
        data.load_images(tmp_path)


def test_npy_of_floats_is_refused(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((2, 3, 3), dtype=np.float32))
    with pytest.raises(data.DataError, match="f.npy holds a float32 array"):
        data.load_images(tmp_path / "f.npy")


# ----------------------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------------------
def test_help_topics_corpus():
    from pydoc_data.topics import topics

    text = data.load_text(None)
    expected = "\n".join(topics[key] for key in sorted(topics))
    assert text.decode(text.ids.tolist()) == expected
    assert text.alphabet == "".join(sorted(set(expected)))
    train, test = data.split_text(text)
    assert torch.equal(torch.cat([train.ids, test.ids]), text.ids)
    assert test.ids.shape[0] == round(len(expected) * data.TEST_FRACTION)


def test_text_file_windows(tmp_path):
    (tmp_path / "t.txt").write_text("abcab\u00e9", encoding="utf-8")
    text = data.load_text(tmp_path / "t.txt").with_window(3)
    assert text.alphabet == "abc\u00e9" and len(text) == 4
    assert text.batch(torch.tensor([0, 3])).tolist() == [[0, 1, 2], [0, 1, 3]]


def test_empty_text_file(tmp_path):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(data.DataError, match="empty.txt holds zero characters"):
        data.load_text(tmp_path / "empty.txt")


def test_text_shorter_than_a_window(tmp_path):
    (tmp_path / "short.txt").write_text("abc", encoding="utf-8")
    with pytest.raises(data.DataError, match="--block-size"):
        data.load_text(tmp_path / "short.txt").with_window(8)


@pytest.mark.parametrize("length, block_size", [(5, 4), (9, 4), (10, 4), (11, 3), (40, 8), (41, 8), (12, 1)])
def test_sliding_windows_score_every_character_after_the_first_once(length, block_size):
    starts, first = data.sliding_windows(length, block_size)
    stride = max(1, block_size // 2)
    scored = []
    for window, (start, skip) in enumerate(zip(starts.tolist(), first.tolist())):
        assert 0 <= start <= length - block_size - 1  # the window's ids lie inside the text
        assert start == min(window * stride, length - block_size - 1)
        # target j of the window is the id at start + 1 + j, predicted from the j + 1 ids before it
        scored += [(start + 1 + j, j + 1) for j in range(skip, block_size)]
    assert [position for position, _ in scored] == list(range(1, length))
    assert first[0] == 0
    assert all(context >= block_size - stride + 1 for position, context in scored if position > block_size)


def test_sliding_windows_limit_keeps_the_first_windows():
    starts, first = data.sliding_windows(40, 8)
    kept_starts, kept_first = data.sliding_windows(40, 8, limit=3)
    assert kept_starts.tolist() == starts[:3].tolist() == [0, 4, 8]
    assert kept_first.tolist() == first[:3].tolist() == [0, 4, 4]


def test_sliding_windows_reject_bad_input():
    with pytest.raises(ValueError, match="length"):
        data.sliding_windows(4, 4)  # no room for one window of block_size + 1 ids
    with pytest.raises(ValueError, match="block_size"):
        data.sliding_windows(10, 0)
    with pytest.raises(TypeError, match="limit"):
        data.sliding_windows(10, 4, limit=2.0)
    with pytest.raises(ValueError, match="limit"):
        data.sliding_windows(10, 4, limit=0)


# ----------------------------------------------------------------------------------------------------------------
# Audio
# ----------------------------------------------------------------------------------------------------------------
def test_wav_folder_segments(tmp_path):
    rng = np.random.default_rng(2)
    first, second = rng.integers(-32768, 32768, 10), rng.integers(-32768, 32768, 7)
    write_wav_file(tmp_path / "a.wav", first)
    write_wav_file(tmp_path / "b.wav", second)
    audio = data.load_audio(tmp_path, 4)
    # a.wav gives two segments (2 samples dropped), b.wav one (3 dropped)
    expected = np.stack([first[:4], first[4:8], second[:4]]) / 32768.0
    assert audio.sample_rate == 8000
    np.testing.assert_array_equal(audio.segments.numpy(), mu_law_reference(expected))


def test_wav_of_another_rate_names_the_file(tmp_path):
    write_wav_file(tmp_path / "ok.wav", np.zeros(16))
    write_wav_file(tmp_path / "fast.wav", np.zeros(16), rate=16000)
    with pytest.raises(data.DataError, match="fast.wav is 16000 Hz"):
        data.load_audio(tmp_path, 4)


def test_folder_without_wavs(tmp_path):
    with pytest.raises(data.DataError, match="found none"):
        data.load_audio(tmp_path, 4)


def test_synthetic_voices_are_seeded_voiced_sounds():
    sounds = data.synthetic_voices(count=3, seconds=0.5)
    assert sounds.shape == (3, 4000)
    np.testing.assert_array_equal(sounds, data.synthetic_voices(count=3, seconds=0.5))
    np.testing.assert_allclose(np.abs(sounds).max(axis=1), 0.8)
    for sound in sounds:  # voiced: the strongest spectral peak lies on a harmonic of a pitch in the voice range
        spectrum = np.abs(np.fft.rfft(sound[:2000]))
        peak_hz = np.argmax(spectrum) * 8000 / 2000
        assert 60 <= peak_hz <= 3500
        assert spectrum.max() > 20 * np.median(spectrum)


# ----------------------------------------------------------------------------------------------------------------
# Batch order
# ----------------------------------------------------------------------------------------------------------------
def test_batch_order_ranks_split_the_global_batch():
    single = data.BatchOrder(10, 4, seed=3)
    ranks = [data.BatchOrder(10, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in range(5):  # two batches per epoch: steps 2 and 4 start new epochs
        assert torch.equal(torch.cat([order.indices(step) for order in ranks]), single.indices(step))
    epoch = torch.cat([single.indices(0), single.indices(1)])
    assert len(set(epoch.tolist())) == 8  # no item twice within an epoch
    assert not torch.equal(single.indices(0), data.BatchOrder(10, 4, seed=4).indices(0))


def test_batch_size_larger_than_the_data():
    with pytest.raises(data.DataError, match="--batch-size 11 is larger than the training data"):
        data.BatchOrder(10, 11, seed=0)


def test_world_size_must_divide_the_batch():
    with pytest.raises(data.DataError, match="--batch-size 5 is not divisible by the world size 2"):
        data.BatchOrder(10, 5, seed=0, rank=0, world_size=2)
