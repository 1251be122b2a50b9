"""`python bench.py kernels`: each hot-path kernel as eager reference vs torch.compile vs Triton.

    python bench.py kernels               # the issue's sizes on CUDA; the quick sizes on CPU
    python bench.py kernels --quick       # small sizes
    python bench.py kernels --device cpu --no-compile --repeats 3 --json out.json

For each kernel and size, three versions of the same math run:
    eager     the plain-PyTorch reference in kernels/*.py (the spec)
    compile   torch.compile(reference); its first call (the compile) is reported apart, not in the median
    triton    the Triton kernel; CUDA only: on CPU Triton runs only in its interpreter, far too slow to time
Each version's first output is compared with eager's (max |out - eager| / max |eager|), so a fast wrong
kernel shows up; then come --warmup untimed calls, then --repeats timed calls, of which the median is
reported, and one more call that measures the peak memory a call needs beyond what is already held.
The floor is the least time any kernel could take: the bytes it must move divided by this device's
measured copy bandwidth; "x floor" says how far above it a version runs.
"""
import statistics
import time

import torch
import triton

from bench_common import (
    device_name, number, one_line, peak_extra_mib, pick_device, print_heading, report_header, synchronize, time_calls_ms,
    write_json,
)
from kernels.kl_div import kl_div_reference, kl_div_triton
from kernels.log_mel import HOP_LENGTH, SAMPLE_RATE, log_mel_spectrogram_reference

try:
    from kernels.log_mel import log_mel_spectrogram_triton
except ImportError:  # the log-Mel kernel is not written yet: its row says so instead of a number
    log_mel_spectrogram_triton = None

AUDIO_SECONDS = 30  # Whisper's fixed window
N_MELS = 80
VOCAB_SIZE = 51865  # Whisper's multilingual vocabulary: the KL rows of distillation are this wide
KL_DTYPE = torch.bfloat16  # distillation keeps logits in bf16
KL_TEMPERATURE = 2.0  # distil-whisper's

# The full sizes are the issue's. On the 2-core CPU dev box the KL reference took ~11 s per call at N = 4096,
# and N = 16384 needs ~16 GB of float32 intermediates (scaled from N = 256), so CPU defaults to quick.
SIZES = {
    "full": {"log_mel": (1, 16, 64), "kl_div": (4096, 16384)},  # log-Mel: batch; KL: rows
    "quick": {"log_mel": (1, 4), "kl_div": (256, 1024)},
}
COPY_BYTES = {"cuda": 2**30, "cpu": 2**28}  # large enough that caches do not flatter the copy
L2_FLUSH_BYTES = 2**28  # larger than any GPU's L2 (H100: 50 MB): each timed call starts with a cold cache

ROW_FIELDS = ("kernel", "size", "variant", "median_ms", "min_ms", "times_ms", "peak_extra_mib",
              "speedup_vs_eager", "bytes_moved", "floor_ms", "x_floor", "first_call_s", "max_err_vs_eager",
              "error", "note")


# ----------------------------------------------------------------------------- the kernels' inputs

class LogMelCase:
    """B utterances of 30 s of seeded noise; one call = one log-Mel spectrogram of the batch."""
    kernel = "log_mel"

    def __init__(self, batch, device):
        generator = torch.Generator(device=device).manual_seed(0)
        samples = AUDIO_SECONDS * SAMPLE_RATE
        self.audio = torch.randn(batch, samples, generator=generator, device=device).mul_(0.1)  # (B, samples)
        self.size = f"B={batch} x {AUDIO_SECONDS} s"
        frames = samples // HOP_LENGTH
        self.bytes_moved = 4 * self.audio.numel() + 4 * batch * N_MELS * frames  # read audio, write mel (fp32)

    def reset(self):
        pass

    def call(self, fn):
        return (fn(self.audio, N_MELS),)


class KLDivCase:
    """N rows of bf16 student and teacher logits; one call = the loss forward and backward."""
    kernel = "kl_div"

    def __init__(self, n_rows, device):
        generator = torch.Generator(device=device).manual_seed(0)
        shape = (n_rows, VOCAB_SIZE)
        self.student = torch.randn(shape, generator=generator, device=device, dtype=KL_DTYPE).mul_(3)
        self.student.requires_grad_()
        self.teacher = torch.randn(shape, generator=generator, device=device, dtype=KL_DTYPE).mul_(3)
        self.size = f"N={n_rows} x V={VOCAB_SIZE}"
        self.bytes_moved = 3 * self.student.numel() * self.student.element_size()  # read s, t; write grad

    def reset(self):
        self.student.grad = None  # each call allocates its gradient afresh, as a training step would

    def call(self, fn):
        loss = fn(self.student, self.teacher, KL_TEMPERATURE)
        loss.backward()
        return loss.detach(), self.student.grad


def kernel_variants(reference, triton_fn, device, no_compile):
    """Yields (variant, callable or None, why it does not run) for eager, compile and triton."""
    yield "eager", reference, None
    if no_compile:
        yield "compile", None, "skipped (--no-compile)"
    else:
        torch._dynamo.reset()  # runs when this row is reached: each compile row compiles from scratch
        yield "compile", torch.compile(reference, dynamic=False), None
    if device.type != "cuda":
        yield "triton", None, "n/a (interpreter)"
    elif triton_fn is None:
        yield "triton", None, "n/a (no Triton kernel in kernels/)"
    else:
        yield "triton", triton_fn, None


# ----------------------------------------------------------------------------- measurement

def measure_copy_bandwidth(device, repeats):
    """Bytes per second of a large device-to-same-device copy, counting bytes read and written."""
    n_bytes = COPY_BYTES[device.type]
    source = torch.ones(n_bytes // 4, device=device)
    destination = torch.empty_like(source)
    destination.copy_(source)  # warm up: fault in the pages
    synchronize(device)
    times = time_calls_ms(lambda: destination.copy_(source), device, repeats, before_each=lambda: None)
    return 2 * n_bytes / (statistics.median(times) / 1e3)


def max_relative_error(outputs, reference_outputs):
    """max |out - ref| / max |ref| over each output tensor (loss, gradient, ...), the worst of them."""
    errors = []
    for out, ref in zip(outputs, reference_outputs):
        out, ref = out.detach().float(), ref.detach().float()
        errors.append(((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item())
    return max(errors)


def measure_variant(case, fn, device, args, l2_flush):
    """First (checked) call, warm-up, timed calls, memory. Returns (measured fields, first outputs)."""
    def before_each():
        case.reset()
        if l2_flush is not None:
            l2_flush.zero_()

    case.reset()
    start = time.perf_counter()
    outputs = case.call(fn)  # for torch.compile this call compiles
    synchronize(device)
    first_call_s = time.perf_counter() - start
    case.reset()  # the outputs live on in `outputs`; the next call gets a fresh gradient

    for _ in range(args.warmup):
        before_each()
        case.call(fn)
    synchronize(device)
    times = time_calls_ms(lambda: case.call(fn), device, args.repeats, before_each)
    peak = peak_extra_mib(lambda: case.call(fn), device, before_each)
    case.reset()
    measured = {"median_ms": statistics.median(times), "min_ms": min(times), "times_ms": times,
                "peak_extra_mib": peak, "first_call_s": first_call_s}
    return measured, outputs


def bench_case(case, reference, triton_fn, device, bandwidth, args, l2_flush):
    """One row per variant for this kernel and size."""
    floor_ms = case.bytes_moved / bandwidth * 1e3
    rows, eager_outputs, eager_ms = [], None, None
    for variant, fn, why_not in kernel_variants(reference, triton_fn, device, args.no_compile):
        row = dict.fromkeys(ROW_FIELDS)
        row.update(kernel=case.kernel, size=case.size, variant=variant, bytes_moved=case.bytes_moved,
                   floor_ms=floor_ms, note=why_not)
        rows.append(row)
        if fn is None:
            print(f"{case.kernel} {case.size} {variant}: {why_not}")
            continue
        print(f"{case.kernel} {case.size} {variant}: running", flush=True)
        try:
            measured, outputs = measure_variant(case, fn, device, args, l2_flush)
        except Exception as error:  # noqa: BLE001  a failed compile or an out-of-memory costs one row, not the table
            row["error"] = one_line(error)
        if row["error"] is not None:  # out of the except block, so its traceback no longer holds tensors
            print(f"  failed: {row['error']}")
            case.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        row.update(measured)
        row["x_floor"] = row["median_ms"] / floor_ms
        if variant == "eager":
            eager_outputs, eager_ms = outputs, row["median_ms"]
        elif eager_outputs is not None:
            row["max_err_vs_eager"] = max_relative_error(outputs, eager_outputs)
        if eager_ms is not None:
            row["speedup_vs_eager"] = eager_ms / row["median_ms"]
        del outputs
    return rows


# ----------------------------------------------------------------------------- report

def print_table(rows):
    header = (f"{'kernel':8s} {'size':18s} {'variant':8s} {'median ms':>10s} {'peak MiB':>9s} {'vs eager':>9s} "
              f"{'floor ms':>9s} {'x floor':>8s} {'1st call s':>10s} {'err vs eager':>12s}")
    print_heading(header)
    for row in rows:
        start = f"{row['kernel']:8s} {row['size']:18s} {row['variant']:8s}"
        if row["median_ms"] is None:
            print(f"{start} {row['error'] or row['note']}")
            continue
        speedup = "-" if row["speedup_vs_eager"] is None else f"{row['speedup_vs_eager']:.2f}x"
        print(f"{start} {row['median_ms']:10.3f} {number(row['peak_extra_mib'], '9.1f')} {speedup:>9s} "
              f"{row['floor_ms']:9.3f} {row['x_floor']:7.1f}x {row['first_call_s']:10.2f} "
              f"{number(row['max_err_vs_eager'], '12.1e')}")


def choose_sizes(args, device):
    if args.quick:
        return "quick"
    if args.full or device.type == "cuda":
        return "full"
    print("CPU: the full KL sizes (N up to 16384 x 51865) need more memory and minutes per call than a CPU "
          "run should take, so the quick sizes run (--full forces the full ones)")
    return "quick"


def report_notes(device):
    notes = [
        "median_ms: median of the timed calls, after one checked first call and the warm-up calls",
        ("first_call_s: wall time of the first call; for compile rows this is the compile time, which for the "
         "first compile row includes inductor's one-time start-up and for every row any hits in inductor's "
         "on-disk cache"),
        ("max_err_vs_eager: max |out - eager| / max |eager| over the outputs (log-Mel: the spectrogram; "
         "KL: the loss and the student gradient)"),
        ("floor_ms: bytes_moved / copy bandwidth; log-Mel moves the fp32 audio in and the fp32 mel out, "
         "KL fwd+bwd reads both bf16 logits and writes the bf16 student gradient"),
        "KL: bf16 logits, temperature 2, student requires grad; timed as loss.backward() included",
    ]
    if device.type == "cuda":
        notes.append("peak_extra_mib: torch.cuda.max_memory_allocated during one call minus memory_allocated "
                     "before it (inputs exist); includes the call's outputs (the KL gradient)")
        notes.append(f"each timed call starts after zeroing a {L2_FLUSH_BYTES // 2**20} MiB buffer, so L2 is cold")
    else:
        notes.append("peak_extra_mib: CPU has no allocator statistic; this is the growth of the process's peak "
                     "resident set (Linux VmHWM, reset through /proc/self/clear_refs after malloc_trim) during "
                     "one call: page-granular and approximate; null where the OS does not allow it")
        notes.append("triton: not timed on CPU, where Triton runs only in its interpreter")
    return notes


def run(args):
    """`python bench.py kernels`: every kernel at every size, then the table and the JSON report."""
    device = pick_device(args.device)
    sizes = choose_sizes(args, device)
    print(f"device: {device_name(device)}; torch {torch.__version__}, triton {triton.__version__}")
    print(f"sizes: {sizes}: log-Mel B = {SIZES[sizes]['log_mel']} x {AUDIO_SECONDS} s; KL N = "
          f"{SIZES[sizes]['kl_div']} x {VOCAB_SIZE} bf16; warm-up {args.warmup}, median of {args.repeats}")

    bandwidth = measure_copy_bandwidth(device, args.repeats)
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write, {COPY_BYTES[device.type] // 2**20} MiB copy)")
    l2_flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    rows = []
    for batch in SIZES[sizes]["log_mel"]:
        rows += bench_case(LogMelCase(batch, device), log_mel_spectrogram_reference, log_mel_spectrogram_triton,
                           device, bandwidth, args, l2_flush)
    for n_rows in SIZES[sizes]["kl_div"]:
        rows += bench_case(KLDivCase(n_rows, device), kl_div_reference, kl_div_triton,
                           device, bandwidth, args, l2_flush)
    print_table(rows)

    report = report_header("kernels", device)
    report.update(triton_version=triton.__version__, sizes=sizes, warmup=args.warmup, repeats=args.repeats,
                  copy_bandwidth_gb_s=bandwidth / 1e9, notes=report_notes(device), rows=rows)
    write_json(report, args.json)
