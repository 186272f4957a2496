"""The Hugging Face model cases (genkernels.bench.cases.hf) and the key-padding-mask and dropout attention cases
(genkernels.bench.cases.attention) at their CPU sizes, genkernels' kernels in Triton's interpreter.

Each case is held to something it does not compute itself: the model configurations to their published parameter
counts, the patched providers to the unpatched model of the same weights, the attention rows' reference to torch's
own SDPA, and the dropout rows to the eager path drawing the same mask.
"""
import pytest
import torch

from genkernels import kernels
from genkernels.bench.cases import attention as attention_cases
from genkernels.bench.cases import hf
from genkernels.bench.registry import all_cases

CPU = torch.device("cpu")


def _case(pattern: str):
    (case,) = all_cases("cpu", pattern)
    return case


def _record_calls(monkeypatch, name: str) -> list:
    """Count the calls of ``genkernels.kernels.<name>`` (what the patched models call) while running them."""
    calls = []
    original = getattr(kernels, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, name, spy)
    return calls


def _max_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return (output.double() - reference.double()).abs().max().item()


def test_full_size_models_have_the_published_parameter_counts():
    meta = torch.device("meta")
    unet = sum(p.numel() for p in hf._unet("ddpm-cifar10-32", meta).parameters())
    gpt2 = sum(p.numel() for p in hf._gpt2("gpt2", meta).parameters())
    assert round(unet / 1e5) == 357  # Ho et al. 2020's CIFAR-10 model: 35.7M
    assert round(gpt2 / 1e6) == 124  # GPT-2 small: 124M (the output layer shares the token embedding)


def test_unet_training_providers_take_their_first_step_from_the_same_weights(monkeypatch):
    calls = _record_calls(monkeypatch, "group_norm_silu")
    workload = _case("hf.unet_train*").setup(CPU)
    torch.manual_seed(3)  # the step's noise and timesteps
    eager = workload.providers["eager"]()
    assert not calls
    torch.manual_seed(3)
    patched = workload.providers["triton"]()
    assert calls
    torch.testing.assert_close(patched, eager, rtol=1e-4, atol=1e-5)


def test_unet_ddim_case_patched_loop_follows_the_unpatched_fp32_loop(monkeypatch):
    calls = _record_calls(monkeypatch, "group_norm_silu")
    workload = _case("hf.unet_sample*").setup(CPU)
    reference = workload.reference()
    assert torch.equal(workload.providers["eager"](), reference)  # on the CPU: the same fp32 weights, unpatched
    assert not calls
    patched = workload.providers["triton"]()
    assert calls
    assert _max_error(patched, reference) < 1e-4


def test_gpt2_generate_case_patched_tokens_equal_the_unpatched_ones(monkeypatch):
    calls = _record_calls(monkeypatch, "decode_attention")
    case = _case("hf.gpt2_generate*")
    workload = case.setup(CPU)
    eager = workload.providers["eager"]()
    assert not calls
    patched = workload.providers["triton"]()
    assert calls
    assert eager.shape == (case.params["batch"], case.params["prompt"] + case.params["new_tokens"])
    assert torch.equal(patched, eager)


def test_key_padding_mask_keeps_each_sequences_first_tokens():
    mask = attention_cases._key_padding_mask(torch.tensor([3, 5]), 6, CPU)
    expected = torch.tensor([[True, True, True, False, False, False], [True] * 5 + [False]])
    assert mask.dtype == torch.bool and torch.equal(mask, expected[:, None, None, :])


@pytest.mark.parametrize("which", ["forward", "fwd_bwd"])
def test_key_padding_rows_reference_is_torch_sdpa_and_every_provider_follows_it(which):
    workload = _case(f"attention.sdpa_{which}[*key_padding*").setup(CPU)
    reference = workload.reference()
    errors = {name: _max_error(workload.providers[name](), reference) for name in ("sdpa_math", "eager", "triton")}
    assert errors["sdpa_math"] < 1e-2, errors  # torch's SDPA in bf16: bf16 rounding away from the fp64 reference
    assert errors["eager"] < 1e-2, errors
    assert errors["triton"] <= 2 * errors["eager"] + 1e-2, errors


@pytest.mark.parametrize("which", ["forward", "fwd_bwd"])
def test_dropout_rows_compare_only_the_calls_that_draw_the_reference_mask(which):
    workload = _case(f"attention.sdpa_{which}[*dropout*").setup(CPU)
    reference = workload.reference()
    # another mask would be an O(1) error (a tenth of the weights dropped or kept differently)
    errors = {name: _max_error(workload.providers[name](), reference) for name in ("eager", "triton")}
    assert errors["eager"] < 1e-2, errors
    assert errors["triton"] <= 2 * errors["eager"] + 1e-2, errors
    assert workload.providers["sdpa_math"]() is None  # torch's own dropout mask: no error column
