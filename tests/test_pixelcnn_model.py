"""PixelCNN and MaskedConv2d (models/pixelcnn.py): drop-in layer, likelihood, causality, triton vs eager,
cached vs naive sampling, and a short training run under both implementations."""
import math

import pytest
import torch
import torch.nn.functional as F
from reference_checks import assert_close_to_reference

from genkernels.kernels import use_impl
from genkernels.kernels.masked_conv import masked_conv2d_mask
from genkernels.models.pixelcnn import MaskedConv2d, PixelCNN


def _model(colors, hidden=3, blocks=1, image_size=(4, 4), seed=0, device="cpu", num_classes=None):
    torch.manual_seed(seed)
    model = PixelCNN(colors, hidden_channels=hidden, num_blocks=blocks, output_channels=3 * hidden,
                     image_size=image_size, num_classes=num_classes)
    if num_classes is not None:  # class biases off their zero initialization
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "class_bias" in name:
                    parameter.normal_(0.0, 0.5)
    return model.to(device)


def _images(shape, seed, device="cpu"):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed)).to(device)


def test_masked_conv2d_is_a_drop_in_conv2d():
    conv = torch.nn.Conv2d(6, 9, 3, padding=1)
    layer = MaskedConv2d(6, 9, 3, mask_type="A", color_channels=3)
    layer.load_state_dict(conv.state_dict())
    x = torch.randn(2, 6, 5, 4)
    mask = masked_conv2d_mask(9, 6, 3, "A", 3)
    expected = F.conv2d(x.double(), conv.weight.double() * mask.double(), conv.bias.double(), padding=1)
    with use_impl("eager"):
        assert_close_to_reference(layer(x), expected, F.conv2d(x, conv.weight * mask, conv.bias, padding=1))
    assert "mask_type=A" in repr(layer)
    assert MaskedConv2d(3, 3, (5, 5), padding=2, bias=False).bias is None


@pytest.mark.parametrize("argument, value", [("stride", 2), ("dilation", 2), ("groups", 3), ("padding", 0),
                                             ("padding_mode", "reflect")])
def test_masked_conv2d_rejects_what_it_cannot_compute(argument, value):
    with pytest.raises(ValueError, match=argument):
        MaskedConv2d(3, 3, 3, **{argument: value})


def test_masked_conv2d_rejects_bad_masks():
    with pytest.raises(ValueError, match="mask_type"):
        MaskedConv2d(3, 3, 3, mask_type="C")
    with pytest.raises(ValueError, match="out_channels=4"):
        MaskedConv2d(3, 4, 3, color_channels=3)
    with pytest.raises(ValueError, match="odd"):
        MaskedConv2d(3, 3, 4)


def test_pixelcnn_rejects_bad_input():
    model = _model(3)
    with pytest.raises(TypeError, match="x must hold integer"):
        model(torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, 3"):
        model(_images((1, 1, 4, 4), 0))
    with pytest.raises(ValueError, match="in_channels"):
        PixelCNN(2)
    with pytest.raises(ValueError, match="n=-1"):
        model.sample(-1)
    with pytest.raises(TypeError, match="n must be an int"):
        model.sample(2.0)
    with pytest.raises(TypeError, match="use_cache"):
        model.sample(1, use_cache=1)
    with pytest.raises(TypeError, match="generator"):
        model.sample(1, generator=0)


@pytest.mark.parametrize("bad", [256, -1, 1000])
def test_pixelcnn_rejects_pixels_outside_0_to_255(bad):
    """Regression: pixel values outside 0..255 were silently rescaled (256 became 1.008). Integer pixels are
    range-checked (a host ValueError for CPU tensors, an asynchronous device assert on a GPU)."""
    model = _model(1)
    x = _images((2, 1, 4, 4), 0)
    x[1, 0, 2, 3] = bad
    with pytest.raises(ValueError, match=r"x \(pixel values\) must lie in \[0, 255\]"):
        model(x)
    with pytest.raises(ValueError, match="pixel values"):
        model.loss(x)
    with use_impl("eager"):
        assert model(x.clamp(0, 255).to(torch.uint8)).shape == (2, 256, 1, 4, 4)  # uint8 0..255 is accepted


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(image_size=2.5), TypeError, "image_size"),
    (dict(image_size=0), ValueError, "image_size"),
    (dict(image_size=(4, 0)), ValueError, "image_size"),
    (dict(image_size=(4, 4.0)), TypeError, "image_size"),
    (dict(image_size=(4, 4, 4)), ValueError, "image_size"),
    (dict(image_size="28"), TypeError, "image_size"),
    (dict(image_size=True), TypeError, "image_size"),
    (dict(hidden_channels=0), ValueError, "hidden_channels"),
    (dict(hidden_channels=-2), ValueError, "hidden_channels"),
    (dict(hidden_channels=4.0), TypeError, "hidden_channels"),
    (dict(num_blocks=-1), ValueError, "num_blocks"),
    (dict(num_blocks=1.5), TypeError, "num_blocks"),
    (dict(output_channels=0), ValueError, "output_channels"),
    (dict(output_channels="256"), TypeError, "output_channels"),
    (dict(in_channels=True), TypeError, "in_channels"),
    (dict(in_channels=3, hidden_channels=4, output_channels=9), ValueError, "hidden_channels=4"),
    (dict(in_channels=3, hidden_channels=3, output_channels=10), ValueError, "output_channels=10"),
])
def test_pixelcnn_rejects_bad_configuration(kwargs, error, name):
    with pytest.raises(error, match=name):
        PixelCNN(**kwargs)


@pytest.mark.parametrize("args, kwargs, error, name", [
    ((0, 3, 3), {}, ValueError, "in_channels"),
    ((3, -3, 3), {}, ValueError, "out_channels"),
    ((3.0, 3, 3), {}, TypeError, "in_channels"),
    ((3, 3, 0), {}, ValueError, "kernel_size"),
    ((3, 3, -1), {}, ValueError, "kernel_size"),
    ((3, 3, 2.5), {}, TypeError, "kernel_size"),
    ((3, 3, (3, 5)), {}, ValueError, "kernel_size"),
    ((3, 3, (3,)), {}, ValueError, "kernel_size"),
    ((3, 3, True), {}, TypeError, "kernel_size"),
    ((3, 3, 3), dict(mask_type=1), ValueError, "mask_type"),
    ((3, 3, 3), dict(color_channels=2), ValueError, "color_channels"),
    ((3, 3, 3), dict(color_channels="3"), TypeError, "color_channels"),
    ((3, 3, 3), dict(bias="yes"), TypeError, "bias"),
])
def test_masked_conv2d_rejects_bad_configuration(args, kwargs, error, name):
    with pytest.raises(error, match=name):
        MaskedConv2d(*args, **kwargs)


def test_masked_conv2d_accepts_a_square_pair_and_rgb_defaults():
    assert MaskedConv2d(3, 6, (3, 3), color_channels=3).kernel_size == (3, 3)
    model = PixelCNN(3, hidden_channels=3, num_blocks=1, output_channels=6, image_size=(2, 3))
    assert model.image_size == (2, 3)


def test_logits_layout_and_loss_in_bits_per_dim():
    model = _model(3, image_size=(5, 4))
    x = _images((2, 3, 5, 4), 1)
    with use_impl("eager"):
        logits = model(x)
        loss = model.loss(x)
    assert logits.shape == (2, 256, 3, 5, 4)
    log_probs = torch.log_softmax(logits.double(), dim=1)
    nll_bits = -log_probs.gather(1, x[:, None]).mean() / math.log(2)
    torch.testing.assert_close(loss.double(), nll_bits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("colors", [1, 3])
def test_logits_never_see_later_sub_pixels(colors):
    """Changing sub-pixel (q, c) leaves every logit up to its own in the sampling order unchanged, and changes
    some later one (the next pixel right, or the next colour of q)."""
    model = _model(colors, hidden=6, blocks=2, image_size=(5, 5))
    x = _images((1, colors, 5, 5), 2)
    order = torch.arange(25 * colors).view(5, 5, colors).permute(2, 0, 1)  # [C, H, W] sampling step
    with use_impl("eager"):
        base = model(x)
        for row, col, channel in [(0, 0, 0), (2, 3, colors - 1), (4, 1, 0), (3, 4, colors // 2)]:
            changed = x.clone()
            changed[0, channel, row, col] = (changed[0, channel, row, col] + 128) % 256
            differs = (model(changed) != base).any(dim=1)[0]  # [C, H, W]
            step = order[channel, row, col]
            assert not differs[order <= step].any()
            assert differs[order > step].any()


def _gradients(model, x):
    loss = model.loss(x)
    return [loss] + list(torch.autograd.grad(loss, list(model.parameters())))


def test_triton_matches_eager_outputs_and_gradients(device):
    model = _model(3, hidden=3, blocks=1, device=device)
    x = _images((2, 3, 4, 3), 3, device)
    with use_impl("triton"):
        logits = model(x)
        kernel = _gradients(model, x)
    with use_impl("eager"):
        eager_logits = model(x)
        eager = _gradients(model, x)
        reference_model = _model(3, hidden=3, blocks=1, device=device).double()
        reference_logits = reference_model(x)
        reference = _gradients(reference_model, x)
    assert_close_to_reference(logits, reference_logits, eager_logits, "logits")
    names = ["loss"] + [name for name, _ in model.named_parameters()]
    for name, got, eager_value, expected in zip(names, kernel, eager, reference):
        assert_close_to_reference(got, expected, eager_value, name)


@pytest.mark.parametrize("impl, colors, size, hidden, blocks", [
    ("eager", 3, (6, 6), 6, 2),
    ("eager", 1, (6, 6), 3, 2),
    ("triton", 1, (3, 4), 3, 1),
])
def test_cached_sampling_gives_exactly_the_naive_samples(impl, colors, size, hidden, blocks):
    """Both samplers draw each sub-pixel by Gumbel-max from its logits with the same Philox seed (drawn up front
    from the generator) and the sub-pixel's index as the offset, so their images are equal exactly when the
    logits they draw from are bitwise equal.
    They are: the cached sampler evaluates each layer at the pixel being drawn on a crop of the layer's input
    that holds every tap the pixel reads, with the image edges where they are in the full image, so each output
    value is the same sum of the same products in the same order (the Triton kernel fixes that order by
    construction: taps in a fixed sequence, channel blocks chosen from the channel counts alone; the eager path
    relies on the CPU convolution doing the same, which this test checks)."""
    model = _model(colors, hidden=hidden, blocks=blocks, image_size=size)
    with use_impl(impl):
        naive = model.sample(2, use_cache=False, generator=torch.Generator().manual_seed(5))
        cached = model.sample(2, use_cache=True, generator=torch.Generator().manual_seed(5))
    assert naive.shape == (2, colors) + size and naive.dtype == torch.int64
    assert torch.equal(cached, naive)
    assert 0 <= int(naive.min()) and int(naive.max()) <= 255
    assert naive.unique().numel() > 2  # an untrained model draws spread-out values, not a constant image


@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_loss_compiles_with_fullgraph_and_dynamic_shapes(impl):
    """PixelCNN's loss (the pixel range check included: a device-style assert while tracing) under
    torch.compile(fullgraph=True, dynamic=True), at two image sizes."""
    model = _model(1)
    with use_impl(impl):
        compiled = torch.compile(model.loss, fullgraph=True, dynamic=True, backend="aot_eager")
        for size in ((4, 4), (5, 3)):
            x = _images((2, 1) + size, 4)
            torch.testing.assert_close(compiled(x), model.loss(x), rtol=1e-5, atol=1e-5)


def test_sampling_zero_images():
    assert _model(1).sample(0).shape == (0, 1, 4, 4)


def test_short_training_run_converges_alike_under_both_impls():
    """Adam on two fixed 4x4 images: the bits/dim curve falls, and triton's curve follows eager's."""
    x = _images((2, 1, 4, 4), 7) // 64 * 64  # four grey levels: learnable in a few steps
    curves = {}
    for impl in ("eager", "triton"):
        model = _model(1, hidden=3, blocks=1, seed=1)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
        curve = []
        with use_impl(impl):
            for _ in range(20):
                optimizer.zero_grad()
                loss = model.loss(x)
                loss.backward()
                optimizer.step()
                curve.append(loss.item())
        curves[impl] = torch.tensor(curve)
    assert curves["eager"][-1] < 0.4 * curves["eager"][0]
    torch.testing.assert_close(curves["triton"], curves["eager"], rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
def test_cached_sampling_on_gpu_matches_naive_at_28x28(device):
    model = _model(1, hidden=16, blocks=3, image_size=(28, 28), device=device)
    with use_impl("triton"):
        naive = model.sample(4, use_cache=False, generator=torch.Generator(device).manual_seed(0))
        cached = model.sample(4, use_cache=True, generator=torch.Generator(device).manual_seed(0))
    assert torch.equal(cached, naive)


# ---------------------------------------------------------------------------------------------------------------
# Class-conditional PixelCNN
# ---------------------------------------------------------------------------------------------------------------
LABELS = torch.tensor([2, 0])


def test_class_conditional_model_is_the_unconditional_network_with_the_class_biases_added():
    """For label y, p(x | y) is the unconditional network with b_in[y] added to the input convolution's bias and
    each block's b[y] to its first 1x1 convolution's bias."""
    model = _model(3, hidden=6, blocks=2, image_size=(5, 4), num_classes=3)
    x = _images((2, 3, 5, 4), 1)
    with use_impl("eager"):
        logits = model(x, LABELS)
        for row, label in enumerate(LABELS.tolist()):
            twin = _model(3, hidden=6, blocks=2, image_size=(5, 4))
            state = {key: value for key, value in model.state_dict().items() if "class_bias" not in key}
            twin.load_state_dict(state)
            with torch.no_grad():
                twin.input_conv.bias += model.class_bias.weight[label]
                for block, twin_block in zip(model.blocks, twin.blocks):
                    twin_block.reduce.bias += block.class_bias.weight[label]
            torch.testing.assert_close(logits[row:row + 1], twin(x[row:row + 1]), rtol=1e-5, atol=1e-5)
        # the label reaches the first sub-pixel too, which sees no pixel
        assert not torch.allclose(model(x, LABELS.flip(0))[:, :, 0, 0, 0], logits[:, :, 0, 0, 0])


def test_class_conditional_likelihood_is_the_sum_of_the_sub_pixel_log_probabilities():
    model = _model(1, hidden=6, blocks=1, image_size=(4, 4), num_classes=3)
    x = _images((2, 1, 4, 4), 3)
    with use_impl("eager"):
        log_likelihood = model.log_likelihood(x, LABELS)
        loss = model.loss(x, LABELS)
        log_probs = torch.log_softmax(model(x, LABELS).double(), dim=1).gather(1, x[:, None])
    torch.testing.assert_close(log_likelihood.double(), log_probs.flatten(1).sum(1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loss.double(), -log_probs.mean() / math.log(2), rtol=1e-5, atol=1e-6)


def test_class_conditional_logits_never_see_later_sub_pixels():
    model = _model(1, hidden=6, blocks=2, image_size=(5, 5), num_classes=3)
    x = _images((2, 1, 5, 5), 2)
    with use_impl("eager"):
        base = model(x, LABELS)
        changed = x.clone()
        changed[:, 0, 2, 3] = (changed[:, 0, 2, 3] + 128) % 256
        differs = (model(changed, LABELS) != base).any(dim=1).any(dim=0)[0]  # [H, W]
    order = torch.arange(25).view(5, 5)
    assert not differs[order <= 2 * 5 + 3].any() and differs[order > 2 * 5 + 3].any()


def test_class_conditional_triton_matches_eager_outputs_and_gradients():
    model = _model(3, hidden=3, blocks=1, num_classes=3)
    x = _images((2, 3, 4, 3), 3)

    def outputs_and_grads(network, impl):
        with use_impl(impl):
            loss = network.loss(x, LABELS)
            return [network(x, LABELS), loss] + list(torch.autograd.grad(loss, list(network.parameters())))

    kernel, eager = outputs_and_grads(model, "triton"), outputs_and_grads(model, "eager")
    reference = outputs_and_grads(_model(3, hidden=3, blocks=1, num_classes=3).double(), "eager")
    names = ["logits", "loss"] + [name for name, _ in model.named_parameters()]
    assert "class_bias.weight" in names
    for name, got, eager_value, expected in zip(names, kernel, eager, reference):
        assert_close_to_reference(got, expected, eager_value, name)


@pytest.mark.parametrize("impl, size, blocks", [("eager", (4, 4), 2), ("triton", (3, 3), 1)])  # interpreter: small
def test_class_conditional_cached_sampling_gives_exactly_the_naive_samples(impl, size, blocks):
    model = _model(1, hidden=3, blocks=blocks, image_size=size, num_classes=3)
    with torch.no_grad():  # class biases large enough to move a near-uniform untrained softmax's draws
        model.class_bias.weight.mul_(20.0)
    with use_impl(impl):
        naive = model.sample(2, use_cache=False, generator=torch.Generator().manual_seed(5), labels=LABELS)
        cached = model.sample(2, use_cache=True, generator=torch.Generator().manual_seed(5), labels=LABELS)
        other = model.sample(2, use_cache=True, generator=torch.Generator().manual_seed(5), labels=LABELS.flip(0))
    assert torch.equal(cached, naive)
    assert not torch.equal(other, naive)  # same uniforms, other classes: other images


@pytest.mark.parametrize("call, error, message", [
    (lambda model: model(_images((2, 1, 4, 4), 0)), ValueError,
     r"class-conditional \(num_classes=3\): labels \[2\] are required"),
    (lambda model: model.loss(_images((2, 1, 4, 4), 0), LABELS.float()), TypeError,
     "labels must have an integer dtype"),
    (lambda model: model(_images((2, 1, 4, 4), 0), LABELS[:1]), ValueError, r"labels must have shape \[batch\] = \[2\]"),
    (lambda model: model(_images((2, 1, 4, 4), 0), torch.tensor([3, 0])), ValueError,
     r"labels must lie in \[0, 3\); got a value 3"),
    (lambda model: model.sample(2), ValueError, r"labels \[2\] are required"),
    (lambda model: model.sample(2, labels=torch.tensor([0, -1])), ValueError, "labels must lie in .*got a value -1"),
    (lambda model: model.log_likelihood(_images((2, 1, 4, 4), 0), [0, 1]), TypeError,
     "labels must be a torch.Tensor"),
])
def test_class_conditional_model_rejects_bad_labels(call, error, message):
    with pytest.raises(error, match=message):
        call(_model(1, num_classes=3))


def test_unconditional_model_refuses_labels():
    with pytest.raises(ValueError, match=r"labels were given to an unconditional model \(num_classes=None\)"):
        _model(1)(_images((2, 1, 4, 4), 0), LABELS)
    with pytest.raises(ValueError, match="num_classes=0"):
        PixelCNN(1, num_classes=0)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        PixelCNN(1, num_classes=2.0)
