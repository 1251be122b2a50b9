"""`python bench.py kernels` end to end on CPU at the quick sizes: every JSON field is there, and every
number of what ran is finite, positive and consistent with the floor's definition."""
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]

REPORT_FIELDS = ("mode", "date", "device", "device_name", "torch_version", "triton_version", "python_version",
                 "cpu_threads", "sizes", "warmup", "repeats", "copy_bandwidth_gb_s", "notes", "rows")
ROW_FIELDS = ("kernel", "size", "variant", "median_ms", "min_ms", "times_ms", "peak_extra_mib",
              "speedup_vs_eager", "bytes_moved", "floor_ms", "x_floor", "first_call_s", "max_err_vs_eager",
              "error", "note")
REPEATS = 2
# the quick sizes, and the bytes each must move: log-Mel reads fp32 audio and writes the fp32 (80, 3000) mel
# of each utterance; KL forward+backward reads bf16 student and teacher logits and writes the bf16 gradient
EXPECTED_BYTES = {
    ("log_mel", "B=1 x 30 s"): 4 * 480_000 + 4 * 80 * 3000,
    ("log_mel", "B=4 x 30 s"): 4 * (4 * 480_000 + 4 * 80 * 3000),
    ("kl_div", "N=256 x V=51865"): 3 * 2 * 256 * 51865,
    ("kl_div", "N=1024 x V=51865"): 3 * 2 * 1024 * 51865,
}


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def run_quick_bench(json_path):
    command = [sys.executable, "bench.py", "kernels", "--device", "cpu", "--quick", "--repeats", str(REPEATS),
               "--no-compile", "--json", str(json_path)]
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"bench.py failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout, json.loads(json_path.read_text())


def test_bench_kernels_quick_cpu(tmp_path):
    stdout, report = run_quick_bench(tmp_path / "bench-kernels.json")

    assert set(REPORT_FIELDS) <= set(report)
    assert report["mode"] == "kernels" and report["device"] == "cpu" and report["sizes"] == "quick"
    assert report["repeats"] == REPEATS
    assert positive(report["copy_bandwidth_gb_s"])
    assert "median ms" in stdout and "x floor" in stdout  # the table was printed

    rows = report["rows"]
    cases = {(row["kernel"], row["size"]) for row in rows}
    assert cases == set(EXPECTED_BYTES)
    assert len(rows) == 3 * len(cases)  # eager, compile, triton for each
    for row in rows:
        assert set(row) == set(ROW_FIELDS), row
        assert row["bytes_moved"] == EXPECTED_BYTES[row["kernel"], row["size"]]
        floor_ms = row["bytes_moved"] / (report["copy_bandwidth_gb_s"] * 1e9) * 1e3
        assert math.isclose(row["floor_ms"], floor_ms, rel_tol=1e-9)

        if row["variant"] == "eager":  # ran: every number measured
            assert row["error"] is None and row["note"] is None
            assert len(row["times_ms"]) == REPEATS and all(positive(t) for t in row["times_ms"])
            assert math.isclose(row["median_ms"], statistics.median(row["times_ms"]))
            assert positive(row["min_ms"]) and row["min_ms"] <= row["median_ms"]
            assert positive(row["first_call_s"])
            assert row["speedup_vs_eager"] == 1.0
            assert math.isclose(row["x_floor"], row["median_ms"] / row["floor_ms"])
            if sys.platform.startswith("linux"):  # peak RSS growth needs /proc; the outputs alone are > 0
                assert positive(row["peak_extra_mib"])
            assert row["max_err_vs_eager"] is None  # eager is the reference itself
        else:  # skipped: no numbers, and the reason is in the row
            expected_note = "--no-compile" if row["variant"] == "compile" else "interpreter"
            assert expected_note in row["note"]
            for field in ("median_ms", "min_ms", "times_ms", "peak_extra_mib", "speedup_vs_eager", "x_floor",
                          "first_call_s", "max_err_vs_eager"):
                assert row[field] is None, (row["variant"], field)


def test_a_failing_version_costs_its_row_not_the_table():
    """A compile error or out-of-memory is recorded as one line in that row; the other rows still run."""
    import torch

    import bench_kernels

    def broken(audio, n_mels):
        raise RuntimeError("boom\nthe rest of a long compiler log")

    args = SimpleNamespace(no_compile=True, warmup=0, repeats=1)
    cpu = torch.device("cpu")
    rows = bench_kernels.bench_case(bench_kernels.LogMelCase(1, cpu), broken, None, cpu, 1e10, args, l2_flush=None)
    assert [row["variant"] for row in rows] == ["eager", "compile", "triton"]
    assert rows[0]["error"] == "RuntimeError: boom"
    assert rows[0]["median_ms"] is None and rows[0]["speedup_vs_eager"] is None
    assert positive(rows[0]["floor_ms"])
