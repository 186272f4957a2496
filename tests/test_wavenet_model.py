"""WaveNet (models/wavenet.py): impl parity, cached vs naive generation, causality, mu-law, convergence."""
import math

import pytest
import torch
from torch import nn

from genkernels.kernels import use_impl
from genkernels.models.wavenet import CausalConv1d, WaveNet, mu_law_decode, mu_law_encode


def _tiny_wavenet(device, seed=0, **overrides):
    torch.manual_seed(seed)
    options = dict(residual_channels=8, dilation_channels=8, skip_channels=16, kernel_size=2, dilations=(1, 2, 4))
    options.update(overrides)
    return WaveNet(**options).to(device)


def _classes(batch, length, device, seed=0):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)


def _generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def _fp32_convolutions():
    """cuDNN computes fp32 convolutions in tf32 by default; exact sample equality needs fp32 logits."""
    return torch.backends.cudnn.flags(enabled=True, allow_tf32=False)


# ---------------------------------------------------------------------------------------------------------------
# CausalConv1d: the nn.Conv1d drop-in
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel_size,dilation", [(2, 3), (3, 1)])
def test_causal_conv1d_layer_matches_padded_nn_conv1d(kernel_size, dilation, device):
    """Same weights as an nn.Conv1d padded on both sides, its first ``time`` outputs kept (the classic recipe)."""
    torch.manual_seed(0)
    layer = CausalConv1d(3, 5, kernel_size, dilation=dilation, device=device)
    padded = nn.Conv1d(3, 5, kernel_size, dilation=dilation, padding=(kernel_size - 1) * dilation, device=device)
    padded.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 21, device=device)
    expected = padded(x)[:, :, :21]
    with use_impl("triton"):
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x[0]), expected[0], rtol=1e-5, atol=1e-5)  # unbatched, as nn.Conv1d
    with use_impl("eager"):
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,name", [
    (dict(stride=2), "stride"),
    (dict(padding=1), "padding"),
    (dict(groups=3), "groups"),
    (dict(padding_mode="reflect"), "padding_mode"),
])
def test_causal_conv1d_layer_rejects_unsupported_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CausalConv1d(3, 6, 2, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# mu-law
# ---------------------------------------------------------------------------------------------------------------
def test_mu_law_round_trips():
    classes = torch.arange(256)
    assert torch.equal(mu_law_encode(mu_law_decode(classes)), classes)
    levels = mu_law_decode(classes).double()
    assert levels[0] == -1 and levels[-1] == 1 and bool((levels[1:] > levels[:-1]).all())
    audio = torch.linspace(-1, 1, 10001, dtype=torch.float64)
    encoded = mu_law_encode(audio)
    decoded = mu_law_decode(encoded).double()
    # every value decodes to within one quantization step of its level's neighbours
    gaps = torch.cat([levels[1:] - levels[:-1], levels[-1:] - levels[-2:-1]])
    widest = torch.maximum(gaps[encoded], gaps[(encoded - 1).clamp(min=0)])
    assert bool(((decoded - audio).abs() <= widest).all())
    assert mu_law_encode(torch.tensor([0.0, 1.0, -1.0])).tolist() == [128, 255, 0]


def test_mu_law_matches_closed_form_at_a_point():
    x = torch.tensor([0.5], dtype=torch.float64)
    companded = math.log1p(255 * 0.5) / math.log1p(255)
    assert mu_law_encode(x).item() == round((companded + 1) / 2 * 255)


def test_mu_law_other_quantizations_and_integer_dtypes():
    for levels in (2, 16, 1024):
        classes = torch.arange(levels, dtype=torch.int32)
        audio = mu_law_decode(classes, levels)
        assert audio[0] == -1 and audio[-1] == 1
        assert torch.equal(mu_law_encode(audio, levels), classes.long())
    assert torch.equal(mu_law_decode(torch.arange(256, dtype=torch.uint8)), mu_law_decode(torch.arange(256)))
    assert mu_law_encode(torch.tensor([0.25], dtype=torch.bfloat16)).dtype == torch.int64


@pytest.mark.parametrize("audio,levels,error,name", [
    (torch.tensor([0.0, float("nan")]), 256, ValueError, "audio"),  # encoded to INT64_MIN before
    (torch.tensor([0.5, 1.5]), 256, ValueError, "audio"),
    (torch.tensor([float("-inf")]), 256, ValueError, "audio"),
    (torch.tensor([0, 1]), 256, TypeError, "audio"),
    ([0.0, 0.5], 256, TypeError, "audio"),
    (torch.tensor([0.5]), 1, ValueError, "quantization_channels"),
    (torch.tensor([0.5]), 256.0, TypeError, "quantization_channels"),
])
def test_mu_law_encode_rejects_bad_input(audio, levels, error, name):
    with pytest.raises(error, match=name):
        mu_law_encode(audio, levels)


@pytest.mark.parametrize("classes,levels,error,name", [
    (torch.tensor([0, 256]), 256, ValueError, "classes"),  # decoded outside [-1, 1] before
    (torch.tensor([-1, 3]), 256, ValueError, "classes"),
    (torch.tensor([5]), 4, ValueError, "classes"),
    (torch.tensor([0.0, 1.0]), 256, TypeError, "classes"),
    ([0, 1], 256, TypeError, "classes"),
    (torch.tensor([0]), 0, ValueError, "quantization_channels"),
    (torch.tensor([0]), "256", TypeError, "quantization_channels"),
])
def test_mu_law_decode_rejects_bad_input(classes, levels, error, name):
    with pytest.raises(error, match=name):
        mu_law_decode(classes, levels)


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
def test_triton_matches_eager_outputs_and_gradients(device):
    model = _tiny_wavenet(device, global_cond_channels=3)
    x = _classes(2, 24, device)
    cond = torch.randn(2, 3, device=device)
    results = {}
    for impl in ("triton", "eager"):
        model.zero_grad()
        with use_impl(impl):
            logits = model(x, cond)
            model.loss(x, cond).backward()
        # the last layer's residual output feeds nothing: eager autograd leaves its grads None, the kernel zeros
        results[impl] = (logits, {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                  for n, p in model.named_parameters()})
    torch.testing.assert_close(results["triton"][0], results["eager"][0], rtol=1e-4, atol=1e-5)
    for name, grad in results["triton"][1].items():
        torch.testing.assert_close(grad, results["eager"][1][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_model_is_causal(impl, device):
    model = _tiny_wavenet(device)
    x = _classes(1, 30, device)
    changed = x.clone()
    changed[0, 20] = (x[0, 20] + 100) % 256
    with use_impl(impl), torch.no_grad():
        before, after = model(x), model(changed)
    assert torch.equal(before[..., :20], after[..., :20])
    assert not torch.equal(before[..., 20], after[..., 20])


def test_receptive_field():
    """The prediction at t depends on exactly the receptive_field samples t - rf + 1 .. t."""
    model = _tiny_wavenet("cpu", kernel_size=3)
    assert model.receptive_field == 2 * (1 + 2 + 4) + 1
    x = _classes(1, 40, "cpu")
    t = 35
    with use_impl("eager"), torch.no_grad():
        base = model(x)[..., t]
        for offset, changes in ((model.receptive_field, False), (model.receptive_field - 1, True)):
            changed = x.clone()
            changed[0, t - offset] = (x[0, t - offset] + 77) % 256
            assert (not torch.equal(model(changed)[..., t], base)) == changes


def test_cached_generation_equals_naive_generation(device):
    """Same uniform draws -> the same samples, for each impl, and across impls; past the receptive field."""
    model = _tiny_wavenet(device, global_cond_channels=2)
    cond = torch.randn(3, 2, device=device)
    samples = {}
    for impl, use_cache in (("eager", False), ("eager", True), ("triton", True)):
        with use_impl(impl), _fp32_convolutions():
            samples[impl, use_cache] = model.generate(12, batch_size=3, temperature=0.8, use_cache=use_cache,
                                                      generator=_generator(device, 5), cond=cond)
    reference = samples["eager", False]
    assert reference.shape == (3, 12) and reference.dtype == torch.int64
    assert len(set(reference.flatten().tolist())) > 3  # a real draw, not a constant sequence
    assert torch.equal(samples["eager", True], reference)
    assert torch.equal(samples["triton", True], reference)


def test_naive_triton_generation_equals_cached(device):
    model = _tiny_wavenet(device, dilations=(1, 2))
    with use_impl("triton"):
        naive = model.generate(5, batch_size=2, use_cache=False, generator=_generator(device, 2))
        cached = model.generate(5, batch_size=2, use_cache=True, generator=_generator(device, 2))
    assert torch.equal(naive, cached)


def test_generate_rejects_bad_arguments():
    model = _tiny_wavenet("cpu")
    with pytest.raises(ValueError, match="temperature"):
        model.generate(3, temperature=0.0)
    with pytest.raises(ValueError, match="cond"):
        model.generate(3, cond=torch.randn(1, 2))
    with pytest.raises(TypeError, match="x"):
        model(torch.randn(1, 10))
    with pytest.raises(TypeError, match="use_cache"):
        model.generate(3, use_cache=1)


def test_short_training_converges_under_both_impls(device):
    """A few Adam steps on a repeating pattern: the loss falls, and both impls trace the same curve."""
    pattern = torch.tensor([10, 200, 30, 90, 250, 140, 60, 5], device=device)
    data = pattern.repeat(2, 5)[:, :36]
    curves = {}
    for impl in ("triton", "eager"):
        model = _tiny_wavenet(device, seed=1, dilations=(2,))
        optimizer = torch.optim.Adam(model.parameters(), lr=5e-2)
        losses = []
        with use_impl(impl):
            for _ in range(6):
                optimizer.zero_grad()
                loss = model.loss(data)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        curves[impl] = losses
    assert curves["triton"][-1] < 0.6 * curves["triton"][0]
    torch.testing.assert_close(torch.tensor(curves["triton"]), torch.tensor(curves["eager"]), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(num_classes=16.0), TypeError, "num_classes"),
    (dict(num_classes=1), ValueError, "num_classes"),
    (dict(residual_channels=0), ValueError, "residual_channels"),  # gave garbage logits (an unwritten skip)
    (dict(residual_channels=8.0), TypeError, "residual_channels"),
    (dict(dilation_channels=-1), ValueError, "dilation_channels"),
    (dict(skip_channels=0), ValueError, "skip_channels"),
    (dict(kernel_size=0), ValueError, "kernel_size"),
    (dict(kernel_size=True), TypeError, "kernel_size"),
    (dict(num_stacks=0, dilations=None), ValueError, "num_stacks"),
    (dict(layers_per_stack=-2, dilations=None), ValueError, "layers_per_stack"),
    (dict(dilations=[1, 0]), ValueError, "dilations"),
    (dict(dilations=[1, 2.0]), TypeError, "dilations"),
    (dict(dilations=[]), ValueError, "dilations"),
    (dict(dilations="124"), TypeError, "dilations"),
    (dict(global_cond_channels=-1), ValueError, "global_cond_channels"),
])
def test_model_rejects_bad_configuration(kwargs, error, name):
    options = dict(residual_channels=8, dilation_channels=8, skip_channels=16, kernel_size=2, dilations=(1, 2))
    options.update(kwargs)
    with pytest.raises(error, match=name):
        WaveNet(**options)


@pytest.mark.parametrize("case,error", [
    ("list", TypeError), ("float", TypeError), ("rank", ValueError), ("too_big", ValueError),
    ("negative", ValueError),
])
def test_forward_and_loss_range_check_the_classes(case, error):
    """Classes are checked on the host for CPU tensors (on a GPU: a device assert, no sync) before the embedding
    or the cross entropy sees them."""
    model = _tiny_wavenet("cpu")
    x = _classes(2, 9, "cpu")
    bad = {"list": x.tolist(), "float": x.float(), "rank": x[None],
           "too_big": x.clone().index_fill_(1, torch.tensor([4]), 256),
           "negative": x.clone().index_fill_(1, torch.tensor([8]), -1)}[case]
    with pytest.raises(error, match="x"):
        model(bad)
    with pytest.raises(error, match="x"):
        model.loss(bad)


def test_forward_takes_any_integer_dtype_and_rejects_bad_cond():
    model = _tiny_wavenet("cpu", global_cond_channels=2)
    x = _classes(2, 9, "cpu")
    cond = torch.randn(2, 2)
    with use_impl("eager"), torch.no_grad():
        expected = model(x, cond)
        for dtype in (torch.uint8, torch.int16, torch.int32):
            assert torch.equal(model(x.to(dtype), cond), expected)
        assert torch.isfinite(model.loss(x.to(torch.int32), cond))
    with pytest.raises(TypeError, match="cond"):
        model(x, cond.tolist())


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_meta_model_gives_shapes(impl):
    """A model on the meta device: logits and generated samples get their shapes, with no host read."""
    model = _tiny_wavenet("cpu").to("meta")
    x = torch.zeros(2, 9, dtype=torch.int64, device="meta")
    with use_impl(impl), torch.no_grad():
        assert model(x).shape == (2, 256, 9)
        for use_cache in (True, False):
            samples = model.generate(3, batch_size=2, use_cache=use_cache)
            assert samples.shape == (2, 3) and samples.device.type == "meta"


def test_model_compiles_with_fullgraph_and_dynamic_shapes(device):
    """Forward and loss under torch.compile(fullgraph=True, dynamic=True): the class range check becomes a device
    assert inside the graph (no host sync), and still fires."""
    model = _tiny_wavenet(device, num_classes=16, dilations=(1, 2))
    x = torch.randint(0, 16, (2, 9), generator=torch.Generator().manual_seed(0)).to(device)
    with use_impl("triton"):
        forward = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
        torch.testing.assert_close(forward(x), model(x), rtol=0, atol=0)
        loss = torch.compile(model.loss, fullgraph=True, dynamic=True, backend="aot_eager")
        torch.testing.assert_close(loss(x), model.loss(x), rtol=1e-6, atol=1e-6)
        if device == "cpu":  # on a GPU the assert is a device-side error that ends the process's CUDA context
            bad = x.clone()
            bad[0, 3] = 16
            with pytest.raises(RuntimeError, match="x must lie in"):
                forward(bad)
