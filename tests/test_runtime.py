"""Implementation selection (kernels/runtime.py) and launch helpers (kernels/launch.py)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from genkernels.kernels import use_impl
from genkernels.kernels.launch import (
    MAX_INNER_DIMS,
    batch_chunks,
    per_sample_layout,
)
from genkernels.kernels import runtime
from genkernels.kernels.runtime import choose_impl, default_impl

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


def _on(device: str, dtype=torch.float32) -> dict:
    """choose_impl's tensors argument: one tensor ``x`` on ``device`` (a stand-in for "cuda")."""
    return {"x": _FakeCuda(dtype) if device == "cuda" else torch.empty(2, dtype=dtype, device=device)}


class _FakeCuda:
    """Stands in for a CUDA tensor (device and dtype only) on machines without a GPU."""

    def __init__(self, dtype):
        self.device, self.dtype = CUDA, dtype

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point


@pytest.fixture
def fake_tensors(monkeypatch):
    """Let choose_impl treat _FakeCuda objects as tensors."""
    monkeypatch.setattr(runtime.torch, "Tensor", (torch.Tensor, _FakeCuda))


def test_environment_variable_sets_the_process_default(monkeypatch, fake_tensors):
    monkeypatch.setenv("GENKERNELS_IMPL", "eager")
    assert choose_impl("auto", "op", _on("cuda")) == "eager"
    with use_impl("triton"):
        assert choose_impl("auto", "op", _on("cuda")) == "triton"
    assert choose_impl("triton", "op", _on("cuda")) == "triton", "an explicit impl beats the environment"


def test_unknown_impl_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="impl='fast'.*auto, triton, eager"):
        choose_impl("fast", "op", _on("cpu"))
    with pytest.raises(ValueError, match="use_impl"):
        with use_impl("cuda"):
            pass
    monkeypatch.setenv("GENKERNELS_IMPL", "turbo")
    with pytest.raises(ValueError, match="GENKERNELS_IMPL"):
        default_impl()


def test_auto_picks_triton_on_cuda_and_meta_and_eager_on_cpu_without_interpreter(monkeypatch, fake_tensors):
    monkeypatch.delenv("GENKERNELS_IMPL", raising=False)
    assert choose_impl("auto", "op", _on("cuda")) == "triton"
    assert choose_impl("auto", "op", _on("meta")) == "triton", "meta tensors take the registered op's fake"
    monkeypatch.setattr(runtime, "_INTERPRETED_AT_IMPORT", False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert choose_impl("auto", "op", _on("cpu")) == "eager"
    monkeypatch.setattr(runtime, "_INTERPRETED_AT_IMPORT", True)
    assert choose_impl("auto", "op", _on("cpu")) == "triton"


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(runtime, "_INTERPRETED_AT_IMPORT", False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="my_op: impl='triton' cannot run these inputs: .*on cpu.*CUDA device"):
        choose_impl("triton", "my_op", _on("cpu"))
    assert choose_impl("eager", "my_op", _on("cpu")) == "eager"


def test_float64_runs_the_reference_under_auto_and_is_refused_by_triton(monkeypatch, fake_tensors):
    monkeypatch.delenv("GENKERNELS_IMPL", raising=False)
    assert choose_impl("auto", "op", _on("cuda", torch.float64)) == "eager"
    with pytest.raises(ValueError, match=r"op: impl='triton'.*x is torch.float64"):
        choose_impl("triton", "op", _on("cuda", torch.float64))


def test_every_reason_is_listed(monkeypatch):
    monkeypatch.setattr(runtime, "_INTERPRETED_AT_IMPORT", False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError) as raised:
        choose_impl("triton", "op", {"x": torch.empty(2, dtype=torch.float64), "y": None},
                    ["head_dim=300 is above 256"])
    message = str(raised.value)
    assert "(1) the tensors are on cpu" in message and "(2) head_dim=300" in message and "(3) x is" in message
    assert choose_impl("auto", "op", {"x": torch.empty(2)}, ["head_dim=300 is above 256"]) == "eager"


def test_interpreter_switched_on_after_import_is_explained():
    """TRITON_INTERPRET=1 set after genkernels was imported cannot take effect: the message says so and what to
    do, instead of triton's "0 active drivers"."""
    script = textwrap.dedent("""
        import os, warnings, torch
        import genkernels.kernels as gk
        os.environ["TRITON_INTERPRET"] = "1"
        x = torch.randn(4, 3)
        try:
            gk.bias_act(x, impl="triton")
        except ValueError as error:
            print("ERROR:", error)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = gk.bias_act(x, act="relu")
        print("AUTO:", bool(torch.equal(y, torch.relu(x) * 2 ** 0.5)), [str(w.message) for w in caught])
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    error_line = next(line for line in run.stdout.splitlines() if line.startswith("ERROR:"))
    assert "after genkernels was imported" in error_line and "before the process imports" in error_line
    auto_line = next(line for line in run.stdout.splitlines() if line.startswith("AUTO:"))
    assert auto_line.startswith("AUTO: True") and "after genkernels was imported" in auto_line


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
