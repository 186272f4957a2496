"""The DDPM U-Net (models/unet.py): triton vs eager vs a float64 functional oracle written with torch's own layers
(``F.group_norm``, ``F.conv2d``, ``F.scaled_dot_product_attention``), outputs and every parameter's gradient; the
architecture against the published DDPM CIFAR-10 model; conditioning, input forms and bad input."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genkernels.kernels import use_impl
from genkernels.models import unet as unet_module
from genkernels.models.unet import AttentionBlock, UNet, timestep_embedding
from reference_checks import assert_close_to_reference, random_tensor

# 8x8 images, two levels (8x8 and 4x4), attention at 4x4 with two heads of 16 channels.
TINY = dict(in_channels=3, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
            dropout=0.0, num_groups=4, num_head_channels=16, image_size=8)


def tiny_unet(seed: int = 0, **overrides) -> UNet:
    """A tiny U-Net whose zero-initialized layers (and unit GroupNorm affines) are perturbed, so that every
    parameter gets a non-zero gradient and the output depends on every layer."""
    torch.manual_seed(seed)
    model = UNet(**{**TINY, **overrides})
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model


# --------------------------------------------------------------------------------------------------------------
# float64 oracle: the DDPM U-Net written out with torch functions on the module's weights


def oracle_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    frequencies = torch.tensor([10000.0 ** (-k / (half - 1)) for k in range(half)], dtype=torch.float64)
    angles = t.double()[:, None] * frequencies
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def oracle_norm(norm, h, silu=True):
    y = F.group_norm(h, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return F.silu(y) if silu else y


def oracle_res_block(block, h, emb):
    out = F.conv2d(oracle_norm(block.norm1, h), block.conv1.weight, block.conv1.bias, padding=1)
    out = out + F.linear(emb, block.temb_proj.weight, block.temb_proj.bias)[:, :, None, None]
    out = F.conv2d(oracle_norm(block.norm2, out), block.conv2.weight, block.conv2.bias, padding=1)
    skip = h if isinstance(block.skip, nn.Identity) else F.conv2d(h, block.skip.weight, block.skip.bias)
    return skip + out


def oracle_attention(block, h):
    """Multi-head self-attention over the positions, with SDPA on ``[batch, heads, positions, head_dim]``."""
    batch, channels, height, width = h.shape
    heads = block.num_heads
    qkv = F.conv2d(oracle_norm(block.norm, h, silu=False), block.qkv.weight, block.qkv.bias)
    tokens = qkv.flatten(2).transpose(1, 2)  # [batch, positions, 3C]
    q, k, v = (part.reshape(batch, height * width, heads, channels // heads).transpose(1, 2)
               for part in tokens.chunk(3, dim=2))
    out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(1, 2).reshape(batch, height * width, channels).transpose(1, 2)
    return h + F.conv2d(out.reshape(batch, channels, height, width), block.proj.weight, block.proj.bias)


def oracle_level_block(level, i, h, emb):
    h = oracle_res_block(level.res_blocks[i], h, emb)
    return oracle_attention(level.attentions[i], h) if level.attentions is not None else h


def oracle_unet(model: UNet, x, t, labels=None):
    """Ho et al.'s U-Net: embedding MLP, encoder with skips, middle res-attn-res, decoder on concatenated skips."""
    first, second = model.time_embed
    temb = F.linear(F.silu(F.linear(oracle_embedding(t, model.base_channels), first.weight, first.bias)),
                    second.weight, second.bias)
    if model.class_embed is not None:
        labels = torch.full_like(t, model.num_classes).long() if labels is None else labels
        temb = temb + model.class_embed.weight[labels]
    emb = F.silu(temb)
    h = F.conv2d(x, model.conv_in.weight, model.conv_in.bias, padding=1)
    skips = [h]
    for level in model.down:
        for i in range(len(level.res_blocks)):
            h = oracle_level_block(level, i, h, emb)
            skips.append(h)
        if level.resample is not None:
            h = F.conv2d(h, level.resample.conv.weight, level.resample.conv.bias, stride=2, padding=1)
            skips.append(h)
    h = oracle_res_block(model.mid.res_blocks[0], h, emb)
    h = oracle_attention(model.mid.attentions[0], h)
    h = oracle_res_block(model.mid.res_blocks[1], h, emb)
    for level in model.up:
        for i in range(len(level.res_blocks)):
            h = oracle_level_block(level, i, torch.cat([h, skips.pop()], dim=1), emb)
        if level.resample is not None:
            h = h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
            h = F.conv2d(h, level.resample.conv.weight, level.resample.conv.bias, padding=1)
    assert not skips
    return F.conv2d(oracle_norm(model.norm_out, h), model.conv_out.weight, model.conv_out.bias, padding=1)


def output_and_grads(model, x, t, labels, weights):
    out = model(x, t, labels)
    loss = (out.double() * weights).sum()
    return out, torch.autograd.grad(loss, list(model.parameters()))


# --------------------------------------------------------------------------------------------------------------
# numerics


def test_sinusoidal_embedding_matches_the_ddpm_formula():
    t = torch.tensor([0, 1, 17, 999])
    embedding = timestep_embedding(t, 32)
    assert embedding.dtype == torch.float32 and embedding.shape == (4, 32)
    torch.testing.assert_close(embedding.double(), oracle_embedding(t, 32), rtol=0, atol=2e-4)
    assert timestep_embedding(t, 33)[:, -1].eq(0).all()


def test_triton_and_eager_match_a_float64_oracle_in_output_and_every_parameter_gradient():
    model = tiny_unet(num_classes=3)
    x = random_tensor((2, 3, 8, 8), torch.float32, seed=1)
    t, labels = torch.tensor([5, 731]), torch.tensor([2, 3])  # 3 = the null class
    weights = random_tensor((2, 3, 8, 8), torch.float64, seed=2)
    reference_model = copy.deepcopy(model).double()
    reference = oracle_unet(reference_model, x.double(), t, labels)
    reference_grads = torch.autograd.grad((reference * weights).sum(), list(reference_model.parameters()))
    results = {}
    for impl in ("eager", "triton"):
        with use_impl(impl):
            results[impl] = output_and_grads(model, x, t, labels, weights)
    (eager, eager_grads), (out, grads) = results["eager"], results["triton"]
    torch.testing.assert_close(eager.double(), reference, rtol=1e-4, atol=1e-5)  # the eager model is the oracle
    assert_close_to_reference(out, reference, eager, "output")
    names = [name for name, _ in model.named_parameters()]
    assert len(names) == len(grads) and len(names) > 60
    for name, grad, ref, eager_grad in zip(names, grads, reference_grads, eager_grads):
        assert ref.abs().max() > 0, name
        torch.testing.assert_close(eager_grad.double(), ref, rtol=1e-3, atol=1e-4, msg=name)
        assert_close_to_reference(grad, ref, eager_grad, f"grad {name}")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_attention_block_matches_sdpa_and_reads_views_of_the_qkv_convolution(layout, monkeypatch):
    torch.manual_seed(3)
    block = AttentionBlock(32, num_heads=2, num_groups=4, eps=1e-5)
    nn.init.normal_(block.proj.weight, std=0.2)
    x = random_tensor((2, 32, 3, 5), torch.float32, seed=4)  # 15 positions: ragged
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    seen, packed = [], []
    real = unet_module.flash_attention
    monkeypatch.setattr(unet_module, "flash_attention", lambda q, k, v: seen.append((q, k, v)) or real(q, k, v))
    block.qkv.register_forward_hook(lambda module, args, out: packed.append(out))
    reference = oracle_attention(copy.deepcopy(block).double(), x.double())
    outputs = {}
    for impl in ("eager", "triton"):
        with use_impl(impl):
            outputs[impl] = block(x)
    assert_close_to_reference(outputs["triton"], reference, outputs["eager"])
    torch.testing.assert_close(outputs["eager"].double(), reference, rtol=1e-5, atol=1e-6)
    for (q, k, v), qkv in zip(seen, packed):
        assert [tuple(part.shape) for part in (q, k, v)] == [(2, 2, 15, 16)] * 3
        assert all(part.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr() for part in (q, k, v))


def test_channels_last_input_gives_the_nchw_output():
    model = tiny_unet()
    x = random_tensor((2, 3, 8, 8), torch.float32, seed=5)
    with use_impl("eager"):
        expected = model(x, 10)
        out = model(x.contiguous(memory_format=torch.channels_last), 10)
    # PyTorch may pick another convolution algorithm for channels_last: the tolerance rule against the fp64 oracle,
    # not bit-equality of two fp32 results
    reference = oracle_unet(copy.deepcopy(model).double(), x.double(), torch.full((2,), 10.0, dtype=torch.float64))
    assert out.shape == expected.shape
    assert_close_to_reference(out, reference, expected)


def test_timestep_forms_agree():
    model = tiny_unet()
    x = random_tensor((2, 3, 8, 8), torch.float32, seed=6)
    with use_impl("eager"):
        expected = model(x, torch.tensor([40, 40]))
        for timestep in (40, 40.0, torch.tensor(40), torch.tensor([40.0, 40.0]), torch.tensor(40, dtype=torch.int32)):
            torch.testing.assert_close(model(x, timestep), expected, rtol=0, atol=0)
        assert not torch.equal(model(x, torch.tensor([40, 41])), expected)


def test_class_conditioning_changes_the_output_and_none_is_the_null_class():
    model = tiny_unet(num_classes=4)
    x = random_tensor((2, 3, 8, 8), torch.float32, seed=7)
    with use_impl("eager"):
        null = model(x, 100, torch.tensor([4, 4]))
        torch.testing.assert_close(model(x, 100), null, rtol=0, atol=0)
        conditional = model(x, 100, torch.tensor([0, 3]))
    for i in range(2):
        assert (conditional[i] - null[i]).abs().max() > 1e-3
    assert model.class_embed.weight.shape == (5, 4 * TINY["base_channels"])


def test_zero_initialized_blocks_make_a_fresh_network_output_zero():
    torch.manual_seed(0)
    model = UNet(**TINY)
    with use_impl("eager"):
        out = model(random_tensor((2, 3, 8, 8), torch.float32, seed=8), 3)
    assert out.eq(0).all()
    for block in (model.mid.res_blocks[0].conv2, model.mid.attentions[0].proj, model.conv_out):
        assert block.weight.eq(0).all() and block.bias.eq(0).all()


def test_dropout_is_active_in_training_mode_only():
    model = tiny_unet(dropout=0.5)
    x = random_tensor((1, 3, 8, 8), torch.float32, seed=9)
    with use_impl("eager"):
        model.eval()
        assert torch.equal(model(x, 3), model(x, 3))
        model.train()
        assert not torch.equal(model(x, 3), model(x, 3))


def ddpm_parameter_count(base, mult, num_res_blocks, attention_levels, channels=3):
    """Parameters of Ho et al.'s U-Net counted from its description (appendix B and the released code)."""
    def conv(cin, cout, k):
        return cin * cout * k * k + cout

    def res(cin, cout):
        temb = 4 * base
        shortcut = conv(cin, cout, 1) if cin != cout else 0
        return 2 * cin + conv(cin, cout, 3) + temb * cout + cout + 2 * cout + conv(cout, cout, 3) + shortcut

    def attention(c):
        return 2 * c + conv(c, 3 * c, 1) + conv(c, c, 1)

    total = (base * 4 * base + 4 * base) + (4 * base * 4 * base + 4 * base) + conv(channels, base, 3)
    width, skips = base, [base]
    for level, m in enumerate(mult):
        for _ in range(num_res_blocks):
            total += res(width, base * m) + (attention(base * m) if level in attention_levels else 0)
            width = base * m
            skips.append(width)
        if level < len(mult) - 1:
            total += conv(width, width, 3)
            skips.append(width)
    total += 2 * res(width, width) + attention(width)
    for level in reversed(range(len(mult))):
        for _ in range(num_res_blocks + 1):
            total += res(width + skips.pop(), base * mult[level])
            width = base * mult[level]
            total += attention(width) if level in attention_levels else 0
        if level > 0:
            total += conv(width, width, 3)
    return total + 2 * width + conv(width, channels, 3)


def test_cifar10_configuration_has_the_published_ddpm_architecture():
    """Ho et al.'s CIFAR-10 model: 35.7M parameters, attention at 16x16 only, three decoder blocks per level."""
    model = UNet(in_channels=3, base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                 attention_resolutions=(16,), dropout=0.1, image_size=32)
    count = sum(p.numel() for p in model.parameters())
    assert count == ddpm_parameter_count(128, (1, 2, 2, 2), 2, {1})
    assert round(count / 1e6, 1) == 35.7
    assert [level.attentions is not None for level in model.down] == [False, True, False, False]
    assert [len(level.res_blocks) for level in model.up] == [3, 3, 3, 3]
    assert [block.num_heads for block in model.modules() if isinstance(block, AttentionBlock)] == [4] * 6


def test_forward_on_other_image_sizes_and_an_empty_batch():
    model = tiny_unet()
    with use_impl("eager"):
        assert model(random_tensor((1, 3, 12, 4), torch.float32, seed=10), 5).shape == (1, 3, 12, 4)
        assert model(torch.zeros(0, 3, 8, 8), torch.zeros(0)).shape == (0, 3, 8, 8)


# --------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("overrides, error, argument", [
    (dict(num_groups=5), ValueError, "num_groups=5"),
    (dict(attention_resolutions=(2,)), ValueError, "attention_resolutions"),
    (dict(num_head_channels=8), ValueError, "head dim"),
    (dict(num_heads=3), ValueError, "num_heads=3"),
    (dict(image_size=9), ValueError, "image_size=9"),
    (dict(channel_mult=()), ValueError, "channel_mult"),
    (dict(channel_mult=3), TypeError, "channel_mult"),
    (dict(base_channels=0), ValueError, "base_channels=0"),
    (dict(num_classes=0), ValueError, "num_classes=0"),
    (dict(dropout=1.5), ValueError, "dropout"),
    (dict(num_res_blocks=1.0), TypeError, "num_res_blocks"),
    (dict(num_res_blocks=0), ValueError, "num_res_blocks=0"),
    (dict(in_channels=-3), ValueError, "in_channels=-3"),
    (dict(out_channels=0), ValueError, "out_channels=0"),
    (dict(num_groups=0), ValueError, "num_groups=0"),
    (dict(num_groups=2.0), TypeError, "num_groups"),
    (dict(num_heads=0), ValueError, "num_heads=0"),
    (dict(num_heads=2, num_head_channels="16"), TypeError, "num_head_channels"),
    (dict(image_size=2.5), TypeError, "image_size"),
    (dict(num_classes=10.0), TypeError, "num_classes"),
    (dict(channel_mult=(1, 0)), ValueError, "channel_mult"),
    (dict(norm_eps=-1.0), ValueError, "norm_eps"),
    (dict(attention_resolutions=(4.0,)), TypeError, "attention_resolutions"),
])
def test_constructor_rejects_bad_configurations(overrides, error, argument):
    with pytest.raises(error, match=argument):
        UNet(**{**TINY, **overrides})


@pytest.mark.parametrize("make, error, argument", [
    (lambda: unet_module.ResBlock(0, 4, 8, 0.0, 1, 1e-5), ValueError, "in_channels=0"),
    (lambda: unet_module.ResBlock(4, 6, 8, 0.0, 4, 1e-5), ValueError, "num_groups=4 must divide out_channels=6"),
    (lambda: unet_module.ResBlock(4, 4, -8, 0.0, 1, 1e-5), ValueError, "temb_channels=-8"),
    (lambda: unet_module.ResBlock(4, 4, 8, 0.0, 0, 1e-5), ValueError, "num_groups=0"),
    (lambda: unet_module.ResBlock(4, 4, 8, 0.0, 1, -1.0), ValueError, "eps"),
    (lambda: unet_module.ResBlock(4, 4, 8, 2.0, 1, 1e-5), ValueError, "dropout"),
    (lambda: AttentionBlock(32, 3, 4, 1e-5), ValueError, "num_heads=3"),
    (lambda: AttentionBlock(32, None, 4, 1e-5), TypeError, "num_heads"),
    (lambda: AttentionBlock(32, 2, 5, 1e-5), ValueError, "num_groups=5 must divide channels=32"),
    (lambda: AttentionBlock(0, 1, 1, 1e-5), ValueError, "channels=0"),
    (lambda: unet_module.Downsample(0), ValueError, "channels=0"),
    (lambda: unet_module.Upsample(2.0), TypeError, "channels"),
    (lambda: timestep_embedding(torch.zeros(2), 0), ValueError, "dim=0"),
    (lambda: timestep_embedding(torch.zeros(2), 8, max_period=-1.0), ValueError, "max_period"),
])
def test_block_constructors_reject_bad_widths_and_counts(make, error, argument):
    """The blocks used to accept zero/negative widths and non-dividing group counts and fail later inside torch."""
    with pytest.raises(error, match=argument):
        make()


@pytest.mark.parametrize("x, error, argument", [
    ("image", TypeError, "x must be a torch.Tensor"),
    (torch.zeros(2, 4, 8, 8), ValueError, "in_channels=3"),
    (torch.zeros(2, 3, 8), ValueError, "x must be"),
    (torch.zeros(2, 3, 8, 7), ValueError, "multiples of"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.int64), TypeError, "x must have a floating-point dtype"),
])
def test_forward_rejects_bad_images(x, error, argument):
    with pytest.raises(error, match=argument):
        tiny_unet()(x, 1)


@pytest.mark.parametrize("timestep, error", [
    (torch.tensor([1, 2, 3]), ValueError),
    (torch.zeros(2, 1), ValueError),
    (torch.tensor([True, False]), TypeError),
    ("1", TypeError),
])
def test_forward_rejects_bad_timesteps(timestep, error):
    with pytest.raises(error, match="timestep"):
        tiny_unet()(torch.zeros(2, 3, 8, 8), timestep)


@pytest.mark.parametrize("labels, error, argument", [
    (torch.tensor([0, 5]), ValueError, r"class_labels must lie in \[0, num_classes=4\]"),
    (torch.tensor([-1, 0]), ValueError, "class_labels must lie"),
    (torch.tensor([0.0, 1.0]), TypeError, "class_labels must have an integer dtype"),
    (torch.tensor([0, 1, 2]), ValueError, r"class_labels must have shape \[batch\]"),
    ([0, 1], TypeError, "class_labels must be a torch.Tensor"),
])
def test_forward_rejects_bad_class_labels(labels, error, argument):
    with pytest.raises(error, match=argument):
        tiny_unet(num_classes=4)(torch.zeros(2, 3, 8, 8), 1, labels)


def test_forward_rejects_class_labels_for_an_unconditional_network():
    with pytest.raises(ValueError, match="class_labels were given but the network is unconditional"):
        tiny_unet()(torch.zeros(2, 3, 8, 8), 1, torch.tensor([0, 1]))


# --------------------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cifar_unet_on_the_gpu_triton_matches_eager_and_float64(dtype):
    torch.manual_seed(0)
    model = UNet(base_channels=64, channel_mult=(1, 2, 2), attention_resolutions=(16,), dropout=0.0,
                 image_size=32, num_classes=10).cuda()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator).cuda())
    x = torch.randn(4, 3, 32, 32, generator=generator).cuda()
    t, labels = torch.tensor([1, 250, 500, 999]).cuda(), torch.tensor([0, 3, 9, 10]).cuda()
    weights = torch.randn(4, 3, 32, 32, generator=generator, dtype=torch.float64).cuda()
    reference_model = copy.deepcopy(model).double()
    reference = oracle_unet(reference_model, x.double(), t, labels)
    reference_grads = torch.autograd.grad((reference * weights).sum(), list(reference_model.parameters()))
    results = {}
    for impl in ("eager", "triton"):
        with use_impl(impl), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            results[impl] = output_and_grads(model, x, t, labels, weights)
    (eager, eager_grads), (out, grads) = results["eager"], results["triton"]
    scale = 4 if dtype == torch.bfloat16 else 2  # tf32 / bf16 convolutions differ run to run in cuDNN's choice
    assert (out.double() - reference).abs().max() <= scale * (eager.double() - reference).abs().max() + 1e-4
    for (name, _), grad, ref, eager_grad in zip(model.named_parameters(), grads, reference_grads, eager_grads):
        bound = scale * (eager_grad.double() - ref).abs().max() + 1e-4 * max(1.0, ref.abs().max().item())
        assert (grad.double() - ref).abs().max() <= bound, name
    assert math.isfinite(out.float().sum().item())
