"""`python bench.py kernels` end to end on CPU at the quick sizes: every JSON field is there, and every
number of what ran is finite, positive and consistent with the floor's definition."""
import functools
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import kernel_timing

ROOT = Path(__file__).resolve().parents[1]

REPORT_FIELDS = ("mode", "date", "device", "device_name", "torch_version", "triton_version", "python_version",
                 "cpu_model", "cpu_capability", "cpu_threads", "sizes", "kl_dtypes", "warmup", "repeats",
                 "copy_bandwidth_gb_s", "notes", "rows")
ROW_FIELDS = ("kernel", "size", "dtype", "variant", "median_ms", "min_ms", "times_ms", "peak_extra_mib",
              "speedup_vs_eager", "bytes_moved", "floor_ms", "x_floor", "first_call_s", "max_err_vs_eager",
              "error", "note")
REPEATS = 2
# the quick sizes, and the bytes each must move: log-Mel reads fp32 audio and writes the fp32 (80, 3000) mel
# of each utterance; KL forward+backward reads student and teacher logits and writes the gradient, each element
# 4 bytes in float32 and 2 in bfloat16
EXPECTED_BYTES = {
    ("log_mel", "B=1 x 30 s", "float32"): 4 * 480_000 + 4 * 80 * 3000,
    ("log_mel", "B=4 x 30 s", "float32"): 4 * (4 * 480_000 + 4 * 80 * 3000),
    **{("kl_div", f"N={n} x V=51865", dtype): 3 * size * n * 51865
       for n in (256, 1024) for dtype, size in (("float32", 4), ("bfloat16", 2))},
}
VARIANTS = {"log_mel": ["eager", "compile", "triton"], "kl_div": ["eager", "chunked", "compile", "triton"]}


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def run_quick_bench(json_path):
    command = [sys.executable, "bench.py", "kernels", "--device", "cpu", "--quick", "--repeats", str(REPEATS),
               "--no-compile", "--json", str(json_path)]
    # the timeout is generous: on a loaded shared box this takes minutes where it takes one alone
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"bench.py failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout, json.loads(json_path.read_text())


def check_ran(row):
    """Every number of a version that ran is measured and consistent."""
    assert row["error"] is None and row["note"] is None
    assert len(row["times_ms"]) == REPEATS and all(positive(t) for t in row["times_ms"])
    assert math.isclose(row["median_ms"], statistics.median(row["times_ms"]))
    assert positive(row["min_ms"]) and row["min_ms"] <= row["median_ms"]
    assert positive(row["first_call_s"]) and positive(row["speedup_vs_eager"])
    assert math.isclose(row["x_floor"], row["median_ms"] / row["floor_ms"])
    if sys.platform.startswith("linux"):  # peak RSS growth needs /proc; the outputs alone are > 0
        assert positive(row["peak_extra_mib"])


def test_bench_kernels_quick_cpu(tmp_path):
    stdout, report = run_quick_bench(tmp_path / "bench-kernels.json")

    assert set(REPORT_FIELDS) <= set(report)
    assert report["mode"] == "kernels" and report["device"] == "cpu" and report["sizes"] == "quick"
    assert report["repeats"] == REPEATS and report["kl_dtypes"] == ["float32", "bfloat16"]
    assert positive(report["copy_bandwidth_gb_s"])
    for field in ("cpu_model", "cpu_capability"):  # in the report and in the table's heading
        assert isinstance(report[field], str) and report[field] and report[field] in stdout, field
    assert "median ms" in stdout and "x floor" in stdout  # the table was printed

    rows = report["rows"]
    cases = {(row["kernel"], row["size"], row["dtype"]) for row in rows}
    assert cases == set(EXPECTED_BYTES)
    for case in cases:
        assert [r["variant"] for r in rows if (r["kernel"], r["size"], r["dtype"]) == case] == VARIANTS[case[0]]
    for row in rows:
        assert set(row) == set(ROW_FIELDS), row
        assert row["bytes_moved"] == EXPECTED_BYTES[row["kernel"], row["size"], row["dtype"]]
        floor_ms = row["bytes_moved"] / (report["copy_bandwidth_gb_s"] * 1e9) * 1e3
        assert math.isclose(row["floor_ms"], floor_ms, rel_tol=1e-9)

        if row["variant"] in ("eager", "chunked"):
            check_ran(row)
        if row["variant"] == "eager":
            assert row["speedup_vs_eager"] == 1.0 and row["max_err_vs_eager"] is None  # eager is the reference
        elif row["variant"] == "chunked":  # the same loss and gradient, to the rounding of the logits' dtype
            assert row["max_err_vs_eager"] < (1e-5 if row["dtype"] == "float32" else 1e-2)
        else:  # skipped: no numbers, and the reason is in the row
            expected_note = {"compile": "--no-compile",
                             "triton": "interpreter" if report["triton_version"] else "not installed"}
            assert expected_note[row["variant"]] in row["note"]
            for field in ("median_ms", "min_ms", "times_ms", "peak_extra_mib", "speedup_vs_eager", "x_floor",
                          "first_call_s", "max_err_vs_eager"):
                assert row[field] is None, (row["variant"], field)


def test_a_failing_version_costs_its_row_not_the_table():
    """A compile error or out-of-memory is recorded as one line in that row; the other rows still run."""
    def broken(audio, n_mels):
        raise RuntimeError("boom\nthe rest of a long compiler log")

    args = SimpleNamespace(warmup=0, repeats=1)
    cpu = torch.device("cpu")
    case = kernel_timing.LogMelCase(1, cpu)
    case.reference = broken
    variants = functools.partial(kernel_timing.kernel_variants, device=cpu, no_compile=True)
    rows = kernel_timing.bench_case(case, variants, cpu, 1e10, args, l2_flush=None)
    assert [row["variant"] for row in rows] == ["eager", "compile", "triton"]
    assert rows[0]["error"] == "RuntimeError: boom"
    assert rows[0]["median_ms"] is None and rows[0]["speedup_vs_eager"] is None
    assert positive(rows[0]["floor_ms"])


def test_the_tile_sweep_needs_a_gpu():
    args = SimpleNamespace(device="cpu", sweep_tiles=True)
    with pytest.raises(SystemExit, match="CUDA"):
        kernel_timing.run(args)


def test_without_triton_the_triton_rows_say_so(monkeypatch):
    monkeypatch.setattr(kernel_timing, "TRITON_AVAILABLE", False)
    variant, fn, why_not = kernel_timing.triton_variant(kernel_timing.kl_div_triton, torch.device("cuda"))
    assert (variant, fn) == ("triton", None) and "not installed" in why_not
    assert kernel_timing.triton_version() is None
