"""The training command's evaluation: the VAE's importance-weighted bound, the baseline cache, the families' sample
conversions and pictures' helpers (the whole evaluation of every family runs in test_train_cli's quick runs)."""
import math

import pytest
import torch
from torch.distributions import Normal

from genkernels.kernels import use_impl
from genkernels.models.pixelcnn import PixelCNN
from genkernels.models.train import evaluation, families
from genkernels.models.train.data import ImageData
from genkernels.models.train.metrics import requantize
from genkernels.models.vae import VAE


@pytest.fixture(autouse=True)
def isolated_eager_runs(tmp_path, monkeypatch):
    """A fresh baseline cache per test; the models' eager ops (their kernels have tests of their own)."""
    monkeypatch.setenv(evaluation.CACHE_ENVIRONMENT_VARIABLE, str(tmp_path))
    with use_impl("eager"):
        yield


def small_vae():
    torch.manual_seed(0)
    return VAE(1, 8, latent_dim=3, hidden_channels=(4,), likelihood="gaussian", variance="learned",
               sigma=0.3).eval()


def test_importance_weighted_bound_against_torch_distributions():
    model = small_vae()
    y = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    k = 7
    found = evaluation.importance_weighted_log_likelihood(model, y, k, torch.Generator().manual_seed(2))
    # the same draws, scored with torch.distributions in fp64
    noise = torch.randn((k, 5, 3), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mu, logvar = model.encode(y)
        posterior = Normal(mu.double(), torch.exp(0.5 * logvar.double()))
        z = posterior.mean + posterior.stddev * noise.double()
        means = model.decode(z.float().reshape(-1, 3)).double().reshape(k, 5, 1, 8, 8)
        sigma = torch.exp(model.log_sigma.double()).reshape(1, 1, -1, 1, 1)
    log_likelihood = Normal(means, sigma).log_prob(y.double()).sum((2, 3, 4))
    log_weights = log_likelihood + Normal(0.0, 1.0).log_prob(z).sum(-1) - posterior.log_prob(z).sum(-1)
    expected = torch.logsumexp(log_weights, 0) - math.log(k)
    torch.testing.assert_close(found.double(), expected, rtol=1e-5, atol=1e-3)


def test_importance_weighted_bound_lies_above_the_elbo():
    """L_k rises with k towards log p: over many images, L_64 beats the analytic-KL ELBO (the gap here is tens
    of nats per image, far beyond the estimates' noise)."""
    model = small_vae()
    y = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        elbo = float(model.loss(y, generator=torch.Generator().manual_seed(4)).elbo)
    bound = float(evaluation.importance_weighted_log_likelihood(model, y, 64, torch.Generator().manual_seed(5))
                  .mean())
    single = float(evaluation.importance_weighted_log_likelihood(model, y, 1, torch.Generator().manual_seed(5))
                   .mean())
    assert bound > elbo and bound > single


def test_importance_weighted_bits_per_dim_is_the_bound_in_bits():
    model = small_vae()
    images = torch.randint(0, 17, (10, 1, 8, 8), generator=torch.Generator().manual_seed(6))
    bits = evaluation.importance_weighted_bits_per_dim(model, images, 17, 4, torch.Generator().manual_seed(7),
                                                       batch_size=3)
    generator = torch.Generator().manual_seed(7)  # the batches' draws in order: dequantization, then z noise
    total = 0.0
    for start in range(0, 10, 3):
        batch = images[start:start + 3]
        y = (batch.float() + torch.rand(batch.shape, generator=generator)) / 17
        log_p = evaluation.importance_weighted_log_likelihood(model, y, 4, generator).double()
        total += float((-(log_p - 64 * math.log(17)) / (64 * math.log(2))).sum())
    assert bits == pytest.approx(total / 10, rel=1e-9)


def test_cache_computes_once_and_keys_follow_the_data_and_settings():
    calls = []

    def compute():
        calls.append(1)
        return {"bits": 1.5}

    data = torch.arange(6)
    key = evaluation.cache_key("text", {"orders": [1, 2]}, data, "abc")
    assert evaluation.cached_json(key, compute) == ({"bits": 1.5}, False)
    assert evaluation.cached_json(key, compute) == ({"bits": 1.5}, True)
    assert len(calls) == 1
    assert evaluation.cache_key("text", {"orders": [1, 2]}, torch.arange(6), "abc") == key
    changed = [evaluation.cache_key("text", {"orders": [1, 3]}, data, "abc"),
               evaluation.cache_key("text", {"orders": [1, 2]}, data + 1, "abc"),
               evaluation.cache_key("text", {"orders": [1, 2]}, data.reshape(2, 3), "abc"),
               evaluation.cache_key("text", {"orders": [1, 2]}, data, "abd"),
               evaluation.cache_key("audio", {"orders": [1, 2]}, data, "abc")]
    assert len(set(changed + [key])) == len(changed) + 1


def test_cache_key_follows_the_baselines_code(monkeypatch):
    key = evaluation.cache_key("text", {}, "abc")
    monkeypatch.setattr(evaluation, "_code_digest", lambda: b"other code")
    assert evaluation.cache_key("text", {}, "abc") != key


def test_cached_classifier_is_reloaded_with_the_same_weights():
    images = torch.randint(0, 5, (40, 1, 4, 4), generator=torch.Generator().manual_seed(8))
    train = ImageData(images, 5, torch.arange(40) % 3, "test")
    settings = {"classifier_epochs": 2}
    fitted = evaluation.cached_classifier(train, settings)
    reloaded = evaluation.cached_classifier(train, settings)
    assert fitted is not reloaded
    for (name, value), (_, again) in zip(fitted.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(value, again), name
    assert not reloaded.training


def test_sample_conversions_invert_the_training_transforms():
    levels = torch.arange(17).reshape(1, 1, 1, 17)
    assert torch.equal(families.signed_to_levels(families.signed_images(levels, 17), 17), levels)
    assert torch.equal(families.class_levels(families.pixel_classes(levels, 17), 17), levels)
    assert torch.equal(requantize((levels.double() + 0.5) / 17, 17), levels)  # a VAE mean at a cell's centre
    assert torch.equal(families.signed_to_levels(torch.tensor([-3.0, 3.0]), 17), torch.tensor([0, 16]))


def test_labelled_batches_carry_the_labels():
    images = torch.randint(0, 17, (6, 1, 8, 8), generator=torch.Generator().manual_seed(9))
    data = families.LabelledImageData(images, 17, torch.tensor([3, 1, 4, 1, 5, 9]), "test")
    index = torch.tensor([4, 0, 2])
    part = data.subset(torch.tensor([1, 2, 3, 4, 5]))
    assert isinstance(part, families.LabelledImageData) and torch.equal(part.labels, torch.tensor([1, 4, 1, 5, 9]))
    batch_images, batch_labels = families.split_labelled(data.batch(index), data.shape)
    assert torch.equal(batch_images, images[index]) and torch.equal(batch_labels, torch.tensor([5, 3, 4]))


def test_pixelcnn_completion_keeps_the_top_half():
    torch.manual_seed(0)
    model = PixelCNN(1, 6, 1, 12, (8, 8)).eval()
    classes = torch.randint(0, 256, (4, 1, 8, 8), generator=torch.Generator().manual_seed(10))
    completed = families.complete_bottom_half(model, classes, torch.Generator().manual_seed(11))
    assert torch.equal(completed[:, :, :4], classes[:, :, :4])
    assert completed.dtype == torch.int64 and 0 <= int(completed.min()) and int(completed.max()) <= 255
    assert not torch.equal(completed[:, :, 4:], classes[:, :, 4:])
    again = families.complete_bottom_half(model, classes, torch.Generator().manual_seed(11))
    assert torch.equal(again, completed)
