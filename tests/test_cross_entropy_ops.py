"""Fused cross-entropy and linear cross-entropy (kernels/cross_entropy.py) against F.cross_entropy in fp64."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from reference_checks import DTYPES, LaunchRecorder, assert_close_to_reference, random_tensor

from genkernels.kernels import use_impl
from genkernels.kernels.cross_entropy import (
    REDUCTIONS,
    cross_entropy,
    default_chunk_size,
    linear_cross_entropy,
)

# the module itself (genkernels.kernels.cross_entropy is the function of the same name)
ce_module = importlib.import_module("genkernels.kernels.cross_entropy")


def _targets(shape, num_classes, seed, ignore_index=-100, ignored_every=5):
    """Random classes, every ``ignored_every``-th one (flat order) set to ``ignore_index``."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, shape, generator=generator)
    if ignored_every:
        target.view(-1)[::ignored_every] = ignore_index
    return target


def _upstream(loss, reduction, rows):
    """An upstream gradient that keeps the logits' gradient O(1): the row count for "mean", a fixed 0.75 for
    "sum", random per-row values for "none"."""
    if reduction == "none":
        return random_tensor(loss.shape, loss.dtype, 99)
    return torch.tensor(float(max(rows, 1)) if reduction == "mean" else 0.75, dtype=loss.dtype)


def _loss_and_grad(fn, logits, upstream_of):
    logits = logits.detach().requires_grad_()
    loss = fn(logits)
    (grad,) = torch.autograd.grad(loss, logits, upstream_of(loss))
    return loss.detach(), grad


def _check_against_torch(logits, target, dtype=torch.float32, **options):
    """Kernel, fp64 reference and plain PyTorch in ``dtype`` (the tolerance rule's baseline): loss and gradient."""
    reduction = options.get("reduction", "mean")
    rows = target.numel()

    def upstream_of(loss):
        return _upstream(loss, reduction, rows).to(loss.dtype)

    x = logits.to(dtype)
    got = _loss_and_grad(lambda t: cross_entropy(t, target, impl="triton", **options), x, upstream_of)
    ref = _loss_and_grad(lambda t: F.cross_entropy(t, target, **options), x.double(), upstream_of)
    base = _loss_and_grad(lambda t: F.cross_entropy(t, target, **options), x, upstream_of)
    base_loss = base[0] if reduction == "none" else base[0].float()  # reduced losses are fp32 here
    assert_close_to_reference(got[0], ref[0], base_loss, "loss")
    assert_close_to_reference(got[1], ref[1], base[1], "grad_logits")
    return got


# ------------------------------------------------------------------------------------------------------------
# cross_entropy against F.cross_entropy
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(7, 2), (5, 37, 3), (2, 300, 5)], ids=["2_classes", "37_classes", "300_strided"])
def test_matches_torch_in_fp64_for_every_reduction(shape, label_smoothing, reduction):
    """``[2, 300, 5]`` has its class axis strided and wider than one tile: the online two-pass path."""
    target = _targets((shape[0],) + shape[2:], shape[1], seed=1)
    _check_against_torch(random_tensor(shape, torch.float32, 0, scale=3.0), target, reduction=reduction,
                         label_smoothing=label_smoothing)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_precision_logits_follow_the_tolerance_rule(dtype, reduction):
    target = _targets((9, 4), 70, seed=2, ignore_index=3, ignored_every=4)
    _check_against_torch(random_tensor((9, 70, 4), torch.float32, 3, scale=4.0), target, dtype,
                         reduction=reduction, ignore_index=3, label_smoothing=0.1)


def test_pixelcnn_layout_is_read_in_place_and_its_gradient_keeps_the_layout():
    """PixelCNN's logits ``[N, 256, 3, H, W]`` are a transposed view of the head's ``[N, 3, 256, H, W]``."""
    head = random_tensor((2, 3, 256, 4, 3), torch.bfloat16, 4, scale=2.0)
    logits = head.transpose(1, 2)
    target = torch.randint(0, 256, (2, 3, 4, 3), generator=torch.Generator().manual_seed(5))
    _, grad = _check_against_torch(logits, target, torch.bfloat16, reduction="sum")
    assert grad.stride() == logits.stride()


@pytest.mark.parametrize("layout", ["permuted", "sliced", "expanded_rows"])
def test_strided_logits_and_targets(layout):
    if layout == "permuted":  # classes contiguous, rows strided: a channels-last map
        logits = random_tensor((2, 4, 3, 11), torch.float32, 6).permute(0, 3, 1, 2)
        target = _targets((2, 4, 3), 11, seed=7).transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "sliced":  # every other class and position
        logits = random_tensor((3, 40, 14), torch.float32, 6)[:, ::2, ::2]
        target = _targets((3, 14), 20, seed=7)[:, ::2]
    else:  # one row broadcast over a dim: overlapping rows read, a dense gradient written
        logits = random_tensor((2, 9, 1), torch.float32, 6).expand(2, 9, 5)
        target = _targets((2, 5), 9, seed=7)
    _check_against_torch(logits, target, reduction="none", label_smoothing=0.2)


@pytest.mark.parametrize("num_classes,dtype", [(50257, torch.float32), (3001, torch.bfloat16)])
def test_vocabulary_rows_start_anywhere_and_are_read_in_whole_vectors(num_classes, dtype):
    """One row per program from the 16-byte boundary before it: GPT-2's vocabulary over several class tiles,
    and a 3001-class row in one tile; rows of odd length start at every alignment."""
    target = torch.tensor([num_classes - 1, -100, 0])
    _check_against_torch(random_tensor((3, num_classes), torch.float32, 8, scale=2.0), target, dtype)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_every_target_ignored_gives_torchs_nan_mean_zero_sum_and_zero_gradient(label_smoothing):
    logits = random_tensor((4, 6), torch.float32, 9).requires_grad_()
    target = torch.full((4,), -100)
    mean = cross_entropy(logits, target, label_smoothing=label_smoothing, impl="triton")
    assert math.isnan(mean.item())
    mean.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    total = cross_entropy(logits, target, reduction="sum", label_smoothing=label_smoothing, impl="triton")
    assert total.item() == 0.0


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(0, 5), (0, 5, 3), (2, 5, 0)])
def test_empty_batches(shape, reduction):
    logits = torch.zeros(shape, requires_grad=True)
    target = torch.zeros((shape[0],) + shape[2:], dtype=torch.int64)
    got = cross_entropy(logits, target, reduction=reduction, impl="triton")
    expected = F.cross_entropy(logits, target, reduction=reduction)
    torch.testing.assert_close(got, expected, equal_nan=True)
    got.sum().backward()
    assert logits.grad.shape == logits.shape and not logits.grad.any()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
def test_special_values_give_torchs_losses_and_gradients():
    """A -inf logit (a masked class) leaves the row's loss finite; a NaN or +inf logit makes its row NaN; rows
    whose only finite logit is the target have loss 0."""
    logits = random_tensor((5, 6), torch.float32, 10)
    logits[0, 2] = float("-inf")
    logits[1, 4] = float("nan")
    logits[2, :5] = float("-inf")
    logits[4, 1] = float("inf")
    target = torch.tensor([1, 0, 5, 3, 2])
    _check_against_torch(logits, target, reduction="none")


def test_gradient_writes_stay_inside_the_given_buffer():
    logits = random_tensor((3, 10, 4), torch.float32, 11)
    target = _targets((3, 4), 10, seed=12)
    storage = torch.full((3 * 12 * 4 + 8,), 7.0)
    grad = storage[4:-4].view(3, 12, 4)[:, 1:11]  # a strided window of a larger buffer
    losses = ce_module._launch_cross_entropy(logits, target, -100, 0.0, torch.float32, grad)
    logits64 = logits.double().requires_grad_()
    expected = F.cross_entropy(logits64, target, reduction="none")
    expected.sum().backward()
    torch.testing.assert_close(losses.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), logits64.grad, rtol=1e-5, atol=1e-6)
    untouched = torch.ones_like(storage, dtype=torch.bool)
    untouched[4:-4].view(3, 12, 4)[:, 1:11] = False
    assert torch.equal(storage[untouched], torch.full((int(untouched.sum()),), 7.0))


def test_no_gradient_is_written_when_none_is_needed(monkeypatch):
    recorder = LaunchRecorder(ce_module._cross_entropy_kernel)
    monkeypatch.setattr(ce_module, "_cross_entropy_kernel", recorder)
    logits = random_tensor((3, 7), torch.float32, 13)
    cross_entropy(logits, torch.tensor([1, 2, 3]), impl="triton")
    with torch.no_grad():
        cross_entropy(logits.requires_grad_(), torch.tensor([1, 2, 3]), impl="triton")
    assert [kwargs["WRITE_GRAD"] for _, _, kwargs in recorder.calls] == [False, False]


def test_auto_follows_use_impl_and_eager_is_the_reference():
    logits = random_tensor((5, 9), torch.float32, 14)
    target = _targets((5,), 9, seed=15)
    expected = F.cross_entropy(logits, target)
    with use_impl("eager"):
        assert torch.equal(cross_entropy(logits, target), expected)
    torch.testing.assert_close(cross_entropy(logits, target, impl="triton"), expected)


def test_compiles_with_fullgraph_forward_and_backward():
    logits = random_tensor((2, 256, 3, 2, 2), torch.float32, 16)
    target = torch.randint(0, 256, (2, 3, 2, 2), generator=torch.Generator().manual_seed(17))

    def bits(x):
        return cross_entropy(x, target, label_smoothing=0.1, impl="triton") / math.log(2.0)

    torch._dynamo.reset()
    compiled = torch.compile(bits, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, bits):
        x = logits.clone().requires_grad_()
        loss = fn(x)
        loss.backward()
        results.append((loss.detach(), x.grad))
    torch.testing.assert_close(results[0], results[1])


# ------------------------------------------------------------------------------------------------------------
# linear_cross_entropy against the materialized head
# ------------------------------------------------------------------------------------------------------------
def _head_inputs(dtype, tokens_shape=(13,), hidden_size=8, vocab=37, bias=True):
    hidden = random_tensor(tokens_shape + (hidden_size,), dtype, 20)
    weight = random_tensor((vocab, hidden_size), dtype, 21, scale=0.5)
    b = random_tensor((vocab,), dtype, 22) if bias else None
    return hidden, weight, b, _targets(tokens_shape, vocab, seed=23, ignored_every=6)


def _head_loss_and_grads(fn, hidden, weight, bias, upstream_of):
    leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    loss = fn(*leaves) if bias is not None else fn(*leaves, None)
    grads = torch.autograd.grad(loss, leaves, upstream_of(loss))
    return (loss.detach(),) + grads


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("chunk_size", [4, 5, None], ids=["chunk4", "chunk5", "default_chunk"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_the_materialized_head(with_bias, chunk_size, reduction):
    """13 tokens in chunks of 4 or 5 (a ragged last chunk) or the default (one chunk)."""
    hidden, weight, bias, target = _head_inputs(torch.float32, bias=with_bias)
    options = dict(reduction=reduction, label_smoothing=0.1)

    def upstream_of(loss):
        return _upstream(loss, reduction, target.numel()).to(loss.dtype)

    def ours(h, w, b):
        return linear_cross_entropy(h, w, target, bias=b, chunk_size=chunk_size, impl="triton", **options)

    def materialized(h, w, b):
        return F.cross_entropy(F.linear(h, w, b), target, **options)

    got = _head_loss_and_grads(ours, hidden, weight, bias, upstream_of)
    ref = _head_loss_and_grads(materialized, hidden.double(), weight.double(),
                               bias.double() if with_bias else None, upstream_of)
    base = _head_loss_and_grads(materialized, hidden, weight, bias, upstream_of)
    for name, g, r, b in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, ref, base):
        assert_close_to_reference(g, r, b, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_in_half_precision_with_leading_dims(dtype):
    hidden, weight, bias, target = _head_inputs(dtype, tokens_shape=(2, 7), hidden_size=16, vocab=300)

    def upstream_of(loss):
        return torch.tensor(float(target.numel()))

    def ours(h, w, b):
        return linear_cross_entropy(h, w, target, bias=b, chunk_size=3, impl="triton")

    def materialized(h, w, b):
        return F.cross_entropy(F.linear(h, w, b).flatten(0, 1), target.flatten()).float()

    got = _head_loss_and_grads(ours, hidden, weight, bias, upstream_of)
    ref = _head_loss_and_grads(materialized, hidden.double(), weight.double(), bias.double(), upstream_of)
    base = _head_loss_and_grads(materialized, hidden, weight, bias, upstream_of)
    for name, g, r, b in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, ref, base):
        assert_close_to_reference(g, r, b.to(g.dtype), name)


def test_linear_with_every_token_ignored_and_with_no_tokens():
    hidden, weight, bias, _ = _head_inputs(torch.float32)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    loss = linear_cross_entropy(hidden, weight, torch.full((13,), -100), bias=bias, chunk_size=4, impl="triton")
    assert math.isnan(loss.item())
    loss.backward()
    assert all(not leaf.grad.any() for leaf in leaves)
    empty = linear_cross_entropy(hidden[:0], weight, torch.zeros(0, dtype=torch.int64), reduction="sum",
                                 impl="triton")
    assert empty.item() == 0.0


def test_default_chunk_bounds_the_chunk_logits():
    """The largest power of two whose chunk logits fit 512 MiB: GPT-2's bf16 vocabulary 2**29 / (50257 * 2) =
    5341 -> 4096 tokens; never more tokens than there are, never fewer than one."""
    assert default_chunk_size(8192, 50257, 2) == 4096
    assert default_chunk_size(8192, 50257, 4) == 2048
    assert default_chunk_size(10, 37, 4) == 10
    assert default_chunk_size(0, 37, 4) == 1
    assert default_chunk_size(100, 2**29, 4) == 1


def test_linear_compiles_with_fullgraph_forward_and_backward():
    hidden, weight, bias, target = _head_inputs(torch.float32)

    def head(h, w, b):
        return linear_cross_entropy(h, w, target, bias=b, chunk_size=5, impl="triton")

    torch._dynamo.reset()
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    results = [_head_loss_and_grads(fn, hidden, weight, bias, lambda loss: torch.tensor(2.0))
               for fn in (compiled, head)]
    torch.testing.assert_close(results[0], results[1])


# ------------------------------------------------------------------------------------------------------------
# training: the same loss curve under both impls
# ------------------------------------------------------------------------------------------------------------
def _train(loss_of, parameters, impl, steps=6, lr=5e-2):
    optimizer = torch.optim.Adam(parameters, lr=lr)
    curve = []
    with use_impl(impl):
        for _ in range(steps):
            optimizer.zero_grad()
            loss = loss_of()
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
    return torch.tensor(curve)


def test_training_through_the_pixelcnn_layout_converges_alike():
    """Free logits in PixelCNN's strided layout fitted to fixed pixels, label smoothing on."""
    target = torch.randint(0, 256, (2, 3, 3, 2), generator=torch.Generator().manual_seed(30))
    curves = {}
    for impl in ("eager", "triton"):
        head = random_tensor((2, 3, 256, 3, 2), torch.float32, 31).requires_grad_()
        curves[impl] = _train(lambda: cross_entropy(head.transpose(1, 2), target, label_smoothing=0.05), [head],
                              impl, lr=0.5)
    assert curves["eager"][-1] < 0.8 * curves["eager"][0]
    torch.testing.assert_close(curves["triton"], curves["eager"], rtol=1e-4, atol=1e-5)


def test_training_a_tied_embedding_language_model_converges_alike():
    """A bigram model whose output head is its embedding (GPT's tying): the shared weight gets the embedding's
    and the head's gradient terms once each, under both impls."""
    tokens = torch.arange(6).repeat(3)
    inputs, targets = tokens[:-1], tokens[1:].clone()
    targets[4] = -1
    curves, weights = {}, {}
    for impl in ("eager", "triton"):
        torch.manual_seed(32)
        embedding = torch.nn.Embedding(6, 4)
        norm = torch.nn.LayerNorm(4)
        parameters = list(embedding.parameters()) + list(norm.parameters())
        curves[impl] = _train(lambda: linear_cross_entropy(norm(embedding(inputs)), embedding.weight, targets,
                                                           ignore_index=-1, chunk_size=7), parameters, impl)
        weights[impl] = embedding.weight.detach()
    assert curves["eager"][-1] < 0.8 * curves["eager"][0]
    torch.testing.assert_close(curves["triton"], curves["eager"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weights["triton"], weights["eager"], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# bad input: each refused naming the argument, before any launch
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def no_launch(monkeypatch):
    recorder = LaunchRecorder(ce_module._cross_entropy_kernel)
    monkeypatch.setattr(ce_module, "_cross_entropy_kernel", recorder)
    yield
    assert recorder.calls == []


LOGITS = torch.zeros(3, 5, 2)
TARGET = torch.zeros(3, 2, dtype=torch.int64)


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(target=torch.tensor([[0, 5]] * 3)), ValueError, "target"),  # a class out of range
    (dict(target=torch.tensor([[0, -1]] * 3)), ValueError, "target"),  # negative, not the ignore_index
    (dict(target=torch.zeros(3, 2)), TypeError, "target"),  # class probabilities
    (dict(target=torch.zeros(3, 5, dtype=torch.int64)), ValueError, "target"),
    (dict(target=[[0, 1]] * 3), TypeError, "target"),
    (dict(logits=torch.zeros(5)), ValueError, "logits"),
    (dict(logits=torch.zeros(3, 5, 2, dtype=torch.int64)), TypeError, "logits"),
    (dict(logits=torch.zeros(3, 0, 2)), ValueError, "logits"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(label_smoothing="0.1"), TypeError, "label_smoothing"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(ignore_index=1.0), TypeError, "ignore_index"),
    (dict(target=TARGET.to("meta")), ValueError, "target on meta"),
])
def test_cross_entropy_refuses_bad_input(kwargs, error, name, no_launch):
    arguments = {"logits": LOGITS, "target": TARGET, **kwargs}
    with pytest.raises(error, match=name):
        cross_entropy(arguments.pop("logits"), arguments.pop("target"), impl="triton", **arguments)


HIDDEN, WEIGHT, BIAS, TOKENS = torch.zeros(2, 3, 4), torch.zeros(7, 4), torch.zeros(7), torch.zeros(2, 3,
                                                                                                  dtype=torch.int64)


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(weight=torch.zeros(7, 5)), ValueError, "weight"),
    (dict(weight=torch.zeros(7)), ValueError, "weight"),
    (dict(weight=torch.zeros(7, 4, dtype=torch.float16)), TypeError, "weight"),
    (dict(bias=torch.zeros(6)), ValueError, "bias"),
    (dict(bias=torch.zeros(7, dtype=torch.float16)), TypeError, "bias"),
    (dict(target=torch.zeros(2, 4, dtype=torch.int64)), ValueError, "target"),
    (dict(target=torch.full((2, 3), 7)), ValueError, "target"),
    (dict(target=torch.zeros(2, 3)), TypeError, "target"),
    (dict(hidden=torch.zeros(2, 3, 4, dtype=torch.int32)), TypeError, "hidden"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=2.0), TypeError, "chunk_size"),
    (dict(label_smoothing=2.0), ValueError, "label_smoothing"),
    (dict(reduction="batchmean"), ValueError, "reduction"),
])
def test_linear_cross_entropy_refuses_bad_input(kwargs, error, name, no_launch):
    arguments = {"hidden": HIDDEN, "weight": WEIGHT, "target": TOKENS, "bias": BIAS, **kwargs}
    with pytest.raises(error, match=name):
        linear_cross_entropy(arguments.pop("hidden"), arguments.pop("weight"), arguments.pop("target"),
                             impl="triton", **arguments)


# ------------------------------------------------------------------------------------------------------------
# properties (hypothesis): drawn shapes, layouts, dtypes, options and special values
# ------------------------------------------------------------------------------------------------------------
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from op_properties import assert_fp64_properties, assert_gradients, assert_op_properties  # noqa: E402

from genkernels.bench.correctness import make_input, st_dtypes, st_layouts, st_shapes, st_special_fills  # noqa: E402


@st.composite
def cross_entropy_cases(draw, dtypes=st_dtypes()):
    """Logits ``[N, C, d...]`` (N and the d's may be 0 or 1; C >= 1) in any layout, targets with some ignored."""
    batch = draw(st.sampled_from((0, 1, 3)))
    classes = draw(st.sampled_from((1, 2, 7, 33)))
    spatial = draw(st_shapes((0, 2), max_side=4, min_side=1))
    shape = (batch, classes) + spatial
    logits = make_input(shape, draw(dtypes), draw(st.integers(0, 99)), layout=draw(st_layouts(shape)),
                        fill=draw(st_special_fills()), scale=draw(st.sampled_from((1.0, 8.0))))
    ignore_index = draw(st.sampled_from((-100, 0)))
    target = torch.randint(0, classes, (batch,) + spatial, generator=torch.Generator().manual_seed(draw(
        st.integers(0, 99))))
    if target.numel() and draw(st.booleans()):
        target.view(-1)[::3] = ignore_index
    options = {"ignore_index": ignore_index, "reduction": draw(st.sampled_from(REDUCTIONS)),
               "label_smoothing": draw(st.sampled_from((0.0, 0.1, 1.0)))}
    return {"logits": logits, "target": target}, options


def _run(options):
    return lambda t, impl: cross_entropy(t["logits"], t["target"], impl=impl, **options)


def _plain(options):
    def plain(t):  # F.cross_entropy with fp32 math for 16-bit logits (a reduced loss stays fp32, as ours)
        logits = t["logits"]
        wide = logits if logits.dtype == torch.float64 else logits.float()
        loss = F.cross_entropy(wide, t["target"], **options)
        return loss.to(logits.dtype) if options["reduction"] == "none" else loss
    return plain


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on drawn NaN/Inf/huge values
@given(case=cross_entropy_cases())
def test_property_triton_matches_the_references_with_gradients(case):
    inputs, options = case
    assert_op_properties(_run(options), _plain(options), inputs, f"cross_entropy {options}")
    assert_gradients(_run(options), _plain(options), inputs, ["logits"], f"cross_entropy {options}")


@given(case=cross_entropy_cases(dtypes=st.just(torch.float32)))
def test_property_fp64_runs_the_reference(case):
    inputs, options = case
    assert_fp64_properties(_run(options), _plain(options), inputs, f"cross_entropy {options}")
