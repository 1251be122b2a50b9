"""What every benchmark mode shares: clocks, memory peaks, the defaults, the report header, tables, the
audio every model hears, runs over it, and the plot.

Timing rules, the same in every mode: warm up first, synchronise the GPU before reading a clock (or time on
the GPU with CUDA events), take the median of repeats, and feed fixed inputs. Only bench.py and benchmarks/
import this.
"""
import ctypes
import ctypes.util
import datetime
import functools
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Union

import numpy as np
import torch

from audio import N_SAMPLES, SAMPLE_RATE, load_audio
from data import DEV_SPEAKERS, data_root, joined_windows, list_utterances
from load import default_device

MIB = 2**20
DEFAULT_DATA = "train-clean-5"  # under data_root(): with DEV_SPEAKERS, the audio every mode hears by default


# ----------------------------------------------------------------------------- clocks

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls_ms(call, device, repeats, before_each):
    """Milliseconds of each of `repeats` calls; before_each() runs outside the clock."""
    times = []
    for _ in range(repeats):
        before_each()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            result = call()
            times.append((time.perf_counter() - start) * 1e3)
        del result  # freed after the clock stops: freeing the outputs is not the measured work
    return times


def median_ms(call, device, warmup, repeats):
    """(median ms, all timed ms, peak extra MiB) of `repeats` timed calls after max(warmup, 1) untimed ones,
    the first of which measures the peak memory a call needs."""
    peak = peak_extra_mib(call, device)
    for _ in range(warmup - 1):
        call()
    synchronize(device)
    times = time_calls_ms(call, device, repeats, before_each=lambda: None)
    return statistics.median(times), times, peak


def timed_s(call, device):
    """(result, wall seconds) of one call, the GPU drained before and after: for calls that go back and forth
    between host and device (a whole transcription), where wall time is the honest measure."""
    synchronize(device)
    start = time.perf_counter()
    result = call()
    synchronize(device)
    return result, time.perf_counter() - start


# ----------------------------------------------------------------------------- memory

def _proc_status_bytes(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise OSError(f"/proc/self/status has no {field}")


def peak_rss_growth_mib(call):
    """CPU: how far the resident set grows above its size before the call, in MiB; None off Linux.
    torch's CPU tensors bypass tracemalloc and torch keeps no CPU peak statistic, but Linux can reset
    the peak RSS (VmHWM). malloc_trim first returns freed heap pages to the system, so memory the
    allocator would reuse counts as growth again rather than hiding inside the RSS already held."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # 5 = reset the peak RSS to the current RSS
        held = _proc_status_bytes("VmRSS")
    except (OSError, AttributeError, TypeError):
        return None
    result = call()
    grown = _proc_status_bytes("VmHWM") - held
    del result
    return grown / MIB


def peak_extra_mib(call, device, before_each=lambda: None):
    """Peak memory one call needs beyond what is held before it (inputs and weights exist), in MiB.
    CUDA: torch's allocator statistics (so only memory torch allocates); CPU: growth of the peak RSS."""
    before_each()
    if device.type != "cuda":
        return peak_rss_growth_mib(call)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    held = torch.cuda.memory_allocated(device)
    result = call()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return (peak - held) / MIB


# ----------------------------------------------------------------------------- defaults

@dataclass(frozen=True)
class ByDevice:
    """A default that differs between a GPU run and a CPU run."""
    cuda: Any
    cpu: Any

    def on(self, device):
        return self.cuda if device.type == "cuda" else self.cpu


def spell(value) -> str:
    """A default as a user would type it: lists space-separated, ByDevice as both of its values."""
    if isinstance(value, ByDevice):
        return f"{spell(value.cuda)} on CUDA, {spell(value.cpu)} on CPU"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def default_help(text: str, name: str, defaults: dict, quick: dict) -> str:
    """A flag's help: the text, then its default and its --quick value from the mode's tables."""
    said = [f"default: {spell(defaults[name])}"] if defaults.get(name) is not None else []
    said = "; ".join(said + ([f"quick: {spell(quick[name])}"] if name in quick else []))
    if not said:
        return text
    return f"{text} ({said})" if text else said


def quick_help(quick: dict) -> str:
    return "CI-sized: " + ", ".join(f"{name}={spell(value)}" for name, value in quick.items())


def settle_defaults(args, device, defaults: dict, quick: dict):
    """Every flag left unset (None) takes its --quick value under --quick, else the mode's default; a ByDevice
    default takes this device's value. The flags' help reads the same two tables (default_help)."""
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            value = quick.get(name, value) if args.quick else value
            setattr(args, name, value.on(device) if isinstance(value, ByDevice) else value)


def pick_device(name):
    return torch.device(name) if name else default_device()


# ----------------------------------------------------------------------------- the report

def cpu_model() -> str:
    """The CPU's model name: /proc/cpuinfo's on Linux, else what platform knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def load_average():
    """The 1-minute load average: on a shared machine, what else was running says how far to trust a CPU time."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def report_header(mode, device):
    """The fields every mode's JSON starts with: what ran, where and when."""
    return {"mode": mode, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": device.type, "device_name": device_name(device), "torch_version": torch.__version__,
            "python_version": platform.python_version(), "cpu_model": cpu_model(),
            # the widest vector unit torch's CPU kernels use ("AVX2", "AVX512", ...): CPU times hang on it
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "load_average_start": load_average()}


def machine(report) -> str:
    """The report header in a line, for a table's title: on what the numbers were measured."""
    cpu = f"CPU {report['cpu_model']} ({report['cpu_capability']}), {report['cpu_threads']} threads"
    gpu = f"{report['device_name']}; " if report["device"] == "cuda" else ""
    return f"{gpu}{cpu}; torch {report['torch_version']}"


def write_json(report, path):
    """Writes the report, with the load average at its end beside the one at its start."""
    report["load_average_end"] = load_average()
    print(f"load average (1 min): {number(report['load_average_start'], '.2f')} at the start, "
          f"{number(report['load_average_end'], '.2f')} at the end ({report['cpu_count']} CPUs)")
    with open(path, "w") as out:
        json.dump(report, out, indent=1, allow_nan=False)
    print(f"\nwrote {path}")


def one_line(error):
    """The exception's type and first line: compile errors run to pages, the JSON row gets the gist."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def number(value, spec):
    return "-" if value is None else format(value, spec)


@dataclass(frozen=True)
class Column:
    header: str
    value: Callable[[dict], Any]  # the cell's value from the row; None prints as "-"
    spec: Union[str, Callable[[Any], str]] = ""  # a format spec or a function to text; "": text


def column(header, key, spec=""):
    """A column showing row[key]."""
    return Column(header, lambda row: row[key], spec)


def print_table(columns: Sequence[Column], rows: List[dict], title: str = "", lead: int = 0,
                why_not: Callable[[dict], Optional[str]] = lambda row: None):
    """The rows under a heading, each column as wide as its widest cell: text to the left, numbers to the
    right. A row for which why_not gives a text shows its first `lead` cells and then that text."""
    def cell(col, row):
        value = col.value(row)
        return "-" if value is None else col.spec(value) if callable(col.spec) else format(value, col.spec)

    def aligned(texts):  # text to the left, numbers (they have a format spec) to the right
        return [t.ljust(w) if col.spec == "" else t.rjust(w) for t, w, col in zip(texts, widths, columns)]

    cells = [[cell(col, row) for col in columns] for row in rows]
    widths = [max([len(col.header)] + [len(line[i]) for line in cells]) for i, col in enumerate(columns)]
    header = " ".join(aligned([col.header for col in columns])).rstrip()
    print(f"\n{title}\n{header}" if title else f"\n{header}")
    print("-" * len(header))
    for row, line in zip(rows, cells):
        reason = why_not(row)
        print(" ".join(aligned(line)[:lead] + [reason]) if reason else " ".join(aligned(line)).rstrip())


# ----------------------------------------------------------------------------- the audio every model hears

@dataclass(frozen=True, eq=False)
class Clip:
    id: str
    audio: np.ndarray  # float32, 16 kHz mono
    text: str

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def load_clips(data: Optional[List[str]], speakers: Optional[str], n_utterances: int, n_windows: int):
    """(utterances, windows, a description of the utterances): the fixed audio every model is timed on.
    Default: the dev speakers of DEFAULT_DATA."""
    if data is None:
        data, speakers = [data_root() / DEFAULT_DATA], speakers or ",".join(DEV_SPEAKERS)
    keep = speakers.split(",") if speakers else None
    found = [u for source in data for u in list_utterances(source, keep)]
    clips = [Clip(u.id, load_audio(u.audio), u.text) for u in found if u.text]
    clips = [clip for clip in clips if len(clip.audio) <= N_SAMPLES]  # transcribe_clips takes <= 30 s
    picked = np.unique(np.linspace(0, len(clips) - 1, min(n_utterances, len(clips))).round().astype(int))
    description = (f"{len(picked)} of the {len(clips)} utterances of {', '.join(map(str, data))}"
                   f"{f' (speakers {speakers})' if speakers else ''}, evenly spaced in id order")
    windows = joined_windows([(c.id, c.audio, c.text) for c in clips], n_windows)
    # a window is named by its first utterance and the last one's number: 1-10-0001..0003
    windows = [Clip(f"{w.ids[0]}..{w.ids[-1].rsplit('-', 1)[1]}", w.audio, w.text) for w in windows]
    return [clips[i] for i in picked], windows, description


def speech_cuts(clips: List[Clip], seconds: Sequence[int]) -> List[Clip]:
    """Real speech of exact lengths: for each N, the first N seconds of the clips played end to end in the
    order given (cycled when they are shorter), so every cut is a prefix of the longest. Cut anywhere, even
    mid-word, so they have no reference text: for timing only."""
    longest = max(seconds) * SAMPLE_RATE
    audio = np.concatenate([c.audio for c in clips])
    audio = np.tile(audio, math.ceil(longest / len(audio)))
    return [Clip(f"{n} s from {clips[0].id}", audio[: n * SAMPLE_RATE], "") for n in seconds]


# ----------------------------------------------------------------------------- runs over audio

def full_batches(items, batch_size):
    """Consecutive batches of exactly batch_size items, the list cycled to fill the last one, so every
    timed call has the batch size its row says."""
    n_batches = math.ceil(len(items) / batch_size)
    return [[items[(i * batch_size + j) % len(items)] for j in range(batch_size)] for i in range(n_batches)]


@dataclass
class Timed:
    """One contender's part of a run in turns: per batch the median seconds and the last pass's output."""
    seconds: List[float]
    outputs: list
    peak_mib: Optional[float]
    error: Optional[str] = None  # the first failure, after which the contender sat out


SETTLE_S = 0.5  # idle time before each contender's turn (see time_in_turns)


def time_in_turns(calls, batches, passes, device):
    """Times every call on every batch. calls: {name: call(index, batch) -> output}, run in that order.
    First each call warms up on batch 0 (its peak memory is recorded); then, `passes` times, each call in
    turn runs all the batches, so a change in the machine's load over minutes hits them alike. The turns
    are whole passes, after an idle SETTLE_S, not single batches: an engine's OpenMP threads keep spinning
    for up to ~200 ms after its last call (CTranslate2 ships Intel's runtime, torch GNU's), and on a
    2-core CPU batch-by-batch turns made each engine pay for the spinning of the one before it (ours
    measured 0.131 RTF beside faster-whisper, 0.099 alone). A call that raises records the error and sits
    out the rest. Returns {name: Timed}."""
    timed = {name: Timed([[] for _ in batches], [None] * len(batches), None) for name in calls}

    def attempt(name, function, *args):
        try:
            return function(*args)
        except Exception as error:  # noqa: BLE001  one contender failing costs its rows, not the others'
            timed[name].error = one_line(error)

    for name, call in calls.items():
        time.sleep(SETTLE_S)
        timed[name].peak_mib = attempt(name, peak_extra_mib, functools.partial(call, 0, batches[0]), device)
    for _ in range(passes):
        for name, call in calls.items():
            time.sleep(SETTLE_S)
            for i, batch in enumerate(batches):
                if timed[name].error is None:
                    measured = attempt(name, timed_s, functools.partial(call, i, batch), device)
                    if measured is not None:
                        timed[name].outputs[i] = measured[0]
                        timed[name].seconds[i].append(measured[1])
    for result in timed.values():
        result.seconds = None if result.error else [statistics.median(s) for s in result.seconds]
    return timed


def run_summary(batch_s, batch_audio_s, tokens=None):
    """Throughput and latency of one run: batch_s[i] seconds for batch i holding batch_audio_s[i] s of audio."""
    total_s, audio_s = sum(batch_s), sum(batch_audio_s)
    latencies_ms = sorted(1e3 * s for s in batch_s)
    return {"n_batches": len(batch_s), "audio_seconds": audio_s, "total_s": total_s, "rtf": total_s / audio_s,
            "audio_s_per_s": audio_s / total_s, "latency_ms_median": statistics.median(latencies_ms),
            "latency_ms_p90": latencies_ms[min(len(latencies_ms) - 1, math.ceil(0.9 * len(latencies_ms)) - 1)],
            "tokens": tokens, "tokens_per_s": None if tokens is None else tokens / total_s,
            "batch_ms": [1e3 * s for s in batch_s], "batch_audio_s": list(batch_audio_s)}


# ----------------------------------------------------------------------------- the plot

def plot_runs(runs, path, title):
    """Latency vs audio length at batch 1 (a point per utterance or window; greedy where it ran) and, when
    several batch sizes ran, median latency per batch vs batch size. A colour per model; forced-length runs
    are crosses and dashed lines, beam search dotted. Returns (path or None, a note saying why not)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return None, "matplotlib is not installed: no plot (pip install matplotlib)"
    runs = [r for r in runs if r.get("total_s") is not None]
    if not runs:
        return None, "nothing was measured: no plot"
    colours = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(r["model"] for r in runs))}
    batch_sizes = sorted({r["batch_size"] for r in runs if r["set"] == "utterances"})
    length_decoder = "greedy" if any(r["decoder"] == "greedy" for r in runs) else runs[0]["decoder"]
    figure, panels = plt.subplots(1, 2 if len(batch_sizes) > 1 else 1, figsize=(13, 5), squeeze=False)
    by_length = panels[0][-1]
    for (name, decoder), rows in _group(runs, lambda r: (r["model"], r["decoder"])).items():
        forced = rows[0].get("forced_length")
        if decoder == length_decoder:  # latency follows the tokens as much as the length: no line through them
            points = [point for r in rows if r["batch_size"] == 1 for point in zip(r["batch_audio_s"], r["batch_ms"])]
            by_length.scatter(*zip(*points), s=14, color=colours[name], label=name, marker="x" if forced else "o")
        if len(batch_sizes) > 1:
            line = sorted((r for r in rows if r["set"] == "utterances"), key=lambda r: r["batch_size"])
            panels[0][0].plot([r["batch_size"] for r in line], [r["latency_ms_median"] for r in line],
                              ":" if decoder != "greedy" else "--" if forced else "-", marker="o",
                              color=colours[name], label=f"{name} {decoder}")
    by_length.set(xlabel="audio length (s)", ylabel="latency (ms)",
                  title=f"latency vs audio length (batch 1, {length_decoder})")
    if len(batch_sizes) > 1:
        panels[0][0].set(xlabel="batch size", ylabel="median latency per batch (ms)", yscale="log",
                         title="latency vs batch size (utterances)")
        panels[0][0].set_xscale("log", base=2)
        panels[0][0].set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    for axes in panels[0]:
        axes.legend(fontsize=7)
        axes.grid(alpha=0.3)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return str(path), None


def _group(rows, key):
    groups = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups
