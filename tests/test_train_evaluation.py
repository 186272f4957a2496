"""The training command's evaluation: the VAE's importance-weighted bound, the baseline cache, the families' sample
conversions and pictures' helpers (the whole evaluation of every family runs in test_train_cli's quick runs)."""
import math

import pytest
import torch
from torch.distributions import Normal

from genkernels.kernels import use_impl
from genkernels.models.glow import Glow
from genkernels.models.gpt import GPT, GPTConfig
from genkernels.models.pixelcnn import PixelCNN
from genkernels.models.train import evaluation, families
from genkernels.models.train.data import ImageData, TextData
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


def test_discrete_vae_bits_are_the_discrete_bound_and_its_inputs_the_grid():
    torch.manual_seed(0)
    model = VAE(1, 8, latent_dim=3, hidden_channels=(4,), likelihood="discretized_logistic", levels=17).eval()
    images = torch.randint(0, 17, (10, 1, 8, 8), generator=torch.Generator().manual_seed(6))
    grid = families.vae_inputs(model, images, 17, torch.Generator().manual_seed(1))
    torch.testing.assert_close(grid, images.float() / 16)  # no dequantization noise: a discrete likelihood
    assert torch.equal(families.vae_levels(model, grid, 17), images)
    bits = evaluation.importance_weighted_bits_per_dim(model, images, 17, 4, torch.Generator().manual_seed(7),
                                                       batch_size=3)
    generator, total = torch.Generator().manual_seed(7), 0.0
    for start in range(0, 10, 3):
        log_p = evaluation.importance_weighted_log_likelihood(model, grid[start:start + 3], 4, generator).double()
        total += float((-log_p / (64 * math.log(2))).sum())  # nats of the discrete image, no log L correction
    assert bits == pytest.approx(total / 10, rel=1e-9)


def test_latent_mixture_samples_have_the_mixture_moments():
    weights = torch.tensor([0.25, 0.75])
    means = torch.tensor([[4.0, 0.0], [-1.0, 2.0]])
    covariances = torch.tensor([[[1.0, 0.5], [0.5, 2.0]], [[0.3, 0.0], [0.0, 0.1]]])
    mixture = families.LatentMixture(weights, means, torch.linalg.cholesky(covariances))
    z = mixture.sample(200_000, torch.Generator().manual_seed(3)).double()
    # moments of a mixture: E z = sum_k w_k m_k, Cov z = sum_k w_k (S_k + m_k m_k^T) - E z E z^T
    mean = (weights[:, None] * means).sum(0).double()
    second = (weights[:, None, None] * (covariances + means[:, :, None] * means[:, None, :])).sum(0).double()
    torch.testing.assert_close(z.mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), second - torch.outer(mean, mean), atol=0.05, rtol=0)
    assert float((z[:, 0] > 1.5).double().mean()) == pytest.approx(0.25, abs=0.01)  # the first component's share


def test_latent_mixture_is_fitted_to_the_posterior_means():
    torch.manual_seed(0)
    model = VAE(1, 8, latent_dim=2, hidden_channels=(4,), likelihood="discretized_logistic", levels=17).eval()
    images = torch.randint(0, 17, (60, 1, 8, 8), generator=torch.Generator().manual_seed(4))
    mixture = families.fit_latent_mixture(model, images, 17, components=1, seed=0)
    with torch.no_grad():
        mu = model.encode(images.float() / 16)[0].double()
    # one full-covariance component: the maximum-likelihood Gaussian (biased covariance) of the means
    torch.testing.assert_close(mixture.means[0].double(), mu.mean(0), atol=1e-5, rtol=0)
    covariance = mixture.scale_tril[0].double() @ mixture.scale_tril[0].double().T
    torch.testing.assert_close(covariance, torch.cov(mu.T, correction=0), atol=1e-4, rtol=1e-3)
    with pytest.raises(families.train_data.DataError, match="--prior-components 61 exceeds the 60 training"):
        families.fit_latent_mixture(model, images, 17, components=61, seed=0)


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


def labelled_digits_like(count: int, seed: int, labels: list[int]) -> families.LabelledImageData:
    images = torch.randint(0, 17, (count, 1, 4, 4), generator=torch.Generator().manual_seed(seed))
    return families.LabelledImageData(images, 17, torch.tensor(labels), "test")


def test_class_conditional_pixelcnn_scores_the_exact_marginal_likelihood(tmp_path):
    """bits = -log2 sum_y p(y) p(x | y) / D, with p(y) the training labels' frequencies, against the per-class
    softmax log-probabilities summed by hand."""
    torch.manual_seed(0)
    model = PixelCNN(1, 6, 1, 12, (4, 4), num_classes=3).eval()
    with torch.no_grad():
        model.class_bias.weight.normal_(0.0, 1.0)
    train = labelled_digits_like(6, 1, [0, 0, 0, 1, 2, 2])  # p(y) = 1/2, 1/6, 1/3
    test = labelled_digits_like(5, 2, [1, 2, 0, 0, 1])
    run = families.RunSettings(None, True, tmp_path, torch.device("cpu"))
    found = families.FAMILIES["pixelcnn"].evaluate(model, train, test, {}, run, None)["test_bits_per_dim"]
    classes = families.pixel_classes(test.images, 17)
    with torch.no_grad():
        joint = []
        for label, prior in enumerate([1 / 2, 1 / 6, 1 / 3]):
            logits = model(classes, torch.full((5,), label))
            log_p = torch.log_softmax(logits.double(), 1).gather(1, classes[:, None]).flatten(1).sum(1)
            joint.append(log_p + math.log(prior))
    expected = -torch.logsumexp(torch.stack(joint), 0) / (16 * math.log(2))
    assert found == pytest.approx(float(expected.mean()), rel=1e-6)


def test_class_conditional_flow_scores_the_marginal_of_one_dequantization(tmp_path):
    torch.manual_seed(0)
    model = Glow((1, 4, 4), num_levels=1, depth=1, hidden_channels=4, num_classes=2).eval()
    with torch.no_grad():
        model.top_prior.mean.normal_(0.0, 1.0)
    train = labelled_digits_like(4, 1, [0, 1, 1, 1])  # p(y) = 1/4, 3/4
    test = labelled_digits_like(3, 2, [1, 0, 1])
    run = families.RunSettings(None, True, tmp_path, torch.device("cpu"))
    found = families.FAMILIES["glow"].evaluate(model, train, test, {}, run,
                                              torch.Generator().manual_seed(7))["test_bits_per_dim"]
    # the same uniform noise for every class: one dequantization per image
    y = (test.images.double() + torch.rand(test.images.shape, generator=torch.Generator().manual_seed(7),
                                            dtype=torch.float32).double()) / 17 - 0.5
    with torch.no_grad():
        joint = torch.stack([model.log_prob(y.float(), torch.full((3,), label)).double() + math.log(prior)
                             for label, prior in enumerate([1 / 4, 3 / 4])])
    # bits of the discrete images: each level is a cell of width 1/17, so log P(x) ~ log q(y) - 16 log 17
    expected = -(torch.logsumexp(joint, 0) - 16 * math.log(17)) / (16 * math.log(2))
    assert found == pytest.approx(float(expected.mean()), rel=1e-5)


def test_class_conditional_samples_take_the_training_labels_mix():
    train = labelled_digits_like(4, 1, [3, 3, 3, 5])
    labels = families.training_labels(train, 4000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert set(labels.tolist()) == {3, 5}
    assert float((labels == 3).double().mean()) == pytest.approx(0.75, abs=0.03)


def small_gpt_and_text(length=50, block_size=8):
    """A tiny GPT and a random held-out text of ``length`` ids with windows of ``block_size + 1``."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=5, block_size=block_size, n_layer=1, n_head=1, n_embd=16)).eval()
    ids = torch.randint(0, 5, (length,), generator=torch.Generator().manual_seed(1))
    return model, TextData(ids, "abcde", "test").with_window(block_size + 1)


@pytest.mark.parametrize("eval_windows", [1024, 3])
def test_gpt_scores_each_held_out_character_once_given_half_a_block_or_more(eval_windows, tmp_path):
    model, test = small_gpt_and_text()
    config = {"block_size": 8, "eval_windows": eval_windows}
    run = families.RunSettings(None, True, tmp_path, torch.device("cpu"))
    found = families.FAMILIES["gpt"].evaluate(model, None, test, config, run, None)["test_bits_per_char"]
    begin, end = families.FAMILIES["gpt"].scored_span(test, config)
    assert begin == 1 and end == (50 if eval_windows == 1024 else 1 + 8 + 2 * 4)
    # independently: character t is predicted from the 8 characters before it, or from all of them for t <= 8,
    # except that a window only starts every 4 characters: its context is t - (the last start before t - 4)
    bits = []
    with torch.no_grad():
        for t in range(begin, end):
            start = 0 if t <= 8 else min((t - 5) // 4 * 4, 50 - 9)
            logits = model(test.ids[None, start:t])[0][0, -1].double()
            bits.append(-float(torch.log_softmax(logits, -1)[test.ids[t]]) / math.log(2))
            assert t - start >= 5 or t <= 8
    assert found == pytest.approx(sum(bits) / len(bits), rel=1e-5)


def test_text_baselines_score_the_characters_the_model_scores(tmp_path, monkeypatch):
    model, test = small_gpt_and_text()
    train = TextData(torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(2)), "abcde",
                     "test").with_window(9)
    seen = {}

    def text_baselines(train_text, test_text, *, test_history, ngram_orders):
        seen.update(train=train_text, test=test_text, history=test_history)
        return {"lzma_given_train_bits_per_char": 1.0, "lzma_alone_bits_per_char": 3.0, "ngram_bits_per_char": 2.0}

    monkeypatch.setattr(evaluation.baselines, "text_baselines", text_baselines)
    config = {"block_size": 8, "eval_windows": 3}
    run = families.RunSettings(None, True, tmp_path, torch.device("cpu"))
    result = evaluation.evaluate(families.FAMILIES["gpt"], model, train, test, config, run, None,
                                 {"test_bits_per_char": 1.5})
    assert {name: entry["model_better"] for name, entry in result["comparisons"].items()} == {
        "test_bits_per_char vs lzma_given_train_bits_per_char": False,
        "test_bits_per_char vs lzma_alone_bits_per_char": True,
        "test_bits_per_char vs ngram_bits_per_char": True}
    begin, end = families.FAMILIES["gpt"].scored_span(test, config)
    assert seen["train"] == train.decode(train.ids.tolist())
    assert seen["history"] == test.decode(test.ids[:begin].tolist())
    assert seen["test"] == test.decode(test.ids[begin:end].tolist()) and len(seen["test"]) == end - begin == 16
