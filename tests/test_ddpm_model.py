"""DDPM (models/ddpm.py): the training loss against the forward process and MSE written out here, label dropout,
the sampling loops against hand-written scheduler loops (DDIM, DDPM, guidance), image-to-image, inpainting,
reproducibility, a short convergence run under both impls, bad input, and CUDA-graph sampling on the GPU."""
import copy

import diffusers
import pytest
import torch
from torch import nn

from genkernels.kernels import NoiseSchedule, ddim_step, use_impl
from genkernels.models.ddpm import DDPM, NetworkInfo
from genkernels.models.schedulers import DDIMScheduler, DDPMScheduler
from genkernels.models.unet import UNet
from reference_checks import random_tensor, tiny_unet2d

# One level (8x8) with the middle attention over 64 positions; one GroupNorm group, as the interpreted GroupNorm
# kernels dominate the cost of every U-Net call here (tests/test_unet_model.py covers the U-Net's numerics).
TINY = dict(in_channels=3, base_channels=16, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(),
            dropout=0.0, num_groups=1, num_head_channels=16, image_size=8)
NUM_TRAIN = 40
SCHEDULE = NoiseSchedule.linear(NUM_TRAIN, beta_start=1e-3, beta_end=0.2)


def tiny_ddpm(seed: int = 0, num_classes=None, perturb: float = 0.2, **kwargs) -> DDPM:
    """A tiny DDPM; its U-Net's zero-initialized layers are perturbed so that its output depends on every input."""
    torch.manual_seed(seed)
    unet = UNet(**TINY, num_classes=num_classes)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(perturb * torch.randn(parameter.shape, generator=generator))
    return DDPM(unet, SCHEDULE, **kwargs)


def images(batch=2, seed=1):
    return random_tensor((batch, 3, 8, 8), torch.float32, seed=seed).clamp(-1, 1)


def hand_written_loss(model: DDPM, x0, noise, t, labels=None):
    """``mean((unet(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t) - eps)^2)`` under the eager impl, schedule in float64."""
    alpha = SCHEDULE.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = (alpha.sqrt() * x0.double() + (1 - alpha).sqrt() * noise.double()).float()
    with use_impl("eager"):
        out = model.unet(x_t, t, labels)
    return (out - noise).square().mean()


def count_unet_calls(model: DDPM) -> list:
    calls = []
    model.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls


# --------------------------------------------------------------------------------------------------------------
# training loss


@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_loss_with_given_noise_and_timesteps_is_the_written_out_objective(impl):
    model = tiny_ddpm(num_classes=3, class_dropout_prob=0.0)
    x0, noise, t = images(), random_tensor((2, 3, 8, 8), torch.float32, seed=2), torch.tensor([3, 31])
    labels = torch.tensor([1, 2])
    expected = hand_written_loss(model, x0, noise, t, labels)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    with use_impl(impl):
        loss = model.loss(x0, labels, noise=noise, timesteps=t)
        grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for (name, _), grad, expected_grad in zip(model.named_parameters(), grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-3, atol=1e-5, msg=name)


def test_loss_draws_its_noise_from_one_seed_the_same_way_under_both_impls():
    model = tiny_ddpm(class_dropout_prob=0.0)
    x0 = images()
    losses = {}
    for impl in ("eager", "triton"):
        with use_impl(impl):
            losses[impl] = model.loss(x0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(losses["triton"], losses["eager"], rtol=1e-5, atol=1e-6)
    with use_impl("eager"):
        again = model.loss(x0, generator=torch.Generator().manual_seed(5))
        other = model.loss(x0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(again, losses["eager"]) and not torch.equal(other, again)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_loss_targets_x0_or_v(prediction_type):
    model = tiny_ddpm(prediction_type=prediction_type)
    x0, noise, t = images(), random_tensor((2, 3, 8, 8), torch.float32, seed=3), torch.tensor([0, 39])
    alpha = SCHEDULE.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    target = x0.double() if prediction_type == "sample" else alpha.sqrt() * noise - (1 - alpha).sqrt() * x0
    x_t = (alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise).float()
    with use_impl("eager"):
        expected = (model.unet(x_t, t).double() - target).square().mean()
        loss = model.loss(x0, noise=noise, timesteps=t)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_loss_reductions():
    model = tiny_ddpm()
    x0, noise, t = images(), random_tensor((2, 3, 8, 8), torch.float32, seed=4), torch.tensor([7, 8])
    with use_impl("eager"):
        elementwise = model.loss(x0, noise=noise, timesteps=t, reduction="none")
        per_sample = model.loss(x0, noise=noise, timesteps=t, reduction="per_sample")
        total = model.loss(x0, noise=noise, timesteps=t, reduction="sum")
        mean = model.loss(x0, noise=noise, timesteps=t)
    assert elementwise.shape == x0.shape and per_sample.shape == (2,)
    torch.testing.assert_close(per_sample, elementwise.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(total, elementwise.sum())
    torch.testing.assert_close(mean, elementwise.mean())
    with use_impl("eager"):
        torch.testing.assert_close(model(x0, noise=noise, timesteps=t), mean, rtol=0, atol=0)  # forward is the loss


def test_label_dropout_replaces_labels_by_the_null_class_in_training_only():
    x0, noise, t = images(), random_tensor((2, 3, 8, 8), torch.float32, seed=5), torch.tensor([9, 20])
    labels = torch.tensor([0, 1])
    always = tiny_ddpm(num_classes=2, class_dropout_prob=1.0)
    with use_impl("eager"):
        dropped = always.loss(x0, labels, noise=noise, timesteps=t)
        torch.testing.assert_close(dropped, always.loss(x0, torch.tensor([2, 2]), noise=noise, timesteps=t))
        always.eval()
        kept = always.loss(x0, labels, noise=noise, timesteps=t)
    torch.testing.assert_close(kept, hand_written_loss(always, x0, noise, t, labels))
    assert not torch.allclose(kept, dropped)
    # With p = 0.5 about half of many labels are dropped.
    half = tiny_ddpm(num_classes=2, class_dropout_prob=0.5)
    seen = []
    half.unet.register_forward_hook(lambda module, args, out: seen.append(args[2]))
    with use_impl("eager"):
        half.loss(torch.zeros(400, 3, 8, 8), torch.zeros(400, dtype=torch.long), timesteps=torch.zeros(400).long(),
                  noise=torch.zeros(400, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    assert 150 < seen[0].eq(2).sum().item() < 250 and torch.isin(seen[0], torch.tensor([0, 2])).all()


def test_short_training_run_lowers_the_loss_identically_under_both_impls():
    """Adam on two fixed images, cycling over three fixed (timesteps, noise) draws, under both impls."""
    data = torch.linspace(-1, 1, 8).expand(2, 3, 8, 8) * torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1)
    generator = torch.Generator().manual_seed(0)
    draws = [(torch.randint(0, NUM_TRAIN, (2,), generator=generator), torch.randn(2, 3, 8, 8, generator=generator))
             for _ in range(3)]
    curves = {}
    for impl in ("eager", "triton"):
        model = tiny_ddpm(seed=3, perturb=0.0)
        optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
        curve = []
        with use_impl(impl):
            for step in range(12):
                t, noise = draws[step % 3]
                loss = model.loss(data, noise=noise, timesteps=t)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                curve.append(loss.item())
        curves[impl] = torch.tensor(curve)
    eager, triton = curves["eager"], curves["triton"]
    assert eager[:3].mean() > 0.8  # a fresh network predicts zero noise: loss E[eps^2] = 1
    assert triton[-3:].mean() < 0.7 * triton[:3].mean()
    torch.testing.assert_close(triton, eager, rtol=2e-3, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# sampling


@pytest.mark.parametrize("prediction_type, spacing", [("epsilon", "leading"), ("v_prediction", "trailing"),
                                                      ("epsilon", "linspace")])
def test_ddim_with_eta_zero_is_deterministic_and_is_the_scheduler_loop(prediction_type, spacing):
    model = tiny_ddpm(prediction_type=prediction_type)
    noise = random_tensor((2, 3, 8, 8), torch.float32, seed=6)
    options = dict(sampler="ddim", noise=noise, timestep_spacing=spacing, progress=False)
    with use_impl("eager"):
        torch.manual_seed(1)
        first = model.sample(2, 5, **options)
        torch.manual_seed(2)
        second = model.sample(2, 5, **options)
        scheduler = DDIMScheduler(SCHEDULE, prediction_type=prediction_type, timestep_spacing=spacing)
        scheduler.set_timesteps(5)
        x = noise.clone()
        for t in scheduler.timesteps:
            x = scheduler.step(model.unet(x, t), t, x).prev_sample
    assert torch.equal(first, second)
    torch.testing.assert_close(first, x, rtol=0, atol=0)
    assert (first - noise).abs().max() > 0.1


def test_ddpm_sampling_is_reproducible_with_a_seeded_generator_and_matches_the_scheduler_loop():
    model = tiny_ddpm()
    runs = []
    with use_impl("eager"):
        for seed in (7, 7, 8):
            runs.append(model.sample(2, 4, generator=torch.Generator().manual_seed(seed), progress=False))
        generator = torch.Generator().manual_seed(7)
        x = torch.randn(2, 3, 8, 8, generator=generator)
        scheduler = DDPMScheduler(SCHEDULE)
        scheduler.set_timesteps(4)
        for t in scheduler.timesteps:
            x = scheduler.step(model.unet(x, t), t, x, generator=generator).prev_sample
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    torch.testing.assert_close(runs[0], x, rtol=0, atol=0)


def test_trailing_ddpm_sampling_walks_diffusers_steps_and_gives_its_samples():
    """7 trailing steps of 40 (7 does not divide 40): every step lands on the next listed timestep, as in
    diffusers' DDPMScheduler (it used to step by 40 // 7 = 5, off the list, and end at 0 instead of -1)."""
    model = tiny_ddpm()
    theirs = diffusers.DDPMScheduler(num_train_timesteps=NUM_TRAIN, beta_start=1e-3, beta_end=0.2,
                                     timestep_spacing="trailing", clip_sample=True)
    theirs.set_timesteps(7)
    expected = [(t, int(theirs.previous_timestep(t))) for t in theirs.timesteps.tolist()]
    assert model._steps("ddpm", 7, "trailing", True, 1.0, None) == expected
    with use_impl("eager"):  # noise drawn with torch.randn from the generator, as diffusers draws it
        ours = model.sample(2, 7, timestep_spacing="trailing", generator=torch.Generator().manual_seed(7),
                            progress=False)
        generator = torch.Generator().manual_seed(7)
        x = torch.randn(2, 3, 8, 8, generator=generator)
        for t in theirs.timesteps:
            x = theirs.step(model.unet(x, t), t, x, generator=generator).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-5)


def test_sampling_under_triton_follows_eager_for_ddim():
    model = tiny_ddpm(num_classes=3)
    noise = random_tensor((2, 3, 8, 8), torch.float32, seed=8)
    samples = {}
    for impl in ("eager", "triton"):
        with use_impl(impl):
            samples[impl] = model.sample(2, 3, sampler="ddim", guidance_scale=2.0, class_labels=torch.tensor([0, 2]),
                                         noise=noise, progress=False)
    torch.testing.assert_close(samples["triton"], samples["eager"], rtol=1e-4, atol=1e-5)


def test_guidance_scale_one_is_plain_conditional_sampling_and_other_scales_combine_both_predictions():
    model = tiny_ddpm(num_classes=3)
    calls = count_unet_calls(model)
    noise, labels = random_tensor((2, 3, 8, 8), torch.float32, seed=9), torch.tensor([0, 1])
    with use_impl("eager"):
        plain = model.sample(2, 3, sampler="ddim", class_labels=labels, noise=noise, progress=False)
        assert calls == [2, 2, 2]
        guided = model.sample(2, 3, sampler="ddim", guidance_scale=3.0, class_labels=labels, noise=noise,
                              progress=False)
        assert calls[3:] == [4, 4, 4]  # conditional and null-class halves in one batch
        scheduler = DDIMScheduler(SCHEDULE)
        scheduler.set_timesteps(3)
        x_plain, x_guided = noise.clone(), noise.clone()
        for t in scheduler.timesteps.tolist():
            prev = scheduler.previous_timestep(t)
            x_plain = ddim_step(model.unet(x_plain, t, labels), t, x_plain, SCHEDULE, prev_timestep=prev,
                                clip_sample=True)
            cond = model.unet(x_guided, t, labels)
            uncond = model.unet(x_guided, t, torch.tensor([3, 3]))
            x_guided = ddim_step(uncond + 3.0 * (cond - uncond), t, x_guided, SCHEDULE, prev_timestep=prev,
                                 clip_sample=True)
    torch.testing.assert_close(plain, x_plain, rtol=0, atol=0)
    torch.testing.assert_close(guided, x_guided, rtol=1e-4, atol=1e-4)  # guidance amplifies rounding
    assert (guided - plain).abs().max() > 1e-2


def test_img2img_with_strength_zero_returns_the_input_and_runs_the_last_steps_otherwise():
    model = tiny_ddpm()
    calls = count_unet_calls(model)
    init = images(seed=10)
    with use_impl("eager"):
        same = model.sample(2, 4, init=init, strength=0.0, progress=False)
        assert torch.equal(same, init) and same is not init and calls == []
        noise = random_tensor((2, 3, 8, 8), torch.float32, seed=11)
        half = model.sample(2, 4, sampler="ddim", init=init, strength=0.5, noise=noise, progress=False)
        assert len(calls) == 2
        scheduler = DDIMScheduler(SCHEDULE)
        scheduler.set_timesteps(4)
        first = int(scheduler.timesteps[2])
        alpha = SCHEDULE.alphas_cumprod[first]
        x = (alpha.sqrt() * init.double() + (1 - alpha).sqrt() * noise.double()).float()
        for t in scheduler.timesteps[2:]:
            x = scheduler.step(model.unet(x, t), t, x).prev_sample
    torch.testing.assert_close(half, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl, mask_channels", [("eager", 1), ("eager", 3), ("triton", 1)])
def test_inpainting_keeps_the_known_region_exactly(impl, mask_channels):
    model = tiny_ddpm()
    init = images(seed=12)
    mask = torch.zeros(2, mask_channels, 8, 8)
    mask[:, :, 2:6, 1:5] = 1
    with use_impl(impl):
        out = model.sample(2, 3 if impl == "triton" else 5, init=init, mask=mask,
                           generator=torch.Generator().manual_seed(0), progress=False)
    known = mask.expand_as(init) == 0
    assert torch.equal(out[known], init[known])
    assert (out[~known] - init[~known]).abs().max() > 0.1


def test_inpainting_replaces_the_known_region_by_the_forward_process_at_every_step():
    """The U-Net's inputs in the known region are ``q_sample(init, t)``: they depend on ``init``, the timestep and
    the generator only, not on the network's predictions."""
    init, mask = images(seed=13), torch.zeros(2, 1, 8, 8)
    mask[:, :, :4] = 1
    noise = random_tensor((2, 3, 8, 8), torch.float32, seed=14)
    inputs = {}
    for seed in (0, 1):
        model = tiny_ddpm(seed=seed)
        inputs[seed] = []
        model.unet.register_forward_hook(lambda module, args, out, seen=inputs[seed]: seen.append(args[0].clone()))
        with use_impl("eager"):
            model.sample(2, 4, sampler="ddim", init=init, mask=mask, noise=noise,
                         generator=torch.Generator().manual_seed(5), progress=False)
    scheduler = DDIMScheduler(SCHEDULE)
    scheduler.set_timesteps(4)
    alpha = SCHEDULE.alphas_cumprod[int(scheduler.timesteps[0])]
    expected_start = alpha.sqrt() * init.double() + (1 - alpha).sqrt() * noise.double()
    torch.testing.assert_close(inputs[0][0].double(), expected_start)
    for step, (first, second, t) in enumerate(zip(inputs[0], inputs[1], scheduler.timesteps)):
        assert torch.equal(first[:, :, 4:], second[:, :, 4:])
        if step > 0:
            assert (first[:, :, :4] - second[:, :, :4]).abs().max() > 1e-3
            # known rows: sqrt(a_t) init + sqrt(1 - a_t) z with fresh z ~ N(0, 1)
            alpha = SCHEDULE.alphas_cumprod[int(t)]
            z = (first[:, :, 4:].double() - alpha.sqrt() * init[:, :, 4:]) / (1 - alpha).sqrt()
            assert z.abs().max() < 5 and 0.7 < z.std() < 1.3


def test_sampling_restores_training_mode_and_shows_a_progress_bar(capsys):
    model = tiny_ddpm(num_classes=2)
    model.train()
    with use_impl("eager"):
        out = model.sample(1, 2, class_labels=1, generator=torch.Generator().manual_seed(0))
    assert model.training and model.unet.training
    assert out.shape == (1, 3, 8, 8) and out.dtype == torch.float32
    assert out.abs().max() <= 1  # the last DDPM step returns the clipped x0 prediction
    assert "2/2" in capsys.readouterr().err


def test_sampling_defaults_walk_every_training_step_for_ddpm_and_50_for_ddim():
    model = tiny_ddpm()
    calls = count_unet_calls(model)
    with use_impl("eager"):
        model.sample(1, progress=False)
        assert len(calls) == NUM_TRAIN
        model.sample(1, sampler="ddim", progress=False)
    assert len(calls) == 2 * NUM_TRAIN  # min(50, T) steps


def test_sampling_under_autocast_keeps_the_sample_in_the_weights_dtype():
    model = tiny_ddpm(num_classes=2)
    noise = random_tensor((2, 3, 8, 8), torch.float32, seed=15)
    with use_impl("eager"):
        expected = model.sample(2, 2, sampler="ddim", guidance_scale=2.0, class_labels=1, noise=noise,
                                progress=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.sample(2, 2, sampler="ddim", guidance_scale=2.0, class_labels=1, noise=noise,
                               progress=False)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0.1, atol=0.1)


def test_loss_compiles_as_one_graph_with_the_fused_ops():
    model = tiny_ddpm(num_classes=2, class_dropout_prob=0.0)
    x0, noise, t = images(), random_tensor((2, 3, 8, 8), torch.float32, seed=16), torch.tensor([4, 30])
    labels = torch.tensor([0, 1])
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(lambda x0, labels, noise, t: compiled_model.loss(x0, labels, noise=noise, timesteps=t),
                             backend="aot_eager", fullgraph=True)
    with use_impl("triton"):
        loss = compiled(x0, labels, noise, t)
        expected = model.loss(x0, labels, noise=noise, timesteps=t)
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss, list(compiled_model.parameters()))
    for grad, expected_grad in zip(grads, torch.autograd.grad(expected, list(model.parameters()))):
        torch.testing.assert_close(grad, expected_grad)


# --------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("kwargs, error, argument", [
    (dict(n=0), ValueError, "n=0"),
    (dict(n=1.0), TypeError, "n must be an int"),
    (dict(sampler="euler"), ValueError, "sampler='euler'"),
    (dict(num_steps=0), ValueError, "num_steps=0"),
    (dict(num_steps=NUM_TRAIN + 1), ValueError, f"num_steps={NUM_TRAIN + 1}"),
    (dict(eta=0.5), ValueError, "eta=0.5 applies to the 'ddim' sampler only"),
    (dict(sampler="ddim", eta=1.5), ValueError, "eta"),
    (dict(guidance_scale=2.0), ValueError, "guidance_scale=2.0 needs a class-conditional U-Net"),
    (dict(guidance_scale=-1.0), ValueError, "guidance_scale"),
    (dict(class_labels=torch.tensor([0, 1])), ValueError, "class_labels were given"),
    (dict(strength=0.5), ValueError, "strength and mask need an init image"),
    (dict(init=torch.zeros(3, 3, 8, 8)), ValueError, "init must hold n=2 images"),
    (dict(init=torch.zeros(2, 1, 8, 8)), ValueError, r"init must be \[batch, 3, H, W\]"),
    (dict(init=torch.zeros(2, 3, 8, 8), strength=1.5), ValueError, "strength"),
    (dict(init=torch.zeros(2, 3, 8, 8), mask=torch.zeros(2, 2, 8, 8)), ValueError, "mask must have shape"),
    (dict(init=torch.zeros(2, 3, 8, 8), mask=torch.full((2, 1, 8, 8), 2.0)), ValueError, r"mask must lie in \[0, 1\]"),
    (dict(init=torch.zeros(2, 3, 8, 8), mask=torch.full((2, 1, 8, 8), float("nan"))), ValueError, "mask must lie"),
    (dict(init=torch.zeros(2, 3, 8, 8), mask=torch.zeros(2, 1, 8, 8, dtype=torch.int64)), TypeError, "mask"),
    (dict(noise=torch.zeros(2, 3, 4, 4)), ValueError, "noise must have shape"),
    (dict(cuda_graph=True), ValueError, "cuda_graph=True needs the model on a CUDA device"),
    (dict(cuda_graph=1), TypeError, "cuda_graph"),
    (dict(timestep_spacing="uniform"), ValueError, "timestep_spacing='uniform'"),
    (dict(generator="seed"), TypeError, "generator"),
])
def test_sample_rejects_bad_arguments(kwargs, error, argument):
    kwargs = {"n": 2, "progress": False, **kwargs}
    with pytest.raises(error, match=argument):
        tiny_ddpm().sample(**kwargs)


@pytest.mark.parametrize("kwargs, error, argument", [
    (dict(guidance_scale=2.0), ValueError, "guidance_scale=2.0 needs class_labels"),
    (dict(class_labels=torch.tensor([0, 4])), ValueError, "class_labels must lie"),
    (dict(class_labels=5), ValueError, "class_labels=5"),
    (dict(class_labels=torch.tensor([0])), ValueError, "class_labels must have shape"),
])
def test_sample_rejects_bad_class_arguments(kwargs, error, argument):
    with pytest.raises(error, match=argument):
        tiny_ddpm(num_classes=3).sample(2, progress=False, **kwargs)


@pytest.mark.parametrize("kwargs, error, argument", [
    (dict(x0=torch.zeros(2, 4, 8, 8)), ValueError, "x0 must be"),
    (dict(x0=torch.zeros(2, 3, 8)), ValueError, "x0 must be"),
    (dict(noise=torch.zeros(2, 3, 4, 4)), ValueError, "noise must have the shape"),
    (dict(timesteps=torch.tensor([0, NUM_TRAIN])), ValueError, "timesteps must lie"),
    (dict(timesteps=torch.tensor([0.0, 1.0])), TypeError, "timesteps must have an integer dtype"),
    (dict(timesteps=torch.tensor([-1, 0])), ValueError, r"timesteps must lie in \[0, 40\); got a value -1"),
    (dict(timesteps=torch.tensor([0])), ValueError, r"timesteps must have shape \[batch\]"),
    (dict(reduction="max"), ValueError, "reduction='max'"),
    (dict(class_labels=torch.tensor([0, 1])), ValueError, "class_labels were given"),
])
def test_loss_rejects_bad_arguments(kwargs, error, argument):
    kwargs = {"x0": torch.zeros(2, 3, 8, 8), **kwargs}
    with pytest.raises(error, match=argument):
        tiny_ddpm().loss(**kwargs)


@pytest.mark.parametrize("args, kwargs, error, argument", [
    ((torch.nn.Linear(2, 2),), {}, TypeError, r"unet must be a noise-prediction network called as unet\(sample"),
    ((UNet(**{**TINY, "out_channels": 6}),), {}, ValueError, "out_channels=6"),
    ((UNet(**TINY), "linear"), {}, TypeError, "schedule must be a NoiseSchedule"),
    ((UNet(**TINY),), dict(prediction_type="noise"), ValueError, "prediction_type='noise'"),
    ((UNet(**TINY),), dict(class_dropout_prob=1.5), ValueError, "class_dropout_prob"),
])
def test_constructor_rejects_bad_arguments(args, kwargs, error, argument):
    with pytest.raises(error, match=argument):
        DDPM(*args, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# any noise-prediction network: diffusers' UNet2DModel, plain modules


def test_ddpm_trains_a_diffusers_unet2d_model_on_the_written_out_objective():
    """DDPM used to refuse any network but genkernels' UNet (TypeError: unet must be a UNet)."""
    unet = tiny_unet2d()
    model = DDPM(unet, SCHEDULE, class_dropout_prob=0.0)
    assert model.network == NetworkInfo(in_channels=3, out_channels=3, image_size=8, num_classes=None,
                                        downsampling_factor=2)
    x0, noise, t = images(), random_tensor((2, 3, 8, 8), torch.float32, seed=2), torch.tensor([3, 31])
    alpha = SCHEDULE.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = (alpha.sqrt() * x0.double() + (1 - alpha).sqrt() * noise.double()).float()
    expected = (unet(x_t, t).sample - noise).square().mean()
    expected_grads = torch.autograd.grad(expected, list(unet.parameters()))
    with use_impl("eager"):
        loss = model.loss(x0, noise=noise, timesteps=t)
    grads = torch.autograd.grad(loss, list(unet.parameters()))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.5)])
def test_ddpm_samples_from_a_diffusers_unet2d_model_as_diffusers_pipelines_do(sampler, eta):
    """DDPM.sample with a UNet2DModel == diffusers' DDPMPipeline / DDIMPipeline running our scheduler on it (the
    same generator draws the same starting noise and step noise)."""
    unet = tiny_unet2d()
    model = DDPM(unet, SCHEDULE)
    with use_impl("eager"):
        ours = model.sample(2, 4, sampler=sampler, eta=eta, generator=torch.Generator().manual_seed(7),
                            progress=False)
        if sampler == "ddpm":
            pipeline = diffusers.DDPMPipeline(unet=unet, scheduler=DDPMScheduler(SCHEDULE))
            options = {}
        else:
            pipeline = diffusers.DDIMPipeline(unet=unet, scheduler=DDIMScheduler(SCHEDULE))
            pipeline.scheduler = DDIMScheduler(SCHEDULE)
            options = dict(eta=eta)
        pipeline.set_progress_bar_config(disable=True)
        expected = pipeline(batch_size=2, generator=torch.Generator().manual_seed(7), num_inference_steps=4,
                            output_type="pt", **options).images
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), expected, rtol=0, atol=1e-6)


def test_a_class_conditional_unet2d_model_uses_its_last_class_as_the_null_class():
    unet = tiny_unet2d(num_class_embeds=4)
    model = DDPM(unet, SCHEDULE)
    assert model.num_classes == 3
    labels_seen = []
    unet.register_forward_hook(lambda module, args, out: labels_seen.append(args[2].tolist()))
    noise, labels = random_tensor((2, 3, 8, 8), torch.float32, seed=9), torch.tensor([0, 2])
    with use_impl("eager"):
        guided = model.sample(2, 2, sampler="ddim", guidance_scale=2.0, class_labels=labels, noise=noise,
                              progress=False)
        scheduler = DDIMScheduler(SCHEDULE)
        scheduler.set_timesteps(2)
        x = noise.clone()
        for t in scheduler.timesteps.tolist():
            cond, uncond = unet(x, t, labels).sample, unet(x, t, torch.tensor([3, 3])).sample
            x = scheduler.step(uncond + 2.0 * (cond - uncond), t, x).prev_sample
    assert labels_seen[0] == [0, 2, 3, 3]
    torch.testing.assert_close(guided, x, rtol=1e-4, atol=1e-5)


class PlainDenoiser(nn.Module):
    """A module of the documented signature without genkernels' or diffusers' attributes."""

    def __init__(self, as_tuple: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.as_tuple = as_tuple

    def forward(self, sample, timestep):
        out = torch.tanh(self.conv(sample)) * (1 + 0.001 * torch.as_tensor(timestep).float().reshape(-1, 1, 1, 1))
        return (out,) if self.as_tuple else out


@pytest.mark.parametrize("as_tuple", [False, True])
def test_any_module_of_the_documented_signature_trains_and_samples(as_tuple):
    net = PlainDenoiser(as_tuple)
    model = DDPM(net, SCHEDULE, in_channels=3, image_size=(8, 6))
    with use_impl("eager"):
        loss = model.loss(images(), generator=torch.Generator().manual_seed(0))
        loss.backward()
        samples = model.sample(2, 3, generator=torch.Generator().manual_seed(1), progress=False)
        scheduler = DDPMScheduler(SCHEDULE)
        scheduler.set_timesteps(3)
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(2, 3, 8, 6, generator=generator)
        for t in scheduler.timesteps:
            out = net(x, t)
            x = scheduler.step(out[0] if as_tuple else out, t, x, generator=generator).prev_sample
    assert net.conv.weight.grad is not None and samples.shape == (2, 3, 8, 6)
    torch.testing.assert_close(samples, x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("unet, match", [
    (nn.Conv2d(3, 3, 3), r"unet must be a noise-prediction network called as unet\(sample, timestep\[, "
                         r"class_labels\]\).*got Conv2d, whose forward\(input"),
    (lambda sample, timestep: sample, r"unet must be a noise-prediction network \(an nn.Module\).*got function"),
    ("unet", r"unet must be a noise-prediction network.*got str"),
])
def test_unknown_networks_are_refused_naming_the_expected_signature(unet, match):
    with pytest.raises(TypeError, match=match):
        DDPM(unet, SCHEDULE)


def test_network_outputs_of_the_wrong_kind_or_shape_and_unknown_image_sizes_are_refused():
    class Wrong(nn.Module):
        def __init__(self, out):
            super().__init__()
            self.out = out
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, sample, timestep):
            return self.out(sample)

    with pytest.raises(ValueError, match=r"unet must return its input's shape \[2, 3, 8, 8\]"):
        DDPM(Wrong(lambda x: x[:, :1]), SCHEDULE).loss(images())
    with pytest.raises(TypeError, match="unet returned str"):
        DDPM(Wrong(lambda x: "x"), SCHEDULE).loss(images())
    with pytest.raises(ValueError, match=r"pass DDPM\(..., in_channels=C, image_size=S\)"):
        DDPM(PlainDenoiser(), SCHEDULE).sample(2, progress=False)
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        DDPM(PlainDenoiser(), SCHEDULE, image_size=0)
    with pytest.raises(ValueError, match="out_channels=6"):
        DDPM(diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=6, layers_per_block=1,
                                   block_out_channels=(8,), down_block_types=("DownBlock2D",),
                                   up_block_types=("UpBlock2D",), norm_num_groups=4), SCHEDULE)


# --------------------------------------------------------------------------------------------------------------
# GPU: CUDA graphs, no host synchronization, larger shapes


def gpu_ddpm(num_classes=10) -> DDPM:
    torch.manual_seed(0)
    unet = UNet(base_channels=64, channel_mult=(1, 2, 2), attention_resolutions=(16,), dropout=0.0, image_size=32,
                num_classes=num_classes)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return DDPM(unet.cuda(), NoiseSchedule.linear())


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "eager"])
@pytest.mark.parametrize("kwargs", [
    dict(sampler="ddpm"),
    dict(sampler="ddim", eta=0.5, guidance_scale=3.0, class_labels=torch.arange(4)),
    dict(sampler="ddim", inpaint=True),
])
def test_cuda_graph_sampling_equals_the_plain_loop_and_never_synchronizes(kwargs, impl):
    model = gpu_ddpm()
    kwargs = dict(kwargs)
    if kwargs.pop("inpaint", False):
        init = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)).cuda() * 2 - 1
        mask = torch.zeros(4, 1, 32, 32, device="cuda")
        mask[:, :, 8:24, 8:24] = 1
        kwargs.update(init=init, mask=mask)
    if "class_labels" in kwargs:
        kwargs["class_labels"] = kwargs["class_labels"].cuda()
    results = []
    with use_impl(impl):
        model.sample(4, 3, progress=False, **kwargs)  # first call: kernel compilation, schedule tables on device
        torch.cuda.synchronize()
        for cuda_graph in (False, True, True):
            generator = torch.Generator(device="cuda").manual_seed(3)
            torch.cuda.set_sync_debug_mode("error")
            try:
                results.append(model.sample(4, 20, generator=generator, cuda_graph=cuda_graph, progress=False,
                                            **kwargs))
            finally:
                torch.cuda.set_sync_debug_mode("default")
    plain, graphed, graphed_again = results
    torch.testing.assert_close(graphed, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(graphed, graphed_again)
    assert torch.isfinite(plain).all()


@pytest.mark.gpu
def test_cuda_graph_sampling_with_the_default_generator_equals_the_plain_loop():
    model = gpu_ddpm(num_classes=None)
    results = []
    with use_impl("triton"):
        for cuda_graph in (False, True):
            torch.cuda.manual_seed(4)
            results.append(model.sample(2, 10, cuda_graph=cuda_graph, progress=False))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_training_loss_on_the_gpu_triton_follows_eager_under_bf16_autocast():
    model = gpu_ddpm()
    x0 = torch.rand(8, 3, 32, 32, device="cuda") * 2 - 1
    labels = torch.arange(8, device="cuda")
    losses = {}
    for impl in ("eager", "triton"):
        with use_impl(impl), torch.autocast("cuda", dtype=torch.bfloat16):
            model.eval()
            losses[impl] = model.loss(x0, labels, generator=torch.Generator(device="cuda").manual_seed(0))
            losses[impl].backward()
    torch.testing.assert_close(losses["triton"], losses["eager"], rtol=2e-2, atol=2e-3)
