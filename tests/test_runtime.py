"""Implementation selection (kernels/runtime.py) and launch helpers (kernels/launch.py)."""
import pytest
import torch

from genkernels.kernels import use_impl
from genkernels.kernels.launch import (
    MAX_INNER_DIMS,
    batch_chunks,
    elementwise_block,
    elementwise_block_configs,
    per_sample_layout,
)
from genkernels.kernels.runtime import default_impl, resolve_impl

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def test_use_impl_nests_and_restores(monkeypatch):
    monkeypatch.delenv("GENKERNELS_IMPL", raising=False)
    assert default_impl() == "auto"
    with use_impl("eager"):
        assert default_impl() == "eager"
        with use_impl("triton"):
            assert default_impl() == "triton"
        assert default_impl() == "eager"
    assert default_impl() == "auto"


def test_use_impl_restores_after_an_exception(monkeypatch):
    monkeypatch.delenv("GENKERNELS_IMPL", raising=False)
    with pytest.raises(RuntimeError):
        with use_impl("eager"):
            raise RuntimeError("boom")
    assert default_impl() == "auto"


def test_environment_variable_sets_the_process_default(monkeypatch):
    monkeypatch.setenv("GENKERNELS_IMPL", "eager")
    assert resolve_impl("auto", CUDA, "op") == "eager"
    with use_impl("triton"):
        assert resolve_impl("auto", CUDA, "op") == "triton"
    assert resolve_impl("triton", CUDA, "op") == "triton", "an explicit impl beats the environment"


def test_unknown_impl_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="impl='fast'.*auto, triton, eager"):
        resolve_impl("fast", CPU, "op")
    with pytest.raises(ValueError, match="use_impl"):
        with use_impl("cuda"):
            pass
    monkeypatch.setenv("GENKERNELS_IMPL", "turbo")
    with pytest.raises(ValueError, match="GENKERNELS_IMPL"):
        default_impl()


def test_auto_picks_triton_on_cuda_and_eager_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("GENKERNELS_IMPL", raising=False)
    assert resolve_impl("auto", CUDA, "op") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_impl("auto", CPU, "op") == "eager"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl("auto", CPU, "op") == "triton"


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="my_op: impl='triton' needs tensors on a CUDA device.*device cpu"):
        resolve_impl("triton", CPU, "my_op")
    assert resolve_impl("eager", CPU, "my_op") == "eager"


def test_elementwise_blocks_cover_the_run_and_stay_in_range():
    for numel in (1, 15, 16, 17, 1000, 4096, 10**7):
        block, warps = elementwise_block(numel)
        assert block & (block - 1) == 0 and 16 <= block <= 4096 and 1 <= warps <= 8
        assert block >= min(numel, 4096)
    assert (4096, 8) in elementwise_block_configs() and (16, 1) in elementwise_block_configs()


def test_batch_chunks_respect_the_grid_limit():
    assert list(batch_chunks(5, limit=2)) == [(0, 2), (2, 2), (4, 1)]
    assert list(batch_chunks(0)) == []


def _walk(layout, tensor_index, tensor):
    """Gather every element through the layout, as a kernel would, in the layout's inner order."""
    sizes = layout.inner_sizes
    batch_stride, *inner_strides = layout.strides[tensor_index]
    flat = tensor.as_strided((tensor.untyped_storage().nbytes() // tensor.element_size(),), (1,), 0)
    values = []
    for b in range(layout.batch):
        for i in range(layout.inner_numel):
            coords, rest = [], i
            for size in reversed(sizes):
                coords.append(rest % size)
                rest //= size
            offset = tensor.storage_offset() + b * batch_stride + sum(
                c * s for c, s in zip(reversed(coords), inner_strides))
            values.append(flat[offset].item())
    return torch.tensor(values)


@pytest.mark.parametrize("make", [
    lambda: torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5),
    lambda: torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
    lambda: torch.arange(4 * 6 * 5.0).reshape(4, 6, 5)[::2, 1::2],
    lambda: torch.arange(2 * 3 * 4 * 5 * 2 * 3.0).reshape(2, 3, 4, 5, 2, 3).permute(0, 5, 3, 1, 4, 2),
])
def test_per_sample_layout_visits_each_element_once_in_step_with_the_output(make):
    source = make()
    out = torch.empty_like(source)
    layout, (out_walked, source_walked) = per_sample_layout([out, source])
    assert len(layout.inner_sizes) == MAX_INNER_DIMS
    out_walked.copy_(source_walked)
    # walking both tensors in the layout's order pairs up equal logical elements
    pairs_out = _walk(layout, 0, out)
    pairs_in = _walk(layout, 1, source_walked)
    torch.testing.assert_close(pairs_out, pairs_in, rtol=0, atol=0)
    assert sorted(pairs_in.tolist()) == sorted(source.flatten().tolist())


def test_per_sample_layout_fast_path_only_when_every_tensor_is_one_run():
    x = torch.randn(3, 4, 5)
    layout, _ = per_sample_layout([torch.empty_like(x), x])
    assert layout.inner_contiguous and layout.inner_numel == 20
    layout, _ = per_sample_layout([torch.empty_like(x), x.transpose(1, 2).contiguous().transpose(1, 2)])
    assert not layout.inner_contiguous
