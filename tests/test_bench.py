"""`python bench.py` (models) and `python bench.py peers` end to end on CPU in their quick modes: every JSON
field is there and every number is measured, finite and consistent with its definition; several trained
students, each under its own audio context; plus the pieces the CLI runs cannot see (forced-length decoding,
the audio-context override, the Hugging Face weight mapping, a peer that is not installed, the defaults
tables, the 30 s windows of data.joined_windows)."""
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from audio import N_SAMPLES, SAMPLE_RATE, load_audio
from benchmarks import common as bench_common
from benchmarks import models as bench_models
from benchmarks import peers as bench_peers
from data import joined_windows, list_utterances

ROOT = Path(__file__).resolve().parents[1]
# The quick mode is CI-sized: about 1.5 minutes of CPU with the audio context sweep, but a shared 2-core box
# stretches its wall time (1.9 to 2.8 minutes measured at a load average of 5). A hang must fail, not a slow box.
CI_SECONDS = 240
# One torch thread: on a 2-core box that other jobs share, two threads wait on each other and run far slower.
QUICK_FLAGS = ["--quick", "--device", "cpu", "--threads", "1"]

HEADER_FIELDS = ("mode", "date", "device", "device_name", "torch_version", "python_version", "cpu_model",
                 "cpu_capability", "cpu_threads", "cpu_count", "load_average_start", "load_average_end")
REPORT_FIELDS = HEADER_FIELDS + (
    "teacher", "student_checkpoint", "student_checkpoints", "audio_context_override", "dtype", "quick", "sets",
    "batch_sizes", "decoders", "warmup", "repeats", "passes", "steps_timed", "models", "runs", "split",
    "memory_floor", "audio_context_sweep", "plot", "plot_note", "notes")
SWEEP_SECTION_FIELDS = ("seconds", "repeats", "warmup", "default_margin", "steps_timed", "speech", "rows")
FIXED = {"mode": "fixed", "margin": 0}
PEERS_REPORT_FIELDS = HEADER_FIELDS + (
    "model", "dtype", "quick", "peers", "utterances", "batch_sizes", "passes", "rows", "plot", "plot_note", "notes")


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def run_bench(args, tmp_path, name):
    json_path, plot_path = tmp_path / f"{name}.json", tmp_path / f"{name}.png"
    command = [sys.executable, "bench.py", *args, "--json", str(json_path), "--plot", str(plot_path)]
    start = time.perf_counter()
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=CI_SECONDS)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, f"bench.py failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout, json.loads(json_path.read_text()), plot_path, elapsed


def check_machine(report, stdout):
    """The CPU's model and vector unit are in the report and in the printed tables' headings."""
    for field in ("cpu_model", "cpu_capability"):
        assert isinstance(report[field], str) and report[field], field
        assert report[field] in stdout, field


def check_plot(report, plot_path):
    if importlib.util.find_spec("matplotlib") is None:  # optional: the report says why there is no plot
        assert report["plot"] is None and "matplotlib" in report["plot_note"]
    else:
        assert report["plot"] == str(plot_path) and report["plot_note"] is None
        assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def check_run_numbers(run, set_audio_seconds):
    """The throughput and latency fields of one run agree with its per-batch times."""
    n_batches = math.ceil(run["n_items"] / run["batch_size"])
    assert run["n_batches"] == n_batches == len(run["batch_ms"]) == len(run["batch_audio_s"])
    assert all(positive(ms) for ms in run["batch_ms"]) and all(positive(s) for s in run["batch_audio_s"])
    assert math.isclose(run["total_s"], sum(run["batch_ms"]) / 1e3)
    assert math.isclose(run["audio_seconds"], sum(run["batch_audio_s"]))
    if run["batch_size"] == 1:  # no cycling: every clip once
        assert math.isclose(run["audio_seconds"], set_audio_seconds)
    assert math.isclose(run["rtf"], run["total_s"] / run["audio_seconds"])
    assert math.isclose(run["audio_s_per_s"], 1 / run["rtf"])
    assert math.isclose(run["latency_ms_median"], statistics.median(run["batch_ms"]))
    assert run["latency_ms_median"] <= run["latency_ms_p90"] <= max(run["batch_ms"])
    if sys.platform.startswith("linux"):  # the peak RSS growth needs /proc
        assert positive(run["peak_mib"])


def check_sweep(sweep, models, seconds, repeats):
    """The audio context sweep: a row per model and clip length; both contexts measured, finite and positive,
    doing the same decoder work; the dynamic context the clip's own positions plus the model's margin."""
    assert set(sweep) == set(SWEEP_SECTION_FIELDS)
    assert sweep["seconds"] == seconds and sweep["repeats"] == repeats
    rows = sweep["rows"]
    assert [(r["model"], r["seconds"]) for r in rows] == [(m["name"], s) for m in models for s in seconds]
    own = {m["name"]: m["audio_context"] for m in models}
    for row in rows:
        assert set(row) == set(bench_models.SWEEP_FIELDS)
        assert positive(row["steps"])
        assert row["steps"] == next(r["steps"] for r in rows if r["seconds"] == row["seconds"])  # the teacher's
        fixed, dynamic = row["fixed"], row["dynamic"]
        margin = own[row["model"]]["margin"] if own[row["model"]]["mode"] == "dynamic" else sweep["default_margin"]
        assert fixed["audio_context"] == FIXED and dynamic["audio_context"] == {"mode": "dynamic", "margin": margin}
        assert (fixed["mel_frames"], fixed["positions"]) == (3000, 1500)
        assert dynamic["positions"] == min(row["seconds"] * 50 + margin, 1500)  # 20 ms per position
        assert dynamic["mel_frames"] == 2 * dynamic["positions"]
        for context in (fixed, dynamic):
            assert set(context) == set(bench_models.SWEEP_CONTEXT_FIELDS)
            for field in ("encoder_ms", "first_step_ms", "per_token_ms", "latency_ms"):
                assert positive(context[field]), field
            assert len(context["encoder_times_ms"]) == repeats
            assert math.isclose(context["encoder_ms"], statistics.median(context["encoder_times_ms"]))
            assert context["decoder_steps"] == row["steps"]  # forced: both contexts do the same decoder work
        for name in bench_models.SWEEP_RATIOS:
            assert math.isclose(row["dynamic_vs_fixed"][name], dynamic[f"{name}_ms"] / fixed[f"{name}_ms"])
        if row["seconds"] == 30:  # 30 s: the same 3000 frames, measured once
            assert dynamic["mel_frames"] == 3000 and all(v == 1.0 for v in row["dynamic_vs_fixed"].values())
    # No timing comparison between contexts: at one repeat on a shared box, a single stall could reverse it.


def check_memory_floor(floor, models, split):
    """A row per model: its bytes per token by part, the floor they take at the bandwidth measured in the run,
    the split's greedy batch-1 ms per token, and the ratio of the two."""
    assert set(floor) == set(bench_models.FLOOR_SECTION_FIELDS)
    bandwidth = floor["bandwidth"]
    assert set(bandwidth) == set(bench_models.BANDWIDTH_FIELDS)
    assert bandwidth["bytes"] == bench_models.READ_BYTES["cpu"] and len(bandwidth["times_ms"]) == bandwidth["repeats"]
    assert math.isclose(bandwidth["bytes_per_s"], bandwidth["bytes"] / (bandwidth["median_ms"] / 1e3))
    assert [r["model"] for r in floor["rows"]] == [m["name"] for m in models]
    for row in floor["rows"]:
        assert set(row) == set(bench_models.FLOOR_FIELDS)
        (measured,) = [s for s in split if (s["model"], s["decoder"], s["batch_size"]) == (row["model"], "greedy", 1)]
        assert row["per_token_ms"] == measured["per_token_ms"] and row["audio_positions"] == measured["audio_positions"]
        assert row["attended_tokens"] == measured["prompt_tokens"] + (floor["steps_timed"] + 1) / 2
        parts = row["bytes"]
        assert row["bytes_per_token"] == parts["total"] == sum(parts[p] for p in bench_models.STEP_BYTES_PARTS)
        assert math.isclose(row["floor_ms_per_token"], row["bytes_per_token"] / bandwidth["bytes_per_s"] * 1e3)
        assert math.isclose(row["step_vs_floor"], row["per_token_ms"] / row["floor_ms_per_token"])
    teacher, student = floor["rows"][:2]
    assert student["bytes"]["decoder_weights"] < teacher["bytes"]["decoder_weights"]  # 2 decoder layers of 4
    assert student["bytes"]["output_projection"] == teacher["bytes"]["output_projection"]


def test_models_quick_cpu(tmp_path):
    stdout, report, plot_path, elapsed = run_bench(QUICK_FLAGS, tmp_path, "bench")
    assert elapsed < CI_SECONDS

    assert set(report) == set(REPORT_FIELDS)
    assert report["mode"] == "models" and report["device"] == "cpu" and report["quick"] is True
    assert report["teacher"] == "tiny.en" and report["cpu_threads"] == 1
    assert report["batch_sizes"] == [1, 2] and report["decoders"] == ["greedy"]
    for name in ("end to end", "the split", "x teacher", "ms/token", "memory floor", "audio context sweep"):
        assert name in stdout
    assert "goal" not in stdout  # a benchmark reports what it measured
    check_machine(report, stdout)
    check_plot(report, plot_path)

    sets = report["sets"]
    assert sets["utterances"]["n"] == 3 == len(sets["utterances"]["ids"])
    assert sets["windows"]["n"] == 1 and 20 < sets["windows"]["audio_seconds"] <= 30  # whole utterances joined

    models = report["models"]
    assert [m["name"] for m in models] == ["teacher tiny.en", "student (4,2)"]
    for model in models:
        assert set(model) == set(bench_models.MODEL_FIELDS)
        assert positive(model["parameters"]) and positive(model["size_mib"])
        assert model["audio_context"] == FIXED  # the official model's, and its made student's
    assert report["audio_context_override"] is None
    assert report["student_checkpoint"] is None and report["student_checkpoints"] == []
    teacher, student = models
    assert (student["encoder_layers"], student["decoder_layers"]) == (4, 2)
    assert student["parameters"] < teacher["parameters"]
    assert (teacher["forced_length"], student["forced_length"]) == (False, True)

    runs = report["runs"]
    expected = {(m["name"], s, "greedy", b) for m in models for s, b in
                (("utterances", 1), ("utterances", 2), ("windows", 1))}
    assert {(r["model"], r["set"], r["decoder"], r["batch_size"]) for r in runs} == expected
    assert len(runs) == len(expected)
    teacher_runs = {(r["set"], r["batch_size"]): r for r in runs if r["model"] == teacher["name"]}
    for run in runs:
        assert set(run) == set(bench_models.RUN_FIELDS), run["model"]
        check_run_numbers(run, sets[run["set"]]["audio_seconds"])
        assert positive(run["tokens"]) and math.isclose(run["tokens_per_s"], run["tokens"] / run["total_s"])
        same = teacher_runs[run["set"], run["batch_size"]]
        assert math.isclose(run["speedup_vs_teacher"], same["total_s"] / run["total_s"])
        # the first step with the prompt, then one step per token: a forced student takes the teacher's steps
        assert len(run["steps"]) == run["n_batches"] and run["steps"] == same["steps"]
        if run["forced_length"]:
            assert run["wer"] is None
        else:
            assert 0 <= run["wer"] < 0.3  # tiny.en on clean read speech
            if run["batch_size"] == 1:  # free decoding: every step gives a token, the last one <|endoftext|>
                assert run["tokens"] == sum(run["steps"]) - run["n_batches"]
    assert all(r["speedup_vs_teacher"] == 1.0 for r in teacher_runs.values())

    split = report["split"]
    assert {(s["model"], s["decoder"], s["batch_size"]) for s in split} == {
        (m["name"], "greedy", b) for m in models for b in (1, 2)}
    for row in split:
        assert set(row) == set(bench_models.SPLIT_FIELDS)
        assert row["rows"] == row["batch_size"]  # greedy: one decoder row per utterance
        for field in ("mel_ms", "encoder_ms", "first_step_ms", "per_token_ms"):
            assert positive(row[field]), field
        assert math.isclose(row["encoder_ms"], statistics.median(row["encoder_times_ms"]))
        assert math.isclose(row["per_token_ms"], statistics.median(row["per_token_times_ms"]))
        assert len(row["encoder_times_ms"]) == report["repeats"] == 2
        assert isinstance(row["overhead_ms_per_step"], float) and math.isfinite(row["overhead_ms_per_step"])
        assert row["audio_positions"] == 1500 and positive(row["prompt_tokens"])  # fixed context: 30 s
        if sys.platform.startswith("linux"):
            assert positive(row["encoder_peak_mib"]) and positive(row["decoder_peak_mib"])
    check_memory_floor(report["memory_floor"], models, split)

    check_sweep(report["audio_context_sweep"], models, seconds=[5, 30], repeats=1)  # quick: 5 and 30 s, once


def test_models_decodes_several_trained_students_each_under_its_own_context(tmp_path, one_thread):
    from load import load_model, save_checkpoint
    from model import AudioContext
    from student import make_student

    teacher = load_model("tiny.en", "cpu")
    paths = []
    for name, context in (("kd", None), ("askd", AudioContext("dynamic", 8))):
        student = make_student(teacher, decoder_layers=2)
        if context is not None:
            student.audio_context = context
        (tmp_path / name).mkdir()
        paths.append(tmp_path / name / "student.pt")
        save_checkpoint(student, paths[-1])
    flags = [*QUICK_FLAGS, "--student", *map(str, paths), "tiny.en", "--utterances", "1", "--batch-sizes", "1",
             "--windows", "0", "--repeats", "1", "--sweep-seconds", "5"]
    stdout, report, _, elapsed = run_bench(flags, tmp_path, "students")
    assert elapsed < CI_SECONDS

    assert report["student_checkpoints"] == [*map(str, paths), "tiny.en"]
    assert report["student_checkpoint"] == str(paths[0])
    models = report["models"]
    names = ["teacher tiny.en", "student (kd/student.pt)", "student (askd/student.pt)", "model tiny.en",
             "student (4,2)"]
    assert [m["name"] for m in models] == names
    assert [m["source"] for m in models[1:4]] == [*map(str, paths), "tiny.en"]
    assert [m["audio_context"] for m in models] == [FIXED, FIXED, {"mode": "dynamic", "margin": 8}, FIXED, FIXED]
    assert "dynamic +8" in stdout
    assert [m["forced_length"] for m in models] == [False, False, False, False, True]
    runs = {r["model"]: r for r in report["runs"]}
    assert set(runs) == set(names)
    for name in names[1:4]:  # trained or official: decoded freely and scored
        assert runs[name]["wer"] is not None and math.isfinite(runs[name]["wer"])
        check_run_numbers(runs[name], report["sets"]["utterances"]["audio_seconds"])
    check_sweep(report["audio_context_sweep"], models, seconds=[5], repeats=1)


def test_audio_context_flags_override_every_model(one_thread):
    def contexts(audio_ctx, audio_margin):
        args = SimpleNamespace(teacher="tiny.en", student=None, students=["2,1"], quick=True, audio_ctx=audio_ctx,
                               audio_margin=audio_margin, int8=None)
        return [c.model.audio_context for c in bench_models.load_contenders(args, torch.device("cpu"), None)]

    from model import AudioContext

    assert contexts(None, None) == [AudioContext(), AudioContext()]
    assert contexts("dynamic", 4) == [AudioContext("dynamic", 4)] * 2
    assert contexts(None, 4) == [AudioContext(), AudioContext()]  # a margin alone changes only dynamic models


def test_int8_adds_every_model_again_with_int8_weights(one_thread):
    from quantize import Int8Weight

    args = SimpleNamespace(teacher="tiny.en", student=None, students=["2,1"], quick=True, audio_ctx=None,
                           audio_margin=None, int8=["output", "all"])
    contenders = bench_models.load_contenders(args, torch.device("cpu"), None)
    assert [c.name for c in contenders] == [
        "teacher tiny.en", "student (2,1)", "teacher tiny.en int8 output", "student (2,1) int8 output",
        "teacher tiny.en int8 all", "student (2,1) int8 all"]
    assert [c.forced_length for c in contenders] == [False, True] * 3
    assert [bench_models.model_row(c)["int8"] for c in contenders] == [None, None, "output", "output", "all", "all"]
    for plain, output, every in zip(contenders[:2], contenders[2:4], contenders[4:]):
        assert len({id(plain.model), id(output.model), id(every.model)}) == 3
        assert not isinstance(plain.model.decoder.inference_weight, Int8Weight)
        assert isinstance(output.model.decoder.inference_weight, Int8Weight)
        assert not isinstance(output.model.encoder.blocks[0].mlp[0].inference_weight, Int8Weight)
        assert isinstance(every.model.encoder.blocks[0].mlp[0].inference_weight, Int8Weight)



def test_step_bytes_of_tiny_en_match_a_hand_count():
    """tiny.en: D = 384, 4 decoder layers, 51864 tokens; 30 s of audio (1500 positions), 10 tokens attended."""
    from model import MODEL_DIMS

    d, v = 384, 51864
    block = (4 * d * d + 3 * d  # self-attention: query, key, value, out; biases of query, value, out (not key)
             + 2 * d * d + 2 * d  # cross-attention query and out (its key and value ran in the first step)
             + 4 * d * d + 4 * d + 4 * d * d + d  # MLP: D -> 4 D -> D
             + 3 * 2 * d)  # three layer norms
    assert block == 2_070_528
    assert 4 * (4 * block + 2 * d + 2 * d) == 33_134_592  # + the final norm, a token's and a position's row
    expected = {"decoder_weights": 33_134_592, "output_projection": v * d * 4,  # 79,663,104
                "cross_kv": 2 * 4 * 1500 * d * 4, "self_kv": 2 * 4 * 10 * d * 4}  # 18,432,000 and 122,880
    got = bench_models.step_bytes(MODEL_DIMS["tiny.en"], audio_positions=1500, attended_tokens=10)
    assert got == {**expected, "total": 131_352_576}

    int8 = bench_models.step_bytes(MODEL_DIMS["tiny.en"], 1500, 10, output_int8=True, blocks_int8=True)
    assert int8["output_projection"] == v * d + v * 4 == 20_123_232  # a byte an element, a float32 scale a row
    matrices, scales, vectors = 14 * d * d, 11 * d * 4, 16 * d * 4  # int8 matrices; float biases and norms
    assert int8["decoder_weights"] == 4 * (matrices + scales + vectors) + 4 * 4 * d == 8_429_568
    assert int8["cross_kv"] == expected["cross_kv"]  # the caches stay float32
    short = bench_models.step_bytes(MODEL_DIMS["tiny.en"], 100, 10, element_bytes=2, output_rows=3000)
    assert short["output_projection"] == 3000 * d * 2 and short["cross_kv"] == 2 * 4 * 100 * d * 2


@torch.no_grad()
def test_step_bytes_of_a_model_count_the_parameters_a_step_reads():
    """Against the model's own parameters: every decoder parameter but the cross-attention key and value
    and the two embeddings (a row of each), in float32, then with the blocks and the projection in int8."""
    from model import ModelDimensions, Whisper
    from quantize import int8_for_decoding

    torch.manual_seed(0)
    model = Whisper(ModelDimensions(80, 1500, 64, 2, 1, 51864, 448, 64, 2, 2)).eval()
    d = model.dims.n_text_state
    read = {name: p for name, p in model.decoder.named_parameters()
            if not any(skip in name for skip in ("cross_attn.key", "cross_attn.value", "embedding"))}
    parts = bench_models.model_step_bytes(model, audio_positions=100, attended_tokens=7)
    assert parts["decoder_weights"] == 4 * (sum(p.numel() for p in read.values()) + 2 * d)
    assert parts["output_projection"] == 4 * model.decoder.token_embedding.weight.numel()
    assert (parts["cross_kv"], parts["self_kv"]) == (2 * 2 * 100 * d * 4, 2 * 2 * 7 * d * 4)

    int8_for_decoding(model.optimize_for_decoding(), "decoder").restrict_output([1, 2, 3])
    int8 = bench_models.model_step_bytes(model, 100, 7)
    in_blocks = {name: p for name, p in read.items() if name.startswith("blocks.")}
    matrices = sum(p.numel() + 4 * p.shape[0] for p in in_blocks.values() if p.ndim == 2)
    floats = sum(4 * p.numel() for p in read.values() if p.ndim == 1)
    assert int8["decoder_weights"] == matrices + floats + 2 * d * 4
    assert int8["output_projection"] == 3 * (d + 4)


def test_read_bandwidth_is_the_weights_bytes_over_the_median_time():
    measured = bench_models.measure_read_bandwidth(torch.device("cpu"), 2**22, repeats=3)  # 4 MiB: CI-sized
    assert set(measured) == set(bench_models.BANDWIDTH_FIELDS)
    assert measured["bytes"] == 2**22 and measured["shape"] == [256, 4096] and len(measured["times_ms"]) == 3
    assert measured["median_ms"] == statistics.median(measured["times_ms"]) and positive(measured["bytes_per_s"])
    assert math.isclose(measured["bytes_per_s"], 2**22 / (measured["median_ms"] / 1e3))
    assert measured["path"] in ("oneDNN blocked weight", "F.linear")


def test_floor_rows_divide_each_models_bytes_by_the_bandwidth():
    from model import ModelDimensions, Whisper

    torch.manual_seed(0)
    model = Whisper(ModelDimensions(80, 1500, 64, 2, 1, 51864, 448, 64, 2, 2))
    contenders = [bench_models.Contender("a", model, "a", False), bench_models.Contender("b", model, "b", True)]
    split = [{"model": "a", "decoder": "greedy", "batch_size": 1, "audio_positions": 250, "prompt_tokens": 3,
              "per_token_ms": 2.0},
             {"model": "a", "decoder": "greedy", "batch_size": 2, "audio_positions": 250, "prompt_tokens": 3,
              "per_token_ms": 3.0}]  # b has no greedy batch-1 row: no floor row
    (row,) = bench_models.floor_rows(contenders, split, bytes_per_s=1e9)
    attended = 3 + (bench_models.STEPS_TIMED + 1) / 2  # the mean over the timed steps
    expected = bench_models.model_step_bytes(model, 250, attended)
    assert row["bytes"] == expected and row["attended_tokens"] == attended
    assert math.isclose(row["floor_ms_per_token"], expected["total"] / 1e9 * 1e3)
    assert row["per_token_ms"] == 2.0 and math.isclose(row["step_vs_floor"], 2.0 / row["floor_ms_per_token"])


def test_trained_students_are_named_by_the_shortest_ending_that_tells_them_apart():
    assert bench_models.trained_names(["runs/askd/student.pt"]) == ["student (trained)"]
    assert bench_models.trained_names(["runs/askd/student.pt", "runs/kd/student.pt", "a.pt"]) == [
        "student (askd/student.pt)", "student (kd/student.pt)", "student (a.pt)"]
    with pytest.raises(SystemExit):
        bench_models.trained_names(["runs/kd/student.pt", "runs/kd/student.pt"])
    with pytest.raises(SystemExit):
        bench_models.trained_names(["./a.pt", "a.pt"])


def test_an_official_model_among_the_students_is_named_by_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bench_models.trained_names(["runs/askd/student.pt", "tiny.en"]) == ["student (trained)", "model tiny.en"]
    assert bench_models.trained_names(["a/student.pt", "b/student.pt", "tiny.en"]) == [
        "student (a/student.pt)", "student (b/student.pt)", "model tiny.en"]
    (tmp_path / "tiny.en").write_bytes(b"")  # a file of that name is a checkpoint, as load_model reads it
    assert bench_models.trained_names(["tiny.en"]) == ["student (trained)"]
    with pytest.raises(SystemExit):
        bench_models.trained_names(["tiny.en", "tiny.en"])


def test_peers_quick_openai_cpu(tmp_path):
    stdout, report, plot_path, elapsed = run_bench(["peers", *QUICK_FLAGS, "--peers", "openai"], tmp_path, "peers")
    assert elapsed < CI_SECONDS

    assert set(report) == set(PEERS_REPORT_FIELDS)
    assert report["mode"] == "peers" and report["model"] == "tiny.en" and report["peers"] == ["openai"]
    assert "time/ours" in stdout
    check_machine(report, stdout)
    check_plot(report, plot_path)
    rows = report["rows"]
    assert [(r["model"], r["batch_size"]) for r in rows] == [
        ("ours", 1), ("ours", 2), ("ours int8 all", 1), ("ours int8 all", 2),
        ("ours int8 output", 1), ("ours int8 output", 2), ("openai-whisper decode", 1),
        ("openai-whisper decode", 2), ("openai-whisper transcribe", 1)]  # transcribe takes one utterance per call
    openai_version = importlib.metadata.version("openai-whisper")
    for row in rows:
        assert set(row) == set(bench_peers.ROW_FIELDS)
        assert row["status"] == "ok", row["status"]
        assert row["version"] == (None if row["model"].startswith("ours") else openai_version)
        check_run_numbers(row, report["utterances"]["audio_seconds"])
        assert 0 <= row["wer"] < 0.3 and len(row["hypotheses"]) == report["utterances"]["n"]
        ours = next(r for r in rows if r["model"] == "ours" and r["batch_size"] == row["batch_size"])
        assert math.isclose(row["time_vs_ours"], row["total_s"] / ours["total_s"])
    decode = [r for r in rows if r["model"] == "openai-whisper decode"]
    assert all(r["wer_vs_ours"] == 0.0 for r in decode)  # the same model: the same transcripts


# ----------------------------------------------------------------------------- the pieces


@pytest.fixture
def one_thread():
    """As QUICK_FLAGS: one torch thread, so a loaded shared box does not slow these tests down tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_full_batches_cycle_the_list_to_fill_the_last():
    assert bench_common.full_batches([1, 2, 3], 2) == [[1, 2], [3, 1]]
    assert bench_common.full_batches([1, 2, 3], 1) == [[1], [2], [3]]
    assert bench_common.full_batches([1, 2], 5) == [[1, 2, 1, 2, 1]]


def test_windows_join_whole_utterances_of_one_chapter_up_to_30_s():
    def utterance(utt_id, seconds):
        return utt_id, np.zeros(int(seconds * SAMPLE_RATE), np.float32), utt_id

    utterances = [utterance("1-10-0001", 12), utterance("1-10-0002", 10), utterance("1-10-0003", 9),
                  utterance("1-11-0001", 14), utterance("1-11-0002", 15), utterance("2-20-0001", 29)]
    windows = joined_windows(utterances, 2)
    # the chapter 1-10 run fits (31 s would not), 1-11 joins to 29 s, 2-20 is one utterance of 29 s
    assert [w.ids for w in windows] == [("1-11-0001", "1-11-0002"), ("2-20-0001",)]
    assert [len(w.audio) / SAMPLE_RATE for w in windows] == [29, 29]
    assert windows[0].text == "1-11-0001 1-11-0002"


def test_windows_of_real_speech_are_consecutive_utterances_of_a_chapter(data_dir):
    found = list_utterances(data_dir / "test-clean")  # 4 utterances, 2 chapters of one speaker
    utterances = [(u.id, load_audio(u.audio), u.text) for u in found]
    order = [utt_id for utt_id, _, _ in utterances]
    windows = joined_windows(utterances, n=len(utterances))
    assert len(windows) == 2  # one a chapter: a chapter's end ends its window
    assert sorted(utt_id for w in windows for utt_id in w.ids) == order
    for window in windows:
        assert len(window.audio) <= N_SAMPLES  # at most 30 s
        assert len({utt_id.rsplit("-", 1)[0] for utt_id in window.ids}) == 1  # one chapter
        first = order.index(window.ids[0])
        assert list(window.ids) == order[first:first + len(window.ids)]  # consecutive, in order
        joined = [utterances[order.index(utt_id)] for utt_id in window.ids]
        assert window.text == " ".join(text for _, _, text in joined)
        assert np.array_equal(window.audio, np.concatenate([audio for _, audio, _ in joined]))


def test_students_alone_times_no_untrained_student():
    from bench import build_parser
    from model import MODEL_DIMS

    args = build_parser().parse_args(["models", "--student", "a.pt", "--students"])
    assert args.students == [] and bench_models.student_shapes(args.students, MODEL_DIMS["base"], quick=False) == []
    assert bench_models.student_shapes(None, MODEL_DIMS["base"], quick=False)[0] == (6, 2)  # unset: the defaults


def test_unset_flags_take_the_quick_values_then_the_device_defaults():
    defaults = {"teacher": "base", "batch_sizes": bench_common.ByDevice([1, 8, 16], [1, 8]), "repeats": 3}
    quick = {"teacher": "tiny.en", "batch_sizes": [1, 2]}
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def settled(device, **flags):
        args = SimpleNamespace(**{"teacher": None, "batch_sizes": None, "repeats": None, "quick": False, **flags})
        bench_common.settle_defaults(args, device, defaults, quick)
        return args.teacher, args.batch_sizes, args.repeats

    assert settled(cpu) == ("base", [1, 8], 3)
    assert settled(cuda) == ("base", [1, 8, 16], 3)
    assert settled(cpu, quick=True) == ("tiny.en", [1, 2], 3)
    assert settled(cpu, quick=True, teacher="small", repeats=5) == ("small", [1, 2], 5)  # a set flag wins
    assert bench_common.default_help("timed passes", "batch_sizes", defaults, quick) == (
        "timed passes (default: 1 8 16 on CUDA, 1 8 on CPU; quick: 1 2)")


def test_forced_length_decodes_exactly_the_given_steps(one_thread):
    from decoding import NO_FALLBACK
    from load import load_model
    from student import make_student
    from transcribe import transcribe_clips

    student = make_student(load_model("tiny.en", "cpu"), decoder_layers=1)
    counter = bench_models.StepCounter(student)
    options = bench_models.forced_options(bench_models.decoding_options("greedy"), student, steps=7)
    try:
        results = transcribe_clips(student, [np.random.default_rng(0).normal(0, 0.1, 32000).astype(np.float32)],
                                   options, NO_FALLBACK, batch_size=1)
    finally:
        counter.close()
    assert counter.count == 7  # the prompt step and six more, no early <|endoftext|>
    assert len(results[0].tokens) == 7


@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_huggingface_names_load_strictly_into_transformers(name):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from model import MODEL_DIMS, Whisper

    dims = MODEL_DIMS[name]
    ours = Whisper(dims)
    theirs = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=dims.n_vocab, num_mel_bins=dims.n_mels, d_model=dims.n_audio_state,
        encoder_layers=dims.n_audio_layer, encoder_attention_heads=dims.n_audio_head,
        decoder_layers=dims.n_text_layer, decoder_attention_heads=dims.n_text_head,
        encoder_ffn_dim=4 * dims.n_audio_state, decoder_ffn_dim=4 * dims.n_text_state,
        max_source_positions=dims.n_audio_ctx, max_target_positions=dims.n_text_ctx))
    state = bench_peers.huggingface_state(ours)
    theirs.load_state_dict(state, strict=True)  # every name and shape matches
    assert torch.equal(theirs.model.decoder.embed_positions.weight, ours.decoder.positional_embedding)


def test_transformers_engine_transcribes_like_ours(data_dir, one_thread):
    from load import load_model

    clips = [load_audio(u.audio) for u in list_utterances(data_dir / "test-clean")[1:3]]  # 2 short ones
    model = load_model("tiny.en", "cpu")
    cpu = torch.device("cpu")
    ours = bench_peers.build_ours(model, "tiny.en", cpu)(clips)
    theirs = bench_peers.build_transformers(model, "tiny.en", cpu)(clips)
    assert [t.strip() for t in theirs] == [t.strip() for t in ours]


def test_a_peer_that_is_not_installed_is_a_row_not_a_crash():
    engine = bench_peers.Engine("nothing", "nothing", "no_such_module_for_bench", "no-such-package", True,
                                build=lambda *_: pytest.fail("must not be built"))
    transcribe, status = bench_peers.prepare(engine, None, "tiny.en", torch.device("cpu"))
    assert (transcribe, status) == (None, "not installed")
    rows = bench_peers.measure_engines([engine], "tiny.en", torch.float32, [], [1, 4], passes=1,
                                       device=torch.device("cpu"))
    assert [(r["batch_size"], r["status"]) for r in rows] == [(1, "not installed"), (4, "not installed")]
    assert all(r["total_s"] is None and r["wer"] is None and set(r) == set(bench_peers.ROW_FIELDS) for r in rows)
