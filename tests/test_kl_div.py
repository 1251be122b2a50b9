"""The KL versions against the float64 reference: the chunked CPU path, and the fused Triton kernel (under
the CPU interpreter, switched on in conftest; skipped where Triton is not installed)."""
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kernels.kl_div import (
    CHUNK_ROWS, TRITON_AVAILABLE, kl_div, kl_div_chunked, kl_div_forward_backward, kl_div_reference, kl_div_triton,
)

kl_div_module = sys.modules["kernels.kl_div"]  # the package attribute kernels.kl_div is the function
requires_triton = pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton is not installed")

GRAD_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}  # relative to max |grad|
LOSS_TOLERANCE = 1e-4  # relative, for every dtype: the inputs are the same numbers, accumulation is float32


def make_inputs(n_rows, n_cols, dtype, seed=0, scale=3.0, mask_kind="none"):
    gen = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(n_rows, n_cols, generator=gen)).to(dtype)
    teacher = (scale * torch.randn(n_rows, n_cols, generator=gen)).to(dtype)
    if mask_kind == "none":
        mask = None
    elif mask_kind == "some":
        mask = torch.rand(n_rows, generator=gen) < 0.6
        mask[0] = True  # at least one row counts and, with n_rows > 1, at least one does not
        if n_rows > 1:
            mask[-1] = False
    elif mask_kind == "all_masked":
        mask = torch.zeros(n_rows, dtype=torch.bool)
    elif mask_kind == "one_row":
        mask = torch.zeros(n_rows, dtype=torch.bool)
        mask[n_rows // 2] = True
    elif mask_kind == "padding":  # utterances of different lengths flattened: runs of counted rows
        mask = torch.ones(n_rows, dtype=torch.bool)
        mask[n_rows // 3:n_rows // 2] = False
        mask[-2:] = False
    else:
        raise ValueError(mask_kind)
    return student, teacher, mask


def loss_and_grad(fn, student, teacher, temperature, mask, upstream=0.7, **kwargs):
    """Loss and d(upstream * loss)/d student through autograd."""
    student = student.detach().clone().requires_grad_()
    loss = fn(student, teacher, temperature, mask, **kwargs)
    (loss * upstream).backward()
    return loss.detach(), student.grad


def reference_loss_and_grad(student, teacher, temperature, mask, upstream=0.7):
    return loss_and_grad(kl_div_reference, student.double(), teacher.double(), temperature, mask, upstream)


def assert_close_to_reference(loss, grad, loss_ref, grad_ref, dtype):
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad.dtype == dtype
    loss_err = (loss.double() - loss_ref).abs() / loss_ref.abs()
    assert loss_err <= LOSS_TOLERANCE, f"loss {loss.item()} vs {loss_ref.item()}: rel err {loss_err.item():.2e}"
    grad_err = (grad.double() - grad_ref).abs().max() / grad_ref.abs().max()
    assert grad_err <= GRAD_TOLERANCE[dtype], f"grad rel err {grad_err.item():.2e}"


# The versions that write the gradient in their forward pass, each with a small step (rows per chunk, columns
# per block) so that inputs of a few rows and ~500 columns take several steps.
FUSED = [pytest.param(kl_div_chunked, id="chunked"), pytest.param(kl_div_triton, id="triton", marks=requires_triton)]
SMALL_STEP = {kl_div_chunked: {"chunk_rows": 2}, kl_div_triton: {"block_size": 128}}


# ----------------------------------------------------------------------------- the chunked CPU path

CHUNKED_CASES = [  # (n_rows, n_cols, temperature, chunk_rows, mask_kind)
    (1, 1271, 1.0, CHUNK_ROWS, "none"),
    (37, 1271, 2.0, 8, "none"),  # 37 = 4 * 8 + 5: the last chunk is partial
    (37, 1271, 0.5, 8, "some"),  # scattered counted rows: every chunk mixes them with rows that do not count
    (37, 515, 2.0, 8, "padding"),  # runs of counted rows, ending mid-chunk
    (9, 1271, 3.0, 4, "one_row"),  # two of three chunks hold no counted row: skipped
    (3, 51864, 2.0, CHUNK_ROWS, "padding"),  # Whisper's English vocabulary
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n_rows,n_cols,temperature,chunk_rows,mask_kind", CHUNKED_CASES)
def test_chunked_matches_float64_reference(dtype, n_rows, n_cols, temperature, chunk_rows, mask_kind):
    student, teacher, mask = make_inputs(n_rows, n_cols, dtype, mask_kind=mask_kind)
    loss, grad = loss_and_grad(kl_div_chunked, student, teacher, temperature, mask, chunk_rows=chunk_rows)
    loss_ref, grad_ref = reference_loss_and_grad(student, teacher, temperature, mask)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close_to_reference(loss, grad, loss_ref, grad_ref, dtype)
    if mask is not None:
        assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("mask_kind", ["none", "some", "padding", "one_row"])
def test_chunked_float32_is_the_float32_reference(mask_kind):
    # the same float32 arithmetic as the reference, so far closer to it than the float64 tolerances ask
    student, teacher, mask = make_inputs(21, 1271, torch.float32, seed=11, mask_kind=mask_kind)
    loss, grad = loss_and_grad(kl_div_chunked, student, teacher, 1.5, mask, chunk_rows=4)
    loss_ref, grad_ref = loss_and_grad(kl_div_reference, student, teacher, 1.5, mask)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-6 * grad_ref.abs().max().item())


def test_chunked_ignores_garbage_in_rows_that_do_not_count():
    student, teacher, mask = make_inputs(12, 515, torch.float32, seed=17, mask_kind="some")
    garbage = student.clone()
    garbage[~mask] = float("nan")
    garbage[~mask, :3] = float("inf")
    loss, grad = loss_and_grad(kl_div_chunked, garbage, teacher, 2.0, mask, chunk_rows=4)
    loss_clean, grad_clean = loss_and_grad(kl_div_chunked, student, teacher, 2.0, mask, chunk_rows=4)
    assert torch.equal(loss, loss_clean) and torch.equal(grad, grad_clean)
    assert (grad[~mask] == 0).all()


def test_chunked_gradient_accumulates_as_the_reference():
    student, teacher, mask = make_inputs(7, 515, torch.float32, seed=12, mask_kind="some")
    grads = {}
    for fn in (kl_div_chunked, kl_div_reference):
        leaf = student.clone().requires_grad_()
        fn(leaf, teacher, 2.0, mask).backward()
        first = leaf.grad.clone()
        (0.5 * fn(leaf, teacher, 0.5, None)).backward()  # a second loss adds to leaf.grad
        grads[fn] = first, leaf.grad
    for got, expected in zip(grads[kl_div_chunked], grads[kl_div_reference]):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * expected.abs().max().item())
    assert not torch.allclose(grads[kl_div_chunked][0], grads[kl_div_chunked][1])  # it really accumulated


def test_chunked_gradient_flows_through_the_graph():
    # the logits come from a layer, as in training: the gradient must reach the layer's weight
    gen = torch.Generator().manual_seed(13)
    features = torch.randn(10, 16, generator=gen)
    teacher = 3 * torch.randn(10, 515, generator=gen)
    mask = torch.tensor([True] * 6 + [False] * 4)
    weights = {}
    for fn in (kl_div_chunked, kl_div_reference):
        weight = (0.5 * torch.randn(16, 515, generator=torch.Generator().manual_seed(14))).requires_grad_()
        (3 * fn(features @ weight, teacher, 2.0, mask)).backward()
        weights[fn] = weight.grad
    expected = weights[kl_div_reference]
    torch.testing.assert_close(weights[kl_div_chunked], expected, rtol=0, atol=1e-5 * expected.abs().max().item())


class NewMemory(TorchDispatchMode):
    """Records the size in bytes of every tensor an op returns in new memory (not a view, not an out= argument)."""

    def __init__(self):
        super().__init__()
        self.nbytes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        held = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.nbytes += [t.untyped_storage().nbytes() for t in tree_leaves(out)
                        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in held]
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunked_temporaries_are_chunk_sized(dtype):
    n_rows, n_cols, chunk_rows = 64, 1271, 4
    student, teacher, mask = make_inputs(n_rows, n_cols, dtype, seed=15, mask_kind="padding")
    chunk_bytes = chunk_rows * n_cols * 4  # one (chunk_rows, V) float32 buffer
    grad_bytes = n_rows * n_cols * student.element_size()  # the (N, V) gradient, in the student's dtype
    allocated = {}
    for fn, kwargs in ((kl_div_chunked, {"chunk_rows": chunk_rows}), (kl_div_reference, {})):
        leaf = student.clone().requires_grad_()
        with NewMemory() as probe:
            fn(leaf, teacher, 2.0, mask, **kwargs).backward()
        allocated[fn] = probe.nbytes
    # the chunked path: one gradient buffer, and nothing else larger than its 4-chunk scratch
    assert [b for b in allocated[kl_div_chunked] if b > 4 * chunk_bytes] == [grad_bytes]
    # the probe sees the reference's (N, V) float32 intermediates, 16 chunks each
    assert sum(b >= n_rows * n_cols * 4 for b in allocated[kl_div_reference]) >= 4


def test_chunked_rejects_bad_chunk_rows_and_float64():
    student, teacher, _ = make_inputs(2, 515, torch.float32)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="chunk_rows"):
            kl_div_chunked(student, teacher, chunk_rows=bad)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        kl_div_chunked(student.double(), teacher.double())


# ----------------------------------------------------------------------------- both fused versions

@pytest.mark.parametrize("fn", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_extreme_logits(fn, dtype, temperature):
    student, teacher, mask = make_inputs(3, 515, dtype, seed=2, scale=1.0, mask_kind="some")
    student = (student.float().sign() * 1e4).to(dtype)  # every logit at magnitude 1e4
    teacher = (teacher.float() * 1e4 / teacher.float().abs().max()).to(dtype)
    loss, grad = loss_and_grad(fn, student, teacher, temperature, mask, **SMALL_STEP[fn])
    loss_ref, grad_ref = reference_loss_and_grad(student, teacher, temperature, mask)
    assert_close_to_reference(loss, grad, loss_ref, grad_ref, dtype)


@pytest.mark.parametrize("fn", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_all_rows_masked_gives_zero_loss_and_grad(fn, dtype):
    student, teacher, mask = make_inputs(3, 515, dtype, mask_kind="all_masked")
    loss, grad = loss_and_grad(fn, student, teacher, 2.0, mask, **SMALL_STEP[fn])
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert (grad == 0).all() and grad.dtype == dtype
    loss_ref, grad_ref = reference_loss_and_grad(student, teacher, 2.0, mask)
    assert loss_ref.item() == 0.0 and (grad_ref == 0).all()


@pytest.mark.parametrize("fn", FUSED)
def test_strided_rows(fn):
    # a view whose row stride is not V, as when slicing the vocabulary out of wider logits
    wide_student, wide_teacher, mask = make_inputs(3, 530, torch.float32, seed=5)
    student, teacher = wide_student[:, :515], wide_teacher[:, 7:522]
    loss, grad = loss_and_grad(fn, student, teacher, 2.0, mask, **SMALL_STEP[fn])
    loss_ref, grad_ref = reference_loss_and_grad(student, teacher, 2.0, mask)
    assert_close_to_reference(loss, grad, loss_ref, grad_ref, torch.float32)


@pytest.mark.parametrize("fn", FUSED)
def test_identical_inputs_give_zero(fn):
    student, _, _ = make_inputs(3, 515, torch.float32, seed=7)
    loss, grad = loss_and_grad(fn, student, student.clone(), 2.0, None, **SMALL_STEP[fn])
    assert loss.abs().item() < 1e-5
    assert grad.abs().max().item() < 1e-7


@pytest.mark.parametrize("fn", FUSED)
def test_forward_only_gives_the_loss(fn):
    student, teacher, mask = make_inputs(5, 1271, torch.bfloat16, seed=16, mask_kind="some")
    loss_ref = kl_div_reference(student.double(), teacher.double(), 2.0, mask)
    student.requires_grad_()
    with torch.no_grad():
        loss = fn(student, teacher, 2.0, mask, **SMALL_STEP[fn])
    assert not loss.requires_grad
    assert ((loss.double() - loss_ref).abs() / loss_ref).item() <= LOSS_TOLERANCE


@pytest.mark.parametrize("fn", FUSED + [kl_div_reference])
def test_teacher_gets_no_gradient(fn):
    student, teacher, mask = make_inputs(3, 515, torch.float32, seed=8)
    teacher.requires_grad_()
    student_leaf = student.clone().requires_grad_()
    fn(student_leaf, teacher, 2.0, mask).backward()
    assert teacher.grad is None and student_leaf.grad is not None


@pytest.mark.parametrize("fn", FUSED)
def test_second_backward_raises(fn):
    student, teacher, mask = make_inputs(2, 515, torch.float32, seed=9)
    student.requires_grad_()
    loss = fn(student, teacher, 1.0, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


@pytest.mark.parametrize("fn", FUSED)
def test_empty_batch_gives_zero(fn):
    student, teacher, _ = make_inputs(0, 515, torch.float32)
    loss, grad = loss_and_grad(fn, student, teacher, 1.0, None)
    assert loss.item() == 0.0 and grad.shape == (0, 515)
    assert kl_div_reference(student, teacher).item() == 0.0


# ----------------------------------------------------------------------------- the Triton kernel

TRITON_CASES = [  # (n_rows, n_cols, temperature, block_size, mask_kind); block 128 -> several blocks per row
    (1, 1271, 1.0, None, "none"),
    (3, 1271, 2.0, 128, "none"),
    (17, 515, 0.5, 128, "some"),
    (3, 515, 2.0, None, "some"),
    (17, 1271, 2.0, 256, "some"),
    (3, 3000, 1.0, 1024, "none"),  # last block only partly inside the row
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n_rows,n_cols,temperature,block_size,mask_kind", TRITON_CASES)
@requires_triton
def test_triton_matches_float64_reference(dtype, n_rows, n_cols, temperature, block_size, mask_kind):
    student, teacher, mask = make_inputs(n_rows, n_cols, dtype, mask_kind=mask_kind)
    loss, grad = loss_and_grad(kl_div_triton, student, teacher, temperature, mask, block_size=block_size)
    loss_ref, grad_ref = reference_loss_and_grad(student, teacher, temperature, mask)
    assert_close_to_reference(loss, grad, loss_ref, grad_ref, dtype)
    if mask is not None:
        assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("n_cols", [51865, 51864])
@requires_triton
def test_triton_whisper_vocabulary(n_cols):
    # default block size: several 4096-wide blocks, the last one partial
    student, teacher, mask = make_inputs(2, n_cols, torch.bfloat16, seed=1)
    loss, grad = loss_and_grad(kl_div_triton, student, teacher, 2.0, mask)
    loss_ref, grad_ref = reference_loss_and_grad(student, teacher, 2.0, mask)
    assert_close_to_reference(loss, grad, loss_ref, grad_ref, torch.bfloat16)


@pytest.mark.parametrize("mask_kind", ["none", "some", "all_masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@requires_triton
def test_triton_writes_every_output_element(mask_kind, dtype):
    student, teacher, mask = make_inputs(5, 515, dtype, seed=3, mask_kind=mask_kind)
    loss_rows = torch.full((5,), float("nan"))
    grad = torch.full_like(student, float("nan"))
    loss = kl_div_forward_backward(student, teacher, 2.0, mask, loss_rows, grad, block_size=128)
    assert not loss_rows.isnan().any() and not grad.isnan().any() and not loss.isnan()

    # the gradient of the mean loss (upstream 1), written during the forward pass
    loss_ref, grad_ref = reference_loss_and_grad(student, teacher, 2.0, mask, upstream=1.0)
    if mask_kind == "all_masked":
        assert loss.item() == 0.0 and (grad == 0).all() and (loss_rows == 0).all()
    else:
        assert_close_to_reference(loss, grad, loss_ref, grad_ref, dtype)


@requires_triton
def test_triton_grad_buffer_receives_gradient_in_place():
    student, teacher, mask = make_inputs(3, 515, torch.float32, seed=4, mask_kind="some")
    buffer = torch.full_like(student, float("nan"))
    loss, grad = loss_and_grad(kl_div_triton, student, teacher, 1.0, mask, grad_buffer=buffer)
    # autograd copies it into student.grad because the test still holds `buffer`
    assert torch.equal(buffer, grad)
    loss_ref, grad_ref = reference_loss_and_grad(student, teacher, 1.0, mask)
    assert_close_to_reference(loss, grad, loss_ref, grad_ref, torch.float32)


@requires_triton
def test_triton_skips_the_gradient_sweep_when_no_gradient_is_needed():
    student, teacher, mask = make_inputs(3, 1271, torch.bfloat16, seed=6, mask_kind="some")
    loss_ref = kl_div_reference(student.double(), teacher.double(), 2.0, mask)
    unused_buffer = torch.full_like(student, float("nan"))
    losses = [kl_div_triton(student, teacher, 2.0, mask, grad_buffer=unused_buffer, block_size=256)]
    with torch.no_grad():
        student.requires_grad_()
        losses.append(kl_div_triton(student, teacher, 2.0, mask, grad_buffer=unused_buffer, block_size=256))
    for loss in losses:
        assert not loss.requires_grad
        assert ((loss.double() - loss_ref).abs() / loss_ref).item() <= LOSS_TOLERANCE
    assert unused_buffer.isnan().all()  # the gradient sweep did not run


# ----------------------------------------------------------------------------- dispatch and validation

@pytest.mark.parametrize("mask_kind", ["none", "padding", "all_masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dispatch_on_cpu(monkeypatch, mask_kind, dtype):
    student, teacher, mask = make_inputs(5, 515, dtype, seed=10, mask_kind=mask_kind)
    calls = []
    chunked = kl_div_module.kl_div_chunked
    monkeypatch.setattr(kl_div_module, "kl_div_chunked", lambda *args: calls.append("chunked") or chunked(*args))
    # a gradient wanted: the chunked path
    loss, grad = loss_and_grad(kl_div, student, teacher, 2.0, mask)
    loss_chunked, grad_chunked = loss_and_grad(chunked, student, teacher, 2.0, mask)
    assert calls == ["chunked"]
    assert torch.equal(loss, loss_chunked) and torch.equal(grad, grad_chunked)
    # no gradient wanted, or float64 (the precise answer): the reference itself
    assert torch.equal(kl_div(student, teacher, 2.0, mask), kl_div_reference(student, teacher, 2.0, mask))
    loss, grad = loss_and_grad(kl_div, student.double(), teacher.double(), 2.0, mask)
    loss_ref, grad_ref = loss_and_grad(kl_div_reference, student.double(), teacher.double(), 2.0, mask)
    assert torch.equal(loss, loss_ref) and torch.equal(grad, grad_ref)
    assert calls == ["chunked"]


@pytest.mark.parametrize("fn", [kl_div_reference, kl_div_chunked, kl_div, FUSED[1]])
def test_input_validation(fn):
    student, teacher, mask = make_inputs(3, 515, torch.float32, mask_kind="some")
    with pytest.raises(ValueError, match="2-D"):
        fn(student[0], teacher[0])
    with pytest.raises(ValueError, match="shape"):
        fn(student, teacher[:, :514])
    with pytest.raises(ValueError, match="mask shape"):
        fn(student, teacher, 1.0, mask[:2])
    with pytest.raises(TypeError, match="bool"):
        fn(student, teacher, 1.0, mask.float())
    for bad_temperature in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            fn(student, teacher, bad_temperature, mask)


@requires_triton
def test_triton_rejects_bad_block_size():
    student, teacher, _ = make_inputs(2, 515, torch.float32)
    with pytest.raises(ValueError, match="power of two"):
        kl_div_triton(student, teacher, block_size=100)


@requires_triton
def test_triton_rejects_float64():
    student, teacher, _ = make_inputs(2, 515, torch.float64)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        kl_div_triton(student, teacher)
