"""
Fused softmax-KL divergence for distillation: loss and student gradient in one pass over the logits.

    loss = mean over counted rows of  T^2 * KL( softmax(teacher / T) || softmax(student / T) )

Versions in this file (llm.c dev/cuda style: the reference is the spec, every other version is checked against it):
    kl_div_reference  plain PyTorch (F.log_softmax in float32, or float64 for float64 inputs); any device.
    kl_div_chunked    the CPU training path: the reference's float32 math CHUNK_ROWS rows at a time, writing
                      d loss / d student into one (N, V) buffer in the student's dtype during the forward pass,
                      as the Triton kernel does. Its temporaries are three (CHUNK_ROWS, V) float32 buffers, not
                      the reference's several (N, V) ones; no compile step, so a new N costs nothing extra.
    kl_div_triton     one Triton program per row. A first sweep over vocabulary blocks keeps an online
                      (running max, running sum) for BOTH softmaxes plus a running sum of p_t * (t - s)
                      terms, rescaled as the maxes move; a second sweep of the same row writes
                      d loss / d student, in the student's dtype, during the forward pass (as Liger-Kernel
                      does for its losses). No (N, V) float32 intermediate exists; backward only scales the
                      stored gradient by grad_output.
    kl_div            dispatch: Triton for CUDA tensors (when Triton is installed), kl_div_chunked for CPU
                      tensors whose gradient is wanted, the reference otherwise and for float64 inputs
                      (which ask for the precise answer).

Run:
    python kernels/kl_div.py     # checks every version against the float64 reference; on CPU, Triton runs in
                                 # its interpreter (switched on below) and is skipped when not installed
    python bench.py kernels      # the timing (one place for it)

Math (p = softmax(t/T), q = softmax(s/T), lse_x = logsumexp(x/T), sums over the vocabulary):
    log p_i = t_i/T - lse_t,   log q_i = s_i/T - lse_s
    KL = sum_i p_i (log p_i - log q_i) = sum_i p_i (t_i - s_i)/T - (lse_t - lse_s)     (sum_i p_i = 1)
    d KL / d s_j = (1/T) (q_j - p_j)     since d lse_s / d s_j = q_j / T and the first term is linear in s
    so d (T^2 KL) / d s_j = T (q_j - p_j), divided by the number of counted rows for the mean.
Online, per row, with m_x the running max of x/T over the blocks seen so far and d_x = sum exp(x_i/T - m_x):
    lse_x = m_x + log d_x,  so  KL = a / d_t - log d_t + log d_s  with
    a = sum_i exp(t_i/T - m_t) * ((t_i/T - m_t) - (s_i/T - m_s)).
Each term of a is kept relative to the current maxes rather than as raw t_i - s_i: with logits near 1e4
the raw difference rounds in float32 at ~1e-3, which for a KL of ~1 would cost 1e-4 relative error.
When the maxes move by (dm_t, dm_s), every old term shifts by -(dm_t - dm_s) and is rescaled with d_t:
    a <- (a - d_t (dm_t - dm_s)) * exp(-dm_t) + new block,   d_x <- d_x * exp(-dm_x) + new block.

The teacher is a constant target: it gets no gradient (every version detaches it).
Accuracy: the loss is as accurate as float32 log_softmax (about 1e-7 relative for KL ~ 1); for nearly
identical distributions (KL ~ 1e-6) all lose digits, as any float32 difference of log-probabilities must.
"""
import os
from functools import partial

import torch
import torch.nn.functional as F

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships wheels for Linux x86-64 only: elsewhere the PyTorch versions serve
    triton = None
TRITON_AVAILABLE = triton is not None

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # of kl_div_chunked and kl_div_triton


def _check_inputs(student_logits, teacher_logits, temperature, mask):
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be 2-D (N, V), got shape {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} != "
                         f"student_logits shape {tuple(student_logits.shape)}")
    if student_logits.shape[1] == 0:
        raise ValueError("the vocabulary dimension V must be at least 1")
    if not student_logits.is_floating_point() or not teacher_logits.is_floating_point():
        raise TypeError("logits must be floating point")
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher on {teacher_logits.device}, student on {student_logits.device}")
    if not isinstance(temperature, (int, float)) or not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if mask.shape != student_logits.shape[:1]:
            raise ValueError(f"mask shape {tuple(mask.shape)} != ({student_logits.shape[0]},)")
        if mask.device != student_logits.device:
            raise ValueError(f"mask on {mask.device}, logits on {student_logits.device}")


def _check_dtypes(student_logits, teacher_logits):
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")


def _require_triton(name):
    if not TRITON_AVAILABLE:
        raise RuntimeError(f"{name} needs Triton: pip install triton (Linux x86-64 wheels only); "
                           "kl_div falls back to the PyTorch versions without it")


def _new_grad_buffer(student_logits):
    """An (N, V) buffer for d loss / d student in the student's dtype, or None when no gradient is wanted.
    Inside forward, ctx.needs_input_grad ignores torch.no_grad(): the caller decides here instead."""
    if not (student_logits.requires_grad and torch.is_grad_enabled()):
        return None
    return torch.empty_like(student_logits, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------------------------
# reference: the spec


def kl_div_reference(student_logits, teacher_logits, temperature=1.0, mask=None):
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over V, averaged over counted rows.

    student_logits, teacher_logits: (N, V). mask: (N,) bool, True = the row counts (None = all count).
    Computes in float64 if either input is float64, else float32. Returns a 0-d tensor; 0 if no row counts.
    """
    _check_inputs(student_logits, teacher_logits, temperature, mask)
    float64 = torch.float64 in (student_logits.dtype, teacher_logits.dtype)
    compute_dtype = torch.float64 if float64 else torch.float32
    log_q = F.log_softmax(student_logits.to(compute_dtype) / temperature, dim=-1)            # (N, V)
    log_p = F.log_softmax(teacher_logits.detach().to(compute_dtype) / temperature, dim=-1)   # (N, V)
    # exp(log_p) underflows to exactly 0 where log_p is very negative but finite, so no 0 * inf here
    kl_rows = (log_p.exp() * (log_p - log_q)).sum(dim=-1) * temperature**2                  # (N,)
    if mask is None:
        return kl_rows.sum() / max(kl_rows.shape[0], 1)
    kl_rows = torch.where(mask, kl_rows, torch.zeros_like(kl_rows))
    return kl_rows.sum() / mask.sum().clamp_min(1)


# ----------------------------------------------------------------------------------------------
# CPU path: the reference's float32 math a chunk of rows at a time, the gradient written in the forward pass

# Rows per step of kl_div_chunked: a trade-off measured on a 2-core AVX2 CPU (V = 51864, N = 1024, float32).
# Small chunks stay in cache (16 rows: 10 MB of scratch; 0.40 s on one idle thread, against 0.55 s for 128
# rows), but every op of every chunk is a parallel region whose threads must meet, and on a busy machine
# those meetings cost more than the cache saves (2 threads under load: 2-7 s for 16 rows, 1.0-1.6 s for 128).
# 64 rows (40 MB of scratch) sits between; the reference needs 4 (N, V) float32 buffers (800 MB) more.
CHUNK_ROWS = 64


def _kl_rows(student, teacher, temperature, work, grad_scale=None, grad_out=None):
    """KL(p || q) of each of C rows, float32 (C,), without the T^2. student, teacher: (C, V), any float dtype;
    work: (3, C, V) float32 scratch. If grad_out (C, V) float32 is given it receives grad_scale * (q - p)."""
    scaled, log_q, log_p = work  # (C, V) each
    torch.div(student.float(), temperature, out=scaled)  # .float() first: s / T rounded once, in float32
    torch.log_softmax(scaled, dim=-1, out=log_q)
    torch.div(teacher.float(), temperature, out=scaled)
    torch.log_softmax(scaled, dim=-1, out=log_p)
    log_ratio = torch.sub(log_p, log_q, out=scaled)  # (C, V) log p - log q
    p = log_p.exp_()  # (C, V); exp underflows to exactly 0 where log p is very negative, so no 0 * inf
    kl = log_ratio.mul_(p).sum(dim=-1)  # (C,); in place: linalg.vecdot would allocate the product
    if grad_out is not None:
        torch.exp(log_q, out=grad_out).sub_(p).mul_(grad_scale)
    return kl


def kl_div_chunked_forward_backward(student_logits, teacher_logits, temperature, mask, grad_student,
                                    chunk_rows=CHUNK_ROWS):
    """The loss of kl_div_reference (0-d float32) chunk_rows rows at a time. Unless grad_student is None,
    also writes every element of grad_student (N, V) = d loss / d student, in the student's dtype."""
    _check_inputs(student_logits, teacher_logits, temperature, mask)
    _check_dtypes(student_logits, teacher_logits)
    n_rows, n_cols = student_logits.shape
    student_logits, teacher_logits = student_logits.detach(), teacher_logits.detach()
    count = n_rows if mask is None else int(mask.sum())
    grad_scale = temperature / max(count, 1)  # d (T^2 KL) / d s = T (q - p), averaged over the counted rows
    # float32 scratch: three (C, V) buffers, and a fourth for the gradient unless it is written in place
    grad_in_place = grad_student is not None and grad_student.dtype == torch.float32
    work = torch.empty(3 if grad_in_place else 4, min(chunk_rows, n_rows), n_cols, device=student_logits.device)
    kl_sum = torch.zeros((), dtype=torch.float64, device=student_logits.device)
    # Chunks are slices of consecutive rows, read in place. A padding mask leaves whole chunks out, which are
    # skipped; rows left out inside a chunk are computed and then dropped, row by row, so even NaN there stays
    # there. (Gathering only the counted rows copies them, and index_select took a third of the time.)
    for start in range(0, n_rows, chunk_rows):
        stop = min(start + chunk_rows, n_rows)
        counted = None if mask is None else mask[start:stop]  # (C,) bool
        if counted is not None and not counted.any():
            if grad_student is not None:
                grad_student[start:stop] = 0.0
            continue
        scratch = work[:, :stop - start]  # (3 or 4, C, V)
        grad_chunk = None
        if grad_student is not None:
            grad_chunk = grad_student[start:stop] if grad_in_place else scratch[3]
        kl = _kl_rows(student_logits[start:stop], teacher_logits[start:stop], temperature, scratch[:3],
                      grad_scale, grad_chunk)  # (C,)
        if counted is not None:
            kl = torch.where(counted, kl, 0.0)
            if grad_chunk is not None:
                grad_chunk[~counted] = 0.0
        kl_sum += kl.sum(dtype=torch.float64)
        if grad_student is not None and not grad_in_place:
            grad_student[start:stop] = grad_chunk  # rounded to the student's dtype
    return (kl_sum * temperature**2 / max(count, 1)).float()  # 0 when no row counts, as the reference


def kl_div_chunked(student_logits, teacher_logits, temperature=1.0, mask=None, chunk_rows=CHUNK_ROWS):
    """kl_div_reference's loss in (chunk_rows, V) float32 steps, for training on CPU. Returns a 0-d float32
    tensor; the gradient is computed during this call (unless none is wanted) and only scaled by backward.
    float32, bfloat16 and float16 inputs; the reference computes float64."""
    _check_inputs(student_logits, teacher_logits, temperature, mask)
    _check_dtypes(student_logits, teacher_logits)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    forward_backward = partial(kl_div_chunked_forward_backward, student_logits, teacher_logits, temperature, mask,
                               chunk_rows=chunk_rows)
    return _KLDivWithStoredGrad.apply(student_logits, forward_backward, _new_grad_buffer(student_logits))


# ----------------------------------------------------------------------------------------------
# autograd for the versions that compute the gradient in their forward pass


class _KLDivWithStoredGrad(torch.autograd.Function):
    """forward_backward(grad_student) returns the loss and, unless grad_student is None, fills it with
    d loss / d student; backward only scales that stored gradient by grad_output (in place, so it runs once)."""

    @staticmethod
    def forward(ctx, student_logits, forward_backward, grad_student):
        ctx.grad = grad_student
        return forward_backward(grad_student=grad_student)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grad is None:
            raise RuntimeError("kl_div: backward called a second time; the gradient stored by the forward pass "
                               "is scaled in place and freed by the first backward")
        # (N, V), scaled in place to save memory; grad_output stays float32, so a bfloat16 gradient is rounded once
        grad = ctx.grad.mul_(grad_output)
        ctx.grad = None
        return grad, None, None


# ----------------------------------------------------------------------------------------------
# Triton kernel: one program per row, two sweeps over the row's vocabulary blocks

if TRITON_AVAILABLE:
    @triton.jit
    def _kl_div_fwd_bwd_kernel(
        student_ptr, student_row_stride,
        teacher_ptr, teacher_row_stride,
        grad_ptr, grad_row_stride,  # (N, V) in the student's dtype; written only if WRITE_GRAD
        loss_rows_ptr,              # (N,) float32: T^2 * KL of each row, 0 for rows that do not count
        mask_ptr,                   # (N,) uint8, 1 = the row counts; read only if HAS_MASK
        inv_count_ptr,              # () float32: 1 / max(number of counted rows, 1), kept on the device
        n_cols, inv_temperature, temperature,
        HAS_MASK: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # int64 so that row * stride cannot overflow when N * V > 2^31
        student_ptr += row * student_row_stride
        teacher_ptr += row * teacher_row_stride
        grad_ptr += row * grad_row_stride

        if HAS_MASK:
            if tl.load(mask_ptr + row) == 0:  # a row that does not count: zero loss, zero gradient
                if WRITE_GRAD:
                    for start in range(0, n_cols, BLOCK_SIZE):
                        cols = start + tl.arange(0, BLOCK_SIZE)
                        tl.store(grad_ptr + cols, 0.0, mask=cols < n_cols)
                tl.store(loss_rows_ptr + row, 0.0)
                return

        # sweep 1: online max and sum of both softmaxes, and of p_t * log(p/q) up to p_t's normaliser.
        # The maxes start at the row's first logits rather than -inf, so every shift below is finite.
        max_s = tl.load(student_ptr).to(tl.float32) * inv_temperature
        max_t = tl.load(teacher_ptr).to(tl.float32) * inv_temperature
        sum_s = 0.0
        sum_t = 0.0
        sum_t_log_ratio = 0.0  # sum exp(t/T - max_t) * ((t/T - max_t) - (s/T - max_s))
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            in_row = cols < n_cols
            s = tl.load(student_ptr + cols, mask=in_row, other=0.0).to(tl.float32) * inv_temperature
            t = tl.load(teacher_ptr + cols, mask=in_row, other=0.0).to(tl.float32) * inv_temperature
            s_in_row = tl.where(in_row, s, float("-inf"))  # outside the row: no part in the max, exp = 0
            t_in_row = tl.where(in_row, t, float("-inf"))
            new_max_s = tl.maximum(max_s, tl.max(s_in_row, axis=0))
            new_max_t = tl.maximum(max_t, tl.max(t_in_row, axis=0))

            exp_s = tl.exp(s_in_row - new_max_s)
            sum_s = sum_s * tl.exp(max_s - new_max_s) + tl.sum(exp_s, axis=0)

            # the old terms were shifted by the old maxes: move them to the new ones, then rescale
            rescale_t = tl.exp(max_t - new_max_t)
            shift = (new_max_t - max_t) - (new_max_s - max_s)
            exp_t = tl.exp(t_in_row - new_max_t)
            log_ratio = (t - new_max_t) - (s - new_max_s)  # finite outside the row (s = t = 0), where exp_t = 0
            sum_t_log_ratio = (sum_t_log_ratio - sum_t * shift) * rescale_t + tl.sum(exp_t * log_ratio, axis=0)
            sum_t = sum_t * rescale_t + tl.sum(exp_t, axis=0)
            max_s = new_max_s
            max_t = new_max_t

        log_sum_s = tl.log(sum_s)
        log_sum_t = tl.log(sum_t)
        kl = sum_t_log_ratio / sum_t - log_sum_t + log_sum_s
        tl.store(loss_rows_ptr + row, kl * temperature * temperature)

        # sweep 2: d loss / d s = T * (q - p) / count, stored in the student's dtype
        if WRITE_GRAD:
            grad_scale = temperature * tl.load(inv_count_ptr)
            for start in range(0, n_cols, BLOCK_SIZE):
                cols = start + tl.arange(0, BLOCK_SIZE)
                in_row = cols < n_cols
                s = tl.load(student_ptr + cols, mask=in_row, other=0.0).to(tl.float32) * inv_temperature
                t = tl.load(teacher_ptr + cols, mask=in_row, other=0.0).to(tl.float32) * inv_temperature
                q = tl.exp((s - max_s) - log_sum_s)  # not s - lse_s: lse_s ~ 1e4 would round away q's digits
                p = tl.exp((t - max_t) - log_sum_t)
                grad = (q - p) * grad_scale
                tl.store(grad_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


def kernel_config(n_cols):
    """Block size and warps from V: one block for small V, else 4096-wide blocks (V = 51865 -> 13)."""
    block_size = min(triton.next_power_of_2(n_cols), 4096)
    num_warps = 4 if block_size <= 1024 else 8 if block_size <= 2048 else 16
    return block_size, num_warps


def kl_div_forward_backward(student_logits, teacher_logits, temperature, mask, loss_rows, grad_student,
                            block_size=None):
    """Launches the kernel. Writes every element of loss_rows (N,) float32 (T^2 * KL per row, 0 where
    masked) and, unless grad_student is None, of grad_student (N, V) = d loss / d student in the student's
    dtype (it may be student_logits itself, to overwrite the logits in place). Returns the mean loss (0-d)."""
    _require_triton("kl_div_forward_backward")
    _check_inputs(student_logits, teacher_logits, temperature, mask)
    _check_dtypes(student_logits, teacher_logits)
    n_rows, n_cols = student_logits.shape
    student_logits = student_logits.detach()
    teacher_logits = teacher_logits.detach()
    if student_logits.stride(1) != 1:
        student_logits = student_logits.contiguous()
    if teacher_logits.stride(1) != 1:
        teacher_logits = teacher_logits.contiguous()
    if (loss_rows.shape != (n_rows,) or loss_rows.dtype != torch.float32
            or loss_rows.device != student_logits.device):
        raise ValueError(f"loss_rows must be a float32 ({n_rows},) tensor on {student_logits.device}")
    if grad_student is not None and (grad_student.shape != student_logits.shape
                                     or grad_student.dtype != student_logits.dtype
                                     or grad_student.device != student_logits.device
                                     or grad_student.stride(1) != 1):
        raise ValueError(f"grad_student must be a {student_logits.dtype} tensor of shape "
                         f"{tuple(student_logits.shape)} on {student_logits.device} with unit column stride")

    # the count stays on the device (no host sync); a loss with no counted row is 0 / 1 = 0
    if mask is None:
        count = torch.full((), n_rows, dtype=torch.float32, device=student_logits.device)
    else:
        count = mask.sum(dtype=torch.float32)
    inv_count = 1.0 / count.clamp_min(1.0)  # () float32

    default_block_size, num_warps = kernel_config(n_cols)
    block_size = block_size or default_block_size
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    grad = grad_student if grad_student is not None else loss_rows  # any pointer; not touched then
    if n_rows > 0:
        _kl_div_fwd_bwd_kernel[(n_rows,)](
            student_logits, student_logits.stride(0),
            teacher_logits, teacher_logits.stride(0),
            grad, grad.stride(0),
            loss_rows,
            mask.view(torch.uint8) if mask is not None else loss_rows,
            inv_count,
            n_cols, 1.0 / temperature, float(temperature),
            HAS_MASK=mask is not None, WRITE_GRAD=grad_student is not None, BLOCK_SIZE=block_size,
            num_warps=num_warps,
        )
    return loss_rows.sum() * inv_count


def kl_div_triton(student_logits, teacher_logits, temperature=1.0, mask=None, grad_buffer=None, block_size=None):
    """Fused Triton KL loss (see kl_div_reference for the definition). Returns a 0-d float32 tensor.

    grad_buffer: optional (N, V) tensor in the student's dtype that receives the gradient (e.g. the
    student logits themselves, if nothing else reads them afterwards). block_size: override for tests.
    The teacher gets no gradient. Runs on CPU tensors only under TRITON_INTERPRET=1."""
    _require_triton("kl_div_triton")
    _check_inputs(student_logits, teacher_logits, temperature, mask)
    grad = _new_grad_buffer(student_logits)
    if grad is not None and grad_buffer is not None:
        grad = grad_buffer
    loss_rows = torch.empty(student_logits.shape[0], dtype=torch.float32, device=student_logits.device)
    forward_backward = partial(kl_div_forward_backward, student_logits, teacher_logits, temperature, mask, loss_rows,
                               block_size=block_size)
    return _KLDivWithStoredGrad.apply(student_logits, forward_backward, grad)


def kl_div(student_logits, teacher_logits, temperature=1.0, mask=None):
    """Distillation loss T^2 * KL(softmax(teacher/T) || softmax(student/T)), mean over counted rows.
    student_logits, teacher_logits: (N, V); mask: (N,) bool or None. Triton on CUDA when installed,
    kl_div_chunked on CPU when the student needs a gradient, the reference otherwise and for float64."""
    float64 = torch.float64 in (student_logits.dtype, teacher_logits.dtype)
    if student_logits.is_cuda and TRITON_AVAILABLE and not float64:
        return kl_div_triton(student_logits, teacher_logits, temperature, mask)
    wants_grad = student_logits.requires_grad and torch.is_grad_enabled()
    if student_logits.device.type == "cpu" and wants_grad and not float64:
        return kl_div_chunked(student_logits, teacher_logits, temperature, mask)
    return kl_div_reference(student_logits, teacher_logits, temperature, mask)


# ----------------------------------------------------------------------------------------------
# check every version against the float64 reference (timing: python bench.py kernels)


def _loss_and_grad(fn, student, teacher, temperature, mask):
    student = student.detach().requires_grad_()
    loss = fn(student, teacher, temperature, mask)
    loss.backward()
    return loss.detach(), student.grad


def _check(fn, device, dtype, n_rows, n_cols, temperature, masked):
    gen = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(n_rows, n_cols, generator=gen)).to(device, dtype)
    teacher = (3 * torch.randn(n_rows, n_cols, generator=gen)).to(device, dtype)
    mask = (torch.rand(n_rows, generator=gen) < 0.7).to(device) if masked else None
    loss, grad = _loss_and_grad(fn, student, teacher, temperature, mask)
    loss_ref, grad_ref = _loss_and_grad(kl_div_reference, student.double(), teacher.double(), temperature, mask)
    loss_err = ((loss.double() - loss_ref).abs() / loss_ref.abs().clamp_min(1e-30)).item()
    grad_err = ((grad.double() - grad_ref).abs().max() / grad_ref.abs().max().clamp_min(1e-30)).item()
    ok = loss_err <= 1e-4 and grad_err <= (1e-2 if dtype == torch.bfloat16 else 1e-3 if dtype == torch.float16
                                           else 1e-5)
    print(f"{fn.__name__:14s} {str(dtype):15s} N={n_rows:5d} V={n_cols:6d} T={temperature:3.1f} mask={masked!s:5s} "
          f"loss rel err {loss_err:.1e}  grad rel err {grad_err:.1e}  {'OK' if ok else 'FAIL'}")
    return ok


if __name__ == "__main__":
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = [(torch.float32, 3, 1271, 1.0, False), (torch.bfloat16, 17, 515, 2.0, True),
             (torch.float16, 5, 1271, 0.5, True), (torch.bfloat16, 2, 51865, 2.0, False)]
    if device == "cuda":
        cases += [(torch.bfloat16, 4096, 51865, 2.0, True), (torch.float32, 1024, 51865, 1.0, False)]
    versions = [kl_div_chunked] + ([kl_div_triton] if TRITON_AVAILABLE else [])
    if not TRITON_AVAILABLE:
        print("Triton is not installed: kl_div_triton is not checked")
    all_ok = all([_check(fn, device, *case) for fn in versions for case in cases])
    print("all checks passed" if all_ok else "SOME CHECKS FAILED")
    if not all_ok:
        raise SystemExit(1)
    if device == "cuda":
        print("timing: python bench.py kernels")
