"""`python bench.py kernels`: each hot-path kernel as eager reference vs torch.compile vs Triton.

    python bench.py kernels                  # the full sizes on CUDA; the quick sizes on CPU
    python bench.py kernels --quick          # small sizes
    python bench.py kernels --device cpu --kl-dtypes float32 --no-compile --repeats 3 --json out.json
    python bench.py kernels --sweep-tiles    # CUDA: the Triton log-Mel kernel under each of TILE_CANDIDATES

For each kernel and size (and, for the KL, each logits dtype) these versions of the same math run:
    eager     the plain-PyTorch reference in kernels/*.py (the spec)
    chunked   KL only: kernels.kl_div.kl_div_chunked, the CPU path kernels.kl_div dispatches to
    compile   torch.compile(reference); its first call (the compile) is reported apart, not in the median
    triton    the Triton kernel; CUDA only: on CPU Triton runs only in its interpreter, far too slow to time
Each version's first output is compared with eager's (max |out - eager| / max |eager|), so a fast wrong
kernel shows up; then come --warmup untimed calls, then --repeats timed calls, of which the median is
reported, and one more call that measures the peak memory a call needs beyond what is already held.
The floor is the least time any kernel could take: the bytes it must move divided by this device's
measured copy bandwidth; "x floor" says how far above it a version runs.

--sweep-tiles is llm.c's block-size sweep: the log-Mel Triton kernel at B = 64 x 30 s under each of
kernels.log_mel.TILE_CANDIDATES merged over DEFAULT_TILES, beside the eager reference.
"""
import functools
import statistics
import time

import torch

from audio import CHUNK_LENGTH, N_FRAMES, N_SAMPLES
from benchmarks.common import (
    ByDevice, column, machine, one_line, peak_extra_mib, pick_device, print_table, report_header, settle_defaults,
    synchronize, time_calls_ms, write_json,
)
from kernels import (
    TRITON_AVAILABLE, kl_div_chunked, kl_div_reference, kl_div_triton, log_mel_spectrogram_reference,
    log_mel_spectrogram_triton,
)
from kernels.log_mel import DEFAULT_TILES, TILE_CANDIDATES
from load import DTYPES

N_MELS = 80
VOCAB_SIZE = 51865  # Whisper's multilingual vocabulary: the KL rows of distillation are this wide
KL_TEMPERATURE = 2.0  # distil-whisper's
SWEEP_BATCH = 64  # utterances of 30 s per call in the tile sweep: enough programs to fill an H100

# On the 2-core CPU dev box the KL reference took ~11 s per call at N = 4096, and N = 16384 needs ~16 GB of
# float32 intermediates (scaled from N = 256), so CPU runs the quick sizes unless --full asks otherwise.
SIZES = {
    "full": {"log_mel": (1, 16, 64), "kl_div": (4096, 16384)},  # log-Mel: batch; KL: rows
    "quick": {"log_mel": (1, 4), "kl_div": (256, 1024)},
}
# Every default of the mode, read by both the flags' help (bench.py) and settle_defaults. Training on CPU runs
# in float32 and on GPU keeps bf16 logits, so the KL runs at both.
DEFAULTS = {"sizes": ByDevice(cuda="full", cpu="quick"), "kl_dtypes": ["float32", "bfloat16"], "repeats": 10,
            "warmup": 2, "json": "bench-kernels.json"}
QUICK = {"sizes": "quick"}
COPY_BYTES = {"cuda": 2**30, "cpu": 2**28}  # large enough that caches do not flatter the copy
L2_FLUSH_BYTES = 2**28  # larger than any GPU's L2 (H100: 50 MB): each timed call starts with a cold cache

ROW_FIELDS = ("kernel", "size", "dtype", "variant", "median_ms", "min_ms", "times_ms", "peak_extra_mib",
              "speedup_vs_eager", "bytes_moved", "floor_ms", "x_floor", "first_call_s", "max_err_vs_eager",
              "error", "note")


# ----------------------------------------------------------------------------- the kernels' inputs

class LogMelCase:
    """B utterances of 30 s of seeded noise; one call = one log-Mel spectrogram of the batch."""
    kernel, dtype = "log_mel", "float32"
    reference, triton = staticmethod(log_mel_spectrogram_reference), staticmethod(log_mel_spectrogram_triton)

    def __init__(self, batch, device):
        generator = torch.Generator(device=device).manual_seed(0)
        self.audio = torch.randn(batch, N_SAMPLES, generator=generator, device=device).mul_(0.1)  # (B, samples)
        self.size = f"B={batch} x {CHUNK_LENGTH} s"
        self.bytes_moved = 4 * self.audio.numel() + 4 * batch * N_MELS * N_FRAMES  # read audio, write mel (fp32)

    def own_variants(self):
        return []

    def reset(self):
        pass

    def call(self, fn):
        return (fn(self.audio, N_MELS),)


class KLDivCase:
    """N rows of student and teacher logits in one dtype; one call = the loss forward and backward."""
    kernel = "kl_div"
    reference, triton = staticmethod(kl_div_reference), staticmethod(kl_div_triton)

    def __init__(self, n_rows, dtype, device):
        generator = torch.Generator(device=device).manual_seed(0)
        shape = (n_rows, VOCAB_SIZE)
        self.student = torch.randn(shape, generator=generator, device=device, dtype=DTYPES[dtype]).mul_(3)
        self.student.requires_grad_()
        self.teacher = torch.randn(shape, generator=generator, device=device, dtype=DTYPES[dtype]).mul_(3)
        self.size, self.dtype = f"N={n_rows} x V={VOCAB_SIZE}", dtype
        self.bytes_moved = 3 * self.student.numel() * self.student.element_size()  # read s, t; write grad

    def own_variants(self):
        return [("chunked", kl_div_chunked, None)]  # what kernels.kl_div runs on CPU when training

    def reset(self):
        self.student.grad = None  # each call allocates its gradient afresh, as a training step would

    def call(self, fn):
        loss = fn(self.student, self.teacher, KL_TEMPERATURE)
        loss.backward()
        return loss.detach(), self.student.grad


def triton_variant(fn, device):
    """(variant, callable or None, why it does not run) of a Triton kernel on this device."""
    if not TRITON_AVAILABLE:
        return "triton", None, "n/a (Triton is not installed)"
    if device.type != "cuda":
        return "triton", None, "n/a (interpreter)"
    return "triton", fn, None


def kernel_variants(case, device, no_compile):
    """Yields (variant, callable or None, why it does not run) for eager, the case's own, compile and triton."""
    yield "eager", case.reference, None
    yield from case.own_variants()
    if no_compile:
        yield "compile", None, "skipped (--no-compile)"
    else:
        torch._dynamo.reset()  # runs when this row is reached: each compile row compiles from scratch
        yield "compile", torch.compile(case.reference, dynamic=False), None
    yield triton_variant(case.triton, device)


def tile_variants(case):
    """The eager reference, then the Triton log-Mel kernel under each of TILE_CANDIDATES."""
    yield "eager", log_mel_spectrogram_reference, None
    for tiles in TILE_CANDIDATES:
        name = " ".join(["triton"] + [f"{key}={value}" for key, value in tiles.items()])
        yield name, functools.partial(log_mel_spectrogram_triton, tiles=tiles), None


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


def bench_case(case, variants, device, bandwidth, args, l2_flush):
    """One row per variant for this kernel and size: variants(case) yields (variant, callable or None, why not)."""
    floor_ms = case.bytes_moved / bandwidth * 1e3
    rows, eager_outputs, eager_ms = [], None, None
    for variant, fn, why_not in variants(case):
        row = dict.fromkeys(ROW_FIELDS)
        row.update(kernel=case.kernel, size=case.size, dtype=case.dtype, variant=variant,
                   bytes_moved=case.bytes_moved, floor_ms=floor_ms, note=why_not)
        rows.append(row)
        label = f"{case.kernel} {case.size} {case.dtype} {variant}"
        if fn is None:
            print(f"{label}: {why_not}")
            continue
        print(f"{label}: running", flush=True)
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

COLUMNS = (column("kernel", "kernel"), column("size", "size"), column("dtype", "dtype"),
           column("variant", "variant"), column("median ms", "median_ms", ".3f"),
           column("peak MiB", "peak_extra_mib", ".1f"), column("vs eager", "speedup_vs_eager", lambda v: f"{v:.2f}x"),
           column("floor ms", "floor_ms", ".3f"), column("x floor", "x_floor", lambda v: f"{v:.1f}x"),
           column("1st call s", "first_call_s", ".2f"), column("err vs eager", "max_err_vs_eager", ".1e"))


def not_measured(row):
    return (row["error"] or row["note"]) if row["median_ms"] is None else None


def report_notes(device):
    notes = [
        "median_ms: median of the timed calls, after one checked first call and the warm-up calls",
        ("first_call_s: wall time of the first call; for compile rows this is the compile time, which for the "
         "first compile row includes inductor's one-time start-up and for every row any hits in inductor's "
         "on-disk cache"),
        ("max_err_vs_eager: max |out - eager| / max |eager| over the outputs (log-Mel: the spectrogram; "
         "KL: the loss and the student gradient)"),
        ("floor_ms: bytes_moved / copy bandwidth; log-Mel moves the fp32 audio in and the fp32 mel out, "
         "KL fwd+bwd reads both logits and writes the student gradient, all in the row's dtype"),
        "KL: temperature 2, student requires grad; timed as loss.backward() included",
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
    if not TRITON_AVAILABLE:
        notes.append("triton: not installed here, so no Triton row ran and triton_version is null")
    return notes


def triton_version():
    if not TRITON_AVAILABLE:
        return None
    import triton  # here, not at the top: the benchmarks run where Triton is not installed

    return triton.__version__


def planned_cases(args, device):
    """(make the case, its variants) of every case of the run: each case is made when its turn comes and
    freed after it, so only one holds its inputs at a time (full-size KL logits run to gigabytes)."""
    if args.sweep_tiles:
        return [(functools.partial(LogMelCase, SWEEP_BATCH, device), tile_variants)]
    variants = functools.partial(kernel_variants, device=device, no_compile=args.no_compile)
    return ([(functools.partial(LogMelCase, batch, device), variants) for batch in SIZES[args.sizes]["log_mel"]]
            + [(functools.partial(KLDivCase, n_rows, dtype, device), variants)
               for dtype in args.kl_dtypes for n_rows in SIZES[args.sizes]["kl_div"]])


def describe_run(args, device):
    if args.sweep_tiles:
        return (f"tile sweep: log-Mel B = {SWEEP_BATCH} x {CHUNK_LENGTH} s under {len(TILE_CANDIDATES)} "
                f"overrides of DEFAULT_TILES = {DEFAULT_TILES}")
    why = (" (the default on CPU: the full KL sizes need ~16 GB and minutes a call; --full runs them)"
           if device.type == "cpu" and args.sizes == "quick" and not args.quick else "")
    return (f"sizes: {args.sizes}{why}: log-Mel B = {SIZES[args.sizes]['log_mel']} x {CHUNK_LENGTH} s; KL N = "
            f"{SIZES[args.sizes]['kl_div']} x {VOCAB_SIZE} in {', '.join(args.kl_dtypes)}")


def run(args):
    """`python bench.py kernels`: every kernel at every size, then the table and the JSON report."""
    device = pick_device(args.device)
    if args.sweep_tiles and (device.type != "cuda" or not TRITON_AVAILABLE):
        raise SystemExit("--sweep-tiles times the Triton log-Mel kernel, which needs a CUDA GPU and Triton "
                         "(on CPU Triton runs only in its interpreter, far too slow to time)")
    settle_defaults(args, device, DEFAULTS, QUICK)
    report = report_header("kernels", device)
    print(f"{machine(report)}; triton {triton_version() or 'not installed'}")
    print(f"{describe_run(args, device)}; warm-up {args.warmup}, median of {args.repeats}")

    bandwidth = measure_copy_bandwidth(device, args.repeats)
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write, {COPY_BYTES[device.type] // 2**20} MiB copy)")
    l2_flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if device.type == "cuda" else None
    rows = []
    for make_case, variants in planned_cases(args, device):
        rows += bench_case(make_case(), variants, device, bandwidth, args, l2_flush)
    print_table(COLUMNS, rows, f"kernels on {machine(report)}", lead=4, why_not=not_measured)

    report.update(triton_version=triton_version(), sizes="sweep" if args.sweep_tiles else args.sizes,
                  kl_dtypes=args.kl_dtypes, warmup=args.warmup, repeats=args.repeats,
                  tiles=[{**DEFAULT_TILES, **t} for t in TILE_CANDIDATES] if args.sweep_tiles else None,
                  copy_bandwidth_gb_s=bandwidth / 1e9, notes=report_notes(device), rows=rows)
    write_json(report, args.json)
