"""The DDPM U-Net (models/unet.py): triton vs eager vs a float64 functional oracle written with torch's own layers
(``F.group_norm``, ``F.conv2d``, ``F.scaled_dot_product_attention``), outputs and every parameter's gradient; the
architecture against the published DDPM CIFAR-10 model; conditioning, input forms and bad input."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.models.embeddings import get_timestep_embedding
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
    (dict(num_head_channels=64), ValueError, "num_head_channels=64"),
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
    (dict(flip_sin_to_cos=1), TypeError, "flip_sin_to_cos"),
    (dict(freq_shift=float("nan")), ValueError, "freq_shift"),
    (dict(freq_shift="1"), TypeError, "freq_shift"),
    (dict(freq_shift=8), ValueError, "freq_shift=8"),  # base_channels // 2 - freq_shift = 0
    (dict(downsample_padding=2), ValueError, "downsample_padding=2"),
    (dict(downsample_padding=1.0), TypeError, "downsample_padding"),
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
# diffusers UNet2DModel converters

# The DDPM checkpoints' UNet2DModel configuration (google/ddpm-cifar10-32), and tiny versions of it.
DDPM_CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                    layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                                          "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
                    norm_num_groups=32, norm_eps=1e-6, freq_shift=1, flip_sin_to_cos=False, downsample_padding=0,
                    time_embedding_type="positional", center_input_sample=False, act_fn="silu",
                    mid_block_scale_factor=1)
DIFFUSERS_TINY = {**DDPM_CIFAR10, "sample_size": 16, "block_out_channels": (32, 64), "layers_per_block": 1,
                  "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
                  "up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "norm_num_groups": 8}
DIFFUSERS_CONFIGS = {
    "ddpm": DIFFUSERS_TINY,
    # the other options a UNet2DModel of this family takes: cosines first, no frequency shift, symmetric
    # downsampling padding, a fixed head dim (two heads), attention at the first level, class labels, 3 levels
    "options": {**DIFFUSERS_TINY, "block_out_channels": (32, 32, 64), "layers_per_block": 2,
                "down_block_types": ("AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D"), "attention_head_dim": 16,
                "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "num_class_embeds": 5,
                "norm_eps": 1e-5},
    # head dim 8 (diffusers' default attention_head_dim): outside the attention kernels' range, so the attention
    # runs the PyTorch reference under impl="auto"
    "head_dim_8": {**DIFFUSERS_TINY, "attention_head_dim": 8},
}


def tiny_diffusers_unet(config: dict, seed: int = 0) -> UNet2DModel:
    """A diffusers UNet2DModel whose weights are perturbed (its zero-free init would leave little to compare)."""
    torch.manual_seed(seed)
    model = UNet2DModel(**config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def diffusers_output_and_grads(model, x, t, labels, weights):
    out = model(x, t, class_labels=labels).sample
    loss = (out.double() * weights).sum()
    names, parameters = zip(*model.named_parameters())
    return out, dict(zip(names, torch.autograd.grad(loss, parameters)))


def as_unet_grads(grads: dict, config) -> dict:
    """diffusers' gradients under our parameter names: the converter applied to a state_dict of gradients."""
    return dict(UNet.from_diffusers(grads, config=config).named_parameters())


def unet_output_and_grads(model, x, t, labels, weights):
    out, grads = output_and_grads(model, x, t, labels, weights)
    return out, dict(zip([name for name, _ in model.named_parameters()], grads))


def compare_with_diffusers(name: str, impl: str, batch: int = 2, side: int = 16, grads: bool = True):
    config = DIFFUSERS_CONFIGS[name]
    theirs = tiny_diffusers_unet(config)
    ours = UNet.from_diffusers(theirs)
    x = random_tensor((batch, 3, side, side), torch.float32, seed=50)
    t = torch.tensor([3, 917][:batch])
    labels = torch.tensor([0, 4][:batch]) if config.get("num_class_embeds") else None
    weights = random_tensor((batch, 3, side, side), torch.float64, seed=51)
    reference, reference_grads = diffusers_output_and_grads(copy.deepcopy(theirs).double(), x.double(), t, labels,
                                                            weights)
    baseline, baseline_grads = diffusers_output_and_grads(theirs, x, t, labels, weights)
    with use_impl(impl):
        if not grads:
            with torch.no_grad():
                assert_close_to_reference(ours(x, t, labels), reference, baseline, "output")
            return ours
        out, grads = unet_output_and_grads(ours, x, t, labels, weights)
    assert_close_to_reference(out, reference, baseline, "output")
    reference_grads = as_unet_grads(reference_grads, theirs.config)
    baseline_grads = as_unet_grads(baseline_grads, theirs.config)
    assert grads.keys() == reference_grads.keys()
    for key, grad in grads.items():
        assert_close_to_reference(grad, reference_grads[key], baseline_grads[key], f"grad {key}")
    return ours


@pytest.mark.parametrize("name", list(DIFFUSERS_CONFIGS))
def test_from_diffusers_matches_unet2dmodel_output_and_gradients(name):
    ours = compare_with_diffusers(name, "eager")
    if name == "ddpm":
        assert ours.downsample_padding == 0 and not ours.flip_sin_to_cos and ours.freq_shift == 1
        assert ours.norm_eps == 1e-6 and ours.attention_levels == {1}
        assert [block.num_heads for block in ours.modules() if isinstance(block, AttentionBlock)] == [1] * 4
    if name == "options":
        assert ours.num_classes == 4 and ours.attention_levels == {0} and ours.channel_mult == (1, 1, 2)


def test_triton_impl_of_a_converted_unet_matches_diffusers():
    config = {**DIFFUSERS_TINY, "sample_size": 8, "block_out_channels": (16, 32), "norm_num_groups": 4}
    DIFFUSERS_CONFIGS["triton_tiny"] = config
    try:
        # the output only: the Triton backward of the same layers is checked in
        # test_triton_and_eager_match_a_float64_oracle_in_output_and_every_parameter_gradient
        compare_with_diffusers("triton_tiny", "triton", batch=1, side=8, grads=False)
    finally:
        del DIFFUSERS_CONFIGS["triton_tiny"]


def test_ddpm_cifar10_checkpoint_configuration_converts_to_the_published_architecture():
    theirs = UNet2DModel(**DDPM_CIFAR10)
    ours = UNet.from_diffusers(theirs)
    assert (ours.base_channels, ours.channel_mult, ours.num_res_blocks) == (128, (1, 2, 2, 2), 2)
    assert ours.attention_levels == {1} and ours.image_size == 32 and ours.downsample_padding == 0
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) == ddpm_parameter_count(128, (1, 2, 2, 2), 2, {1})
    x = random_tensor((1, 3, 32, 32), torch.float32, seed=52)
    with torch.no_grad(), use_impl("eager"):
        expected = theirs(x, 500).sample
        out = ours(x, 500)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides", [
    dict(), dict(num_classes=3, downsample_padding=0), dict(flip_sin_to_cos=True, freq_shift=0.5),
    dict(num_heads=2, attention_resolutions=(4,)), dict(num_head_channels=8, channel_mult=(1, 2, 2)),
], ids=["default", "classes-padding0", "embedding", "fixed-heads", "head-dim-8"])
def test_unet_to_diffusers_to_unet_round_trips_bit_exactly(overrides):
    ours = tiny_unet(seed=53, **overrides)
    theirs = ours.to_diffusers()
    assert isinstance(theirs, UNet2DModel) and theirs.training == ours.training
    back = UNet.from_diffusers(theirs)
    state, again = ours.state_dict(), back.state_dict()
    assert state.keys() == again.keys()
    for key in state:
        assert torch.equal(state[key], again[key]), key
    assert back.attention_levels == ours.attention_levels and back.downsample_padding == ours.downsample_padding
    from_state = UNet.from_diffusers(ours.to_diffusers_state_dict(), config=ours.diffusers_config())
    assert all(torch.equal(state[key], tensor) for key, tensor in from_state.state_dict().items())
    # and diffusers -> ours -> diffusers
    their_state, their_again = theirs.state_dict(), back.to_diffusers().state_dict()
    assert their_state.keys() == their_again.keys()
    assert all(torch.equal(their_state[key], their_again[key]) for key in their_state)


def test_to_diffusers_gives_a_unet2dmodel_with_our_outputs():
    ours = tiny_unet(seed=54, num_classes=3, downsample_padding=0, flip_sin_to_cos=True, freq_shift=0)
    ours.eval()
    theirs = ours.to_diffusers()
    x = random_tensor((2, 3, 8, 8), torch.float32, seed=55)
    t, labels = torch.tensor([7, 400]), torch.tensor([1, 3])
    with torch.no_grad(), use_impl("eager"):
        expected = ours(x, t, labels)
    reference = copy.deepcopy(theirs).double()(x.double(), t, class_labels=labels).sample
    assert_close_to_reference(theirs(x, t, class_labels=labels).sample.detach(), reference, expected)
    assert not theirs.training and theirs.dtype == torch.float32


def test_from_diffusers_keeps_dtype_and_mode_and_copies_the_weights():
    theirs = tiny_diffusers_unet(DIFFUSERS_TINY).to(torch.bfloat16).train()
    ours = UNet.from_diffusers(theirs)
    assert ours.training and all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert ours.conv_in.weight.data_ptr() != theirs.conv_in.weight.data_ptr()
    assert torch.equal(ours.conv_in.weight, theirs.conv_in.weight)


@pytest.mark.parametrize("flip_sin_to_cos, freq_shift, dim", [(False, 1, 32), (True, 0, 32), (True, 1, 33),
                                                              (False, 0.5, 16)])
def test_timestep_embedding_options_give_diffusers_embedding_bit_for_bit(flip_sin_to_cos, freq_shift, dim):
    t = torch.tensor([0, 1, 17, 999, 12345])
    expected = get_timestep_embedding(t, dim, flip_sin_to_cos=flip_sin_to_cos, downscale_freq_shift=freq_shift)
    assert torch.equal(timestep_embedding(t, dim, flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift), expected)


def test_downsample_padding_0_pads_bottom_and_right_as_tensorflow_same():
    torch.manual_seed(56)
    down = unet_module.Downsample(4, padding=0)
    x = random_tensor((2, 4, 6, 8), torch.float32, seed=57)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    assert down(x).shape == (2, 4, 3, 4)
    torch.testing.assert_close(down(x), expected, rtol=0, atol=0)
    assert unet_module.Downsample(4).conv.padding == (1, 1)


@pytest.mark.parametrize("key, value", [
    ("center_input_sample", True),
    ("time_embedding_type", "fourier"),
    ("time_embedding_dim", 64),
    ("mid_block_type", None),
    ("mid_block_scale_factor", 2),
    ("downsample_type", "resnet"),
    ("upsample_type", "resnet"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("add_attention", False),
    ("class_embed_type", "timestep"),
    ("act_fn", "gelu"),
    ("block_out_channels", (32, 48)),
    ("down_block_types", ("DownBlock2D", "CrossAttnDownBlock2D")),
    ("down_block_types", ("DownBlock2D",)),
    ("up_block_types", ("UpBlock2D", "AttnUpBlock2D")),
    ("downsample_padding", 2),
    ("norm_num_groups", 5),
    ("attn_norm_num_groups", 4),
    ("attention_head_dim", 24),
    ("num_class_embeds", 1),
    ("sample_size", 15),
    ("sample_size", (16, 8)),
    ("layers_per_block", 0),
])
def test_from_diffusers_rejects_configs_unet_cannot_express(key, value):
    with pytest.raises(ValueError, match=key):
        UNet.from_diffusers({}, config={**DIFFUSERS_TINY, key: value})


def test_from_diffusers_rejects_a_unet2dmodel_it_cannot_express():
    with pytest.raises(ValueError, match="center_input_sample"):
        UNet.from_diffusers(UNet2DModel(**{**DIFFUSERS_TINY, "center_input_sample": True}))


@pytest.mark.parametrize("make, error, argument", [
    (lambda: UNet.from_diffusers(nn.Conv2d(3, 3, 1)), TypeError, "Conv2d"),
    (lambda: UNet.from_diffusers("google/ddpm-cifar10-32"), TypeError, "str"),
    (lambda: UNet.from_diffusers(UNet2DModel(**DIFFUSERS_TINY).state_dict()), ValueError, "config is required"),
    (lambda: UNet.from_diffusers(UNet2DModel(**DIFFUSERS_TINY), config=DIFFUSERS_TINY), ValueError,
     "config must be None"),
    (lambda: UNet.from_diffusers({}, config=[1]), TypeError, "config"),
    (lambda: UNet.from_diffusers({}, config=DIFFUSERS_TINY), ValueError, "has no 'time_embedding.linear_1.weight'"),
    (lambda: UNet.from_diffusers({**UNet2DModel(**DIFFUSERS_TINY).state_dict(), "extra.weight": torch.zeros(1)},
                                 config=DIFFUSERS_TINY), ValueError, "extra.weight"),
    (lambda: UNet.from_diffusers(UNet2DModel(**DIFFUSERS_TINY).state_dict(),
                                 config={**DIFFUSERS_TINY, "in_channels": 4}), ValueError,
     "does not match its config"),
])
def test_from_diffusers_rejects_bad_arguments(make, error, argument):
    with pytest.raises(error, match=argument):
        make()


def test_to_diffusers_rejects_a_fixed_head_count_over_attention_blocks_of_different_widths():
    model = tiny_unet(num_heads=2, attention_resolutions=(8, 4))  # widths 16 and 32, two heads each
    for convert in (model.diffusers_config, model.to_diffusers):
        with pytest.raises(ValueError, match="num_heads=2"):
            convert()


# --------------------------------------------------------------------------------------------------------------
# constructor errors that say what to change (issue 13 item 6)


def test_a_too_small_unet_names_the_options_to_change():
    """It used to say only ``num_head_channels=64 must divide the attention width 32``."""
    small = dict(TINY, num_head_channels=64)
    with pytest.raises(ValueError, match=r"num_head_channels=64 must divide the width of the attention blocks at "
                                         r"level 1 \(4x4 for image_size=8\) and the middle block's attention .*32 "
                                         r"channels wide \(base_channels=16 x channel_mult\[1\]=2\): set "
                                         r"num_head_channels to a divisor of 32 \(e\.g\. 32\), or set num_heads, or "
                                         r"change base_channels / channel_mult"):
        UNet(**small)
    with pytest.raises(ValueError, match=r"at level 0 \(8x8 for image_size=8\), 16 channels wide .* or leave 8 out "
                                         r"of attention_resolutions=\(8,\)"):
        UNet(**{**small, "attention_resolutions": (8,), "num_head_channels": 32})
    with pytest.raises(ValueError, match=r"num_heads=3 must divide the width of .*: set num_heads to a divisor of 32 "
                                         r"\(e\.g\. 2\)"):
        UNet(**{**TINY, "num_heads": 3})


def test_every_constructor_argument_is_checked_before_any_layer_is_built(monkeypatch):
    def no_layers(*args, **kwargs):
        raise AssertionError("a layer was built before the arguments were checked")

    monkeypatch.setattr(unet_module, "ResBlock", no_layers)
    monkeypatch.setattr(unet_module, "AttentionBlock", no_layers)
    for overrides, argument in ((dict(num_head_channels=64), "num_head_channels=64"), (dict(num_heads=3), "num_heads"),
                                (dict(num_groups=5), "num_groups"), (dict(downsample_padding=2), "downsample_padding"),
                                (dict(freq_shift=8), "freq_shift")):
        with pytest.raises(ValueError, match=argument):
            UNet(**{**TINY, **overrides})


def test_head_dims_outside_the_kernels_range_run_the_pytorch_attention():
    """head dim 8 (a diffusers default) used to be refused; it now runs the attention's PyTorch reference under
    impl="auto" and names the reason under impl="triton"."""
    model = tiny_unet(num_head_channels=8)
    assert [block.num_heads for block in model.modules() if isinstance(block, AttentionBlock)] == [4] * 4
    x = random_tensor((1, 3, 8, 8), torch.float32, seed=58)
    reference = oracle_unet(copy.deepcopy(model).double(), x.double(), torch.tensor([20.0], dtype=torch.float64))
    with use_impl("eager"):
        assert_close_to_reference(model(x, 20), reference, reference.float())
    block = model.mid.attentions[0]
    h = random_tensor((1, 32, 4, 4), torch.float32, seed=59)
    expected = oracle_attention(copy.deepcopy(block).double(), h.double())
    assert_close_to_reference(block(h), expected, expected.float())  # impl="auto": the PyTorch attention
    with use_impl("triton"), pytest.raises(ValueError, match="head_dim"):
        block(h)


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
