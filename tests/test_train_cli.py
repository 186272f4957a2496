"""The training command end to end: every family's quick run, resuming, and every refused option."""
import json
import math
import wave

import numpy as np
import pytest
import torch

from genkernels.models.train import checkpoint, cli

# Tiny models so that each run takes about a second in eager mode (the kernels' interpreter is far slower).
TINY = {
    "vae": ["--latent-dim", "4", "--width", "8", "--depth", "1"],
    "dcgan": ["--latent-dim", "8", "--base-channels", "8"],
    "pixelcnn": ["--hidden-channels", "6", "--num-blocks", "1", "--output-channels", "12"],
    "realnvp": ["--hidden-channels", "8"],
    "glow": ["--depth", "1", "--hidden-channels", "8"],
    "ddpm": ["--base-channels", "8", "--sample-steps", "2"],
    "gpt": ["--block-size", "16", "--n-embd", "32", "--n-head", "2", "--n-layer", "1", "--sample-chars", "20",
            "--eval-windows", "4"],
    "wavenet": ["--residual-channels", "8", "--skip-channels", "8", "--layers-per-stack", "3",
                "--segment-length", "64", "--sample-seconds", "0.005"],
}
METRIC = {"vae": "test_bits_per_dim", "dcgan": "test_discriminator_loss", "pixelcnn": "test_bits_per_dim",
          "realnvp": "test_bits_per_dim", "glow": "test_bits_per_dim", "ddpm": "test_denoising_mse",
          "gpt": "test_bits_per_char", "wavenet": "test_bits_per_sample"}
SAMPLE_FILES = {"gpt": ["samples.txt"], "wavenet": [f"sample_{i}.wav" for i in range(4)] + ["spectrogram.png"],
                "vae": ["samples.png", "interpolations.png", "reconstructions.png"],
                "dcgan": ["samples.png", "truncation.png"], "pixelcnn": ["samples.png", "completions.png"],
                "realnvp": ["samples.png", "temperatures.png"], "glow": ["samples.png", "temperatures.png"],
                "ddpm": ["samples.png", "guidance.png", "inpainting.png", "image_to_image.png"]}
# the baselines each family's metrics.json compares with (lower is better for all)
COMPARED = {
    "vae": ["test_bits_per_dim vs kde_bits_per_dim", "test_bits_per_dim vs gmm_bits_per_dim"],
    "dcgan": [], "ddpm": [],
    "gpt": ["test_bits_per_char vs lzma_given_train_bits_per_char", "test_bits_per_char vs lzma_alone_bits_per_char",
            "test_bits_per_char vs ngram_bits_per_char"],
    "wavenet": ["test_bits_per_sample vs mu_law_unigram_bits_per_sample",
                "test_bits_per_sample vs lpc_bits_per_sample"],
}
COMPARED.update({model: COMPARED["vae"] for model in ("pixelcnn", "realnvp", "glow")})
IMAGE_MODELS = ["vae", "dcgan", "pixelcnn", "realnvp", "glow", "ddpm"]


@pytest.fixture(autouse=True, scope="module")
def baseline_cache(tmp_path_factory):
    """Fitted baselines go to one folder for this module's runs (fitted once, then read), not the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GENKERNELS_CACHE_DIR", str(tmp_path_factory.mktemp("baseline_cache")))
        yield


def run(model, out, *options):
    return cli.main([model, "--quick", "--impl", "eager", "--out", str(out), "--log-every", "1", *TINY[model],
                     *options])


def log_records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def saved_state(out):
    return torch.load(out / checkpoint.FILE_NAME, weights_only=False)


@pytest.mark.parametrize("model", list(TINY))
def test_quick_run_writes_its_files_and_resumes_to_the_same_losses(model, tmp_path):
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    assert run(model, stopped, "--steps", "1") == 0
    for name in ["log.jsonl", "loss.png", "metrics.json", checkpoint.FILE_NAME] + SAMPLE_FILES.get(
            model, ["samples.png"]):
        assert (stopped / name).stat().st_size > 0, name
    metrics = json.loads((stopped / "metrics.json").read_text())
    assert metrics["model"] == model and math.isfinite(metrics[METRIC[model]])
    check_evaluation(model, metrics)
    first = log_records(stopped)
    assert [r["step"] for r in first] == [1]
    assert {"step", "loss", "items_per_s", "lr", "time"} <= set(first[0]) and math.isfinite(first[0]["loss"])

    assert run(model, stopped, "--steps", "2", "--resume") == 0
    assert run(model, straight, "--steps", "2") == 0
    resumed, reference = log_records(stopped), log_records(straight)
    assert [r["step"] for r in resumed] == [1, 2]
    for name in [key for key in reference[1] if key.endswith("loss")]:
        assert resumed[1][name] == reference[1][name], name
    resumed_state, reference_state = saved_state(stopped), saved_state(straight)
    for key, value in reference_state["model"].items():
        assert torch.equal(resumed_state["model"][key], value), key
    if reference_state["ema"] is not None:
        for key, value in reference_state["ema"].items():
            assert torch.equal(resumed_state["ema"][key], value), key


def finite_numbers(tree):
    """Every number inside a JSON tree."""
    if isinstance(tree, dict):
        return [number for value in tree.values() for number in finite_numbers(value)]
    if isinstance(tree, list):
        return [number for value in tree for number in finite_numbers(value)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def check_evaluation(model, metrics):
    """metrics.json of a quick run: the baselines, the comparisons with them, sample quality for images."""
    assert metrics["evaluation_settings"]["quick"] is True
    assert all(math.isfinite(number) for number in finite_numbers(metrics))
    comparisons = metrics["comparisons"]
    variants = [""] + ([" (standard_normal_prior)"] if model == "vae" else [])
    expected = COMPARED[model] + ([f"frechet_distance{variant} vs {name}_samples" for variant in variants
                                   for name in ("kde", "gmm")] if model in IMAGE_MODELS else [])
    assert sorted(comparisons) == sorted(expected)
    for name, comparison in comparisons.items():
        figure, baseline = name.split(" vs ")
        found = metrics["baselines"][baseline]
        assert comparison["baseline"] == (found["frechet_distance"] if isinstance(found, dict) else found), name
        if not figure.startswith("frechet_distance"):
            assert comparison["model"] == metrics[figure], name
        assert comparison["model_better"] == (comparison["model"] < comparison["baseline"])
    if model in IMAGE_MODELS:
        quality = metrics["sample_quality"]
        assert quality["num_samples"] == 32 and 0 <= quality["class_coverage"] <= 1
        assert comparisons["frechet_distance vs kde_samples"]["model"] == quality["frechet_distance"]
        assert 0.5 < metrics["classifier_test_accuracy"] <= 1
    else:
        assert "sample_quality" not in metrics
    if model == "vae":
        assert metrics["iwae_samples"] == 8 and math.isfinite(metrics["test_iwae_bits_per_dim"])
        standard = metrics["sample_quality_standard_normal_prior"]
        assert standard["num_samples"] == 32
        assert comparisons["frechet_distance (standard_normal_prior) vs kde_samples"]["model"] == \
            standard["frechet_distance"]


def test_resume_reproduces_several_steps_with_random_noise(tmp_path):
    """The VAE draws posterior and dequantization noise every step: k steps + resume == N steps straight."""
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    options = ["--checkpoint-every", "2", "--batch-size", "8"]
    assert run("vae", stopped, "--steps", "2", *options) == 0
    assert run("vae", stopped, "--steps", "5", "--resume", *options) == 0
    assert run("vae", straight, "--steps", "5", *options) == 0
    assert [r["loss"] for r in log_records(stopped)] == [r["loss"] for r in log_records(straight)]
    for key, value in saved_state(straight)["model"].items():
        assert torch.equal(saved_state(stopped)["model"][key], value), key


def write_user_data(model, folder):
    """A small data set of the kind ``--data`` takes for ``model``: RGB PNGs, 8 kHz WAVs or a text file."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir()
    if model == "gpt":
        (folder / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
        return folder / "corpus.txt"
    if model == "wavenet":
        for i in range(3):
            with wave.open(str(folder / f"{i}.wav"), "wb") as writer:
                writer.setnchannels(1)
                writer.setsampwidth(2)
                writer.setframerate(8000)
                writer.writeframes(rng.integers(-3000, 3000, 300).astype("<i2").tobytes())
        return folder
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


@pytest.mark.parametrize("model", ["pixelcnn", "gpt", "wavenet"])
def test_training_on_user_data(model, tmp_path):
    data_path = write_user_data(model, tmp_path / "data")
    out = tmp_path / "out"
    assert run(model, out, "--steps", "1", "--batch-size", "4", "--data", str(data_path)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] == str(data_path) and math.isfinite(metrics[METRIC[model]])
    state = saved_state(out)
    if model == "pixelcnn":  # RGB files: a 3-channel model over 256 levels
        assert state["config"]["data"]["shape"] == [3, 8, 8] and state["config"]["data"]["levels"] == 256
    if model == "wavenet":  # 3 files x 4 whole segments of 64 samples, 90% of them for training
        assert state["config"]["data"]["items"] == 11


@pytest.mark.parametrize("model, class_tables", [("pixelcnn", "class_bias.weight"), ("glow", "top_prior.mean")])
def test_conditioning_option_chooses_p_x_given_y_or_p_x(model, class_tables, tmp_path):
    """The digits have labels: by default the model is class-conditional (a table per class, 10 classes);
    --conditioning none trains the unconditional model."""
    assert run(model, tmp_path / "class", "--steps", "1") == 0
    assert run(model, tmp_path / "none", "--steps", "1", "--conditioning", "none") == 0
    conditional, unconditional = (saved_state(tmp_path / name)["model"] for name in ("class", "none"))
    assert conditional[class_tables].shape[0] == 10
    if model == "pixelcnn":
        assert not any("class_bias" in key for key in unconditional)
    else:
        assert unconditional[class_tables].shape == conditional[class_tables].shape[1:]
    for name in ("class", "none"):
        assert math.isfinite(json.loads((tmp_path / name / "metrics.json").read_text())["test_bits_per_dim"])


def test_unknown_model_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["transformer"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "transformer" in message and all(name in message for name in TINY)


def test_help_lists_the_family_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["glow", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--num-levels" in text and "--depth" in text and "default 12000; --quick 20" in text


def expect_error(capsys, argv, pattern):
    assert cli.main(argv) == 2
    message = capsys.readouterr().err
    assert pattern in message, message


def test_amp_on_a_cpu_is_an_error(capsys, tmp_path):
    expect_error(capsys, ["gpt", "--amp", "--device", "cpu", "--out", str(tmp_path)],
                 "--amp (bf16 autocast) needs a CUDA device; this run is on cpu")


@pytest.mark.parametrize("model", ["dcgan", "ddpm"])
def test_fsdp_is_refused_where_the_model_does_not_allow_it(model, capsys, tmp_path):
    expect_error(capsys, [model, "--fsdp", "--out", str(tmp_path)], f"--fsdp: {model}")


def test_batch_size_larger_than_the_data(capsys, tmp_path):
    expect_error(capsys, ["vae", "--batch-size", "5000", "--out", str(tmp_path)],
                 "--batch-size 5000 is larger than the training data (1617 items)")


def test_bad_numbers_are_refused(capsys, tmp_path):
    expect_error(capsys, ["vae", "--steps", "0", "--out", str(tmp_path)], "--steps 0 must be >= 1")
    expect_error(capsys, ["vae", "--lr", "-1", "--out", str(tmp_path)], "--lr -1.0 must be > 0")


def test_negative_warmup_is_refused(capsys, tmp_path):
    expect_error(capsys, ["gpt", "--warmup-steps", "-1", "--out", str(tmp_path)], "--warmup-steps -1 must be >= 0")


def test_learning_rate_schedules():
    lr = 0.5
    assert [cli.learning_rate(step, 10, lr, "constant", 0) for step in range(10)] == [lr] * 10
    assert [cli.learning_rate(step, 10, lr, "constant", 4) for step in range(6)] == [0.125, 0.25, 0.375, lr, lr, lr]
    cosine = [cli.learning_rate(step, 12, lr, "cosine", 2) for step in range(12)]
    assert cosine[:4] == [0.25, lr, lr, lr * (0.1 + 0.9 * (1 + math.cos(math.pi / 10)) / 2)]
    assert cosine[7] == pytest.approx(lr * 0.55)  # half way through the decay
    assert all(later < earlier for earlier, later in zip(cosine[2:], cosine[3:])) and cosine[-1] > 0.1 * lr


def test_log_records_the_scheduled_learning_rate(tmp_path):
    assert run("gpt", tmp_path, "--steps", "5", "--lr", "0.01", "--warmup-steps", "2", "--lr-schedule", "cosine") == 0
    assert [record["lr"] for record in log_records(tmp_path)] == [
        cli.learning_rate(step, 5, 0.01, "cosine", 2) for step in range(5)]


def test_resume_follows_the_learning_rate_schedule(tmp_path):
    """The warmup and the cosine decay are functions of the step: 2 steps (inside the warmup) + resume to 6
    reproduce 6 steps straight."""
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    options = ["--warmup-steps", "3", "--lr-schedule", "cosine", "--lr", "0.01"]
    assert run("gpt", stopped, "--steps", "2", *options) == 0
    assert run("gpt", stopped, "--steps", "6", "--resume", *options) == 0
    assert run("gpt", straight, "--steps", "6", *options) == 0
    resumed, reference = log_records(stopped), log_records(straight)
    assert [(r["step"], r["loss"], r["lr"]) for r in resumed] == [(r["step"], r["loss"], r["lr"]) for r in reference]
    for key, value in saved_state(straight)["model"].items():
        assert torch.equal(saved_state(stopped)["model"][key], value), key


def test_vae_deeper_than_the_images_allow(capsys, tmp_path):
    expect_error(capsys, ["vae", "--depth", "4", "--out", str(tmp_path)],
                 "vae --depth 4 halves the side 8 too often (it must be divisible by 2**depth)")


def test_text_file_with_zero_characters(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    expect_error(capsys, ["gpt", "--data", str(tmp_path / "empty.txt"), "--out", str(tmp_path)],
                 "empty.txt holds zero characters")


def test_resume_refuses_another_model_or_config(capsys, tmp_path):
    gpt_out, vae_out = tmp_path / "gpt", tmp_path / "vae"
    assert run("gpt", gpt_out, "--steps", "1") == 0
    assert run("vae", vae_out, "--steps", "1") == 0
    checkpoint_file = gpt_out / checkpoint.FILE_NAME
    expect_error(capsys, ["gpt", "--quick", "--impl", "eager", "--out", str(gpt_out), "--resume", "--steps", "2",
                          *TINY["gpt"], "--n-layer", "2"],
                 f"{checkpoint_file} was written by a run with another configuration (model: checkpoint")
    (vae_out / checkpoint.FILE_NAME).replace(checkpoint_file)
    expect_error(capsys, ["gpt", "--quick", "--out", str(gpt_out), "--resume", "--steps", "2", *TINY["gpt"]],
                 f"{checkpoint_file} is a checkpoint of model 'vae'")
    expect_error(capsys, ["gpt", "--out", str(tmp_path / "none"), "--resume"], "there is no checkpoint")
    checkpoint_file.write_bytes(b"not a checkpoint")
    expect_error(capsys, ["gpt", "--quick", "--out", str(gpt_out), "--resume", "--steps", "2", *TINY["gpt"]],
                 f"{checkpoint_file} cannot be read as a checkpoint")


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / checkpoint.FILE_NAME
    checkpoint.save(path, {"step": 1})

    def broken_save(obj, file):
        with open(file, "wb") as partial:
            partial.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, {"step": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.FILE_NAME]  # no temporary file left behind
