"""Fused softmax-KL kernel (Triton, under the CPU interpreter) against the float64 reference."""
import pytest
import torch

from kernels.kl_div import kl_div, kl_div_forward_backward, kl_div_reference, kl_div_triton

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


CASES = [  # (n_rows, n_cols, temperature, block_size, mask_kind); block 128 -> several blocks per row
    (1, 1271, 1.0, None, "none"),
    (3, 1271, 2.0, 128, "none"),
    (17, 515, 0.5, 128, "some"),
    (3, 515, 2.0, None, "some"),
    (17, 1271, 2.0, 256, "some"),
    (3, 3000, 1.0, 1024, "none"),  # last block only partly inside the row
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n_rows,n_cols,temperature,block_size,mask_kind", CASES)
def test_matches_float64_reference(dtype, n_rows, n_cols, temperature, block_size, mask_kind):
    student, teacher, mask = make_inputs(n_rows, n_cols, dtype, mask_kind=mask_kind)
    loss, grad = loss_and_grad(kl_div_triton, student, teacher, temperature, mask, block_size=block_size)
    loss_ref, grad_ref = reference_loss_and_grad(student, teacher, temperature, mask)
    assert_close_to_reference(loss, grad, loss_ref, grad_ref, dtype)
    if mask is not None:
        assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("n_cols", [51865, 51864])
def test_whisper_vocabulary(n_cols):
    # default block size: several 4096-wide blocks, the last one partial
    student, teacher, mask = make_inputs(2, n_cols, torch.bfloat16, seed=1)
    loss, grad = loss_and_grad(kl_div_triton, student, teacher, 2.0, mask)
    loss_ref, grad_ref = reference_loss_and_grad(student, teacher, 2.0, mask)
    assert_close_to_reference(loss, grad, loss_ref, grad_ref, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_extreme_logits(dtype, temperature):
    student, teacher, mask = make_inputs(3, 515, dtype, seed=2, scale=1.0, mask_kind="some")
    student = (student.float().sign() * 1e4).to(dtype)  # every logit at magnitude 1e4
    teacher = (teacher.float() * 1e4 / teacher.float().abs().max()).to(dtype)
    loss, grad = loss_and_grad(kl_div_triton, student, teacher, temperature, mask, block_size=128)
    loss_ref, grad_ref = reference_loss_and_grad(student, teacher, temperature, mask)
    assert_close_to_reference(loss, grad, loss_ref, grad_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_all_rows_masked_gives_zero_loss_and_grad(dtype):
    student, teacher, mask = make_inputs(3, 515, dtype, mask_kind="all_masked")
    loss, grad = loss_and_grad(kl_div_triton, student, teacher, 2.0, mask, block_size=128)
    assert loss.item() == 0.0
    assert (grad == 0).all()
    loss_ref, grad_ref = reference_loss_and_grad(student, teacher, 2.0, mask)
    assert loss_ref.item() == 0.0 and (grad_ref == 0).all()


@pytest.mark.parametrize("mask_kind", ["none", "some", "all_masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_output_element_is_written(mask_kind, dtype):
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


def test_grad_buffer_receives_gradient_in_place():
    student, teacher, mask = make_inputs(3, 515, torch.float32, seed=4, mask_kind="some")
    buffer = torch.full_like(student, float("nan"))
    loss, grad = loss_and_grad(kl_div_triton, student, teacher, 1.0, mask, grad_buffer=buffer)
    # autograd copies it into student.grad because the test still holds `buffer`
    assert torch.equal(buffer, grad)
    loss_ref, grad_ref = reference_loss_and_grad(student, teacher, 1.0, mask)
    assert_close_to_reference(loss, grad, loss_ref, grad_ref, torch.float32)


def test_strided_rows():
    # a view whose row stride is not V, as when slicing the vocabulary out of wider logits
    wide_student, wide_teacher, mask = make_inputs(3, 530, torch.float32, seed=5)
    student, teacher = wide_student[:, :515], wide_teacher[:, 7:522]
    loss, grad = loss_and_grad(kl_div_triton, student, teacher, 2.0, mask, block_size=128)
    loss_ref, grad_ref = reference_loss_and_grad(student, teacher, 2.0, mask)
    assert_close_to_reference(loss, grad, loss_ref, grad_ref, torch.float32)


def test_forward_only_when_no_gradient_is_needed():
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


def test_identical_inputs_give_zero():
    student, _, _ = make_inputs(3, 515, torch.float32, seed=7)
    loss, grad = loss_and_grad(kl_div_triton, student, student.clone(), 2.0, None, block_size=128)
    assert loss.abs().item() < 1e-5
    assert grad.abs().max().item() < 1e-7


def test_teacher_gets_no_gradient():
    student, teacher, mask = make_inputs(3, 515, torch.float32, seed=8)
    teacher.requires_grad_()
    for fn in (kl_div_triton, kl_div_reference):
        student_leaf = student.clone().requires_grad_()
        fn(student_leaf, teacher, 2.0, mask).backward()
        assert teacher.grad is None and student_leaf.grad is not None


def test_second_backward_raises():
    student, teacher, mask = make_inputs(2, 515, torch.float32, seed=9)
    student.requires_grad_()
    loss = kl_div_triton(student, teacher, 1.0, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_empty_batch_gives_zero():
    student, teacher, _ = make_inputs(0, 515, torch.float32)
    loss, grad = loss_and_grad(kl_div_triton, student, teacher, 1.0, None)
    assert loss.item() == 0.0 and grad.shape == (0, 515)
    assert kl_div_reference(student, teacher).item() == 0.0


@pytest.mark.parametrize("mask_kind", ["none", "some", "all_masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dispatch_on_cpu_is_the_reference(mask_kind, dtype):
    student, teacher, mask = make_inputs(5, 515, dtype, seed=10, mask_kind=mask_kind)
    loss, grad = loss_and_grad(kl_div, student, teacher, 2.0, mask)
    loss_ref, grad_ref = loss_and_grad(kl_div_reference, student, teacher, 2.0, mask)
    assert torch.equal(loss, loss_ref) and torch.equal(grad, grad_ref)


@pytest.mark.parametrize("fn", [kl_div_reference, kl_div_triton, kl_div])
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


def test_triton_rejects_bad_block_size():
    student, teacher, _ = make_inputs(2, 515, torch.float32)
    with pytest.raises(ValueError, match="power of two"):
        kl_div_triton(student, teacher, block_size=100)


def test_triton_rejects_float64():
    student, teacher, _ = make_inputs(2, 515, torch.float64)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        kl_div_triton(student, teacher)
