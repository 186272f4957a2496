"""The project's test helpers: a thin re-export of the public testing API, :mod:`genkernels.bench.correctness`
(the tolerance rule, the shape and layout catalogs, the special-value catalog), so the tests use what users get.

Tolerance rule: compute the reference in fp64, then require the NaN/Inf pattern of the reference and
    max|kernel - ref| <= 2 * max|eager_same_dtype - ref| + atol_floor(dtype) * max(1, max|ref|)
so a kernel may be at most twice as wrong as plain PyTorch in the same dtype.
"""
from genkernels.bench.correctness import (  # noqa: F401
    ATOL_FLOOR,
    DTYPES,
    LAYOUTS,
    PER_SAMPLE_LAYOUTS,
    SPECIAL_VALUE_KINDS,
    Layout,
    as_layout,
    assert_close_to_reference,
    assert_standard_normal,
    check_function,
    layouts_for,
    max_abs_error,
    random_tensor,
    special_values,
    with_special_values,
)


class LaunchRecorder:
    """Stands in for a Triton kernel (``monkeypatch.setattr(module, "_name_kernel", LaunchRecorder(kernel))``):
    records every ``kernel[grid](*args, **kwargs)`` call as ``(grid, args, kwargs)``, then runs it, so a test can
    check the configuration a launcher really picks."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


def tiny_unet2d(**kwargs):
    """A small random diffusers ``UNet2DModel`` (8x8 images, two levels, one attention level), seeded; ``kwargs``
    override its config. diffusers is imported here, on first use."""
    import diffusers
    import torch

    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                 attention_head_dim=8, **kwargs)
