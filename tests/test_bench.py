"""`python bench.py` (models) and `python bench.py peers` end to end on CPU in their quick modes: every JSON
field is there and every number is measured, finite and consistent with its definition; plus the pieces the
CLI runs cannot see (forced-length decoding, the Hugging Face weight mapping, a peer that is not installed)."""
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import bench_common
import bench_models
import bench_peers

ROOT = Path(__file__).resolve().parents[1]
CI_SECONDS = 120  # the issue: the quick mode runs in CI in under 2 minutes
# One torch thread: on a 2-core box that other jobs share, two threads wait on each other and run far slower.
QUICK_FLAGS = ["--quick", "--device", "cpu", "--threads", "1"]

HEADER_FIELDS = ("mode", "date", "device", "device_name", "torch_version", "python_version", "cpu_threads", "cpu_count",
                 "load_average_start", "load_average_end")
REPORT_FIELDS = HEADER_FIELDS + (
    "teacher", "student_checkpoint", "dtype", "quick", "sets", "batch_sizes", "decoders", "warmup", "repeats", "passes",
    "steps_timed", "student_rtf_goal", "models", "runs", "split", "plot", "plot_note", "notes")
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


def test_models_quick_cpu(tmp_path):
    stdout, report, plot_path, elapsed = run_bench(QUICK_FLAGS, tmp_path, "bench")
    assert elapsed < CI_SECONDS

    assert set(report) == set(REPORT_FIELDS)
    assert report["mode"] == "models" and report["device"] == "cpu" and report["quick"] is True
    assert report["teacher"] == "tiny.en" and report["cpu_threads"] == 1
    assert report["batch_sizes"] == [1, 2] and report["decoders"] == ["greedy"]
    for name in ("end to end", "the split", "x teacher", "ms/token"):  # the tables were printed
        assert name in stdout
    check_plot(report, plot_path)

    sets = report["sets"]
    assert sets["utterances"]["n"] == 3 == len(sets["utterances"]["ids"])
    assert sets["windows"]["n"] == 1 and 20 < sets["windows"]["audio_seconds"] <= 30  # whole utterances joined

    models = report["models"]
    assert [m["name"] for m in models] == ["teacher tiny.en", "student (4,2)"]
    for model in models:
        assert set(model) == set(bench_models.MODEL_FIELDS)
        assert positive(model["parameters"]) and positive(model["size_mib"])
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
        if sys.platform.startswith("linux"):
            assert positive(row["encoder_peak_mib"]) and positive(row["decoder_peak_mib"])


def test_peers_quick_openai_cpu(tmp_path):
    stdout, report, plot_path, elapsed = run_bench(["peers", *QUICK_FLAGS, "--peers", "openai"], tmp_path, "peers")
    assert elapsed < CI_SECONDS

    assert set(report) == set(PEERS_REPORT_FIELDS)
    assert report["mode"] == "peers" and report["model"] == "tiny.en" and report["peers"] == ["openai"]
    assert "time/ours" in stdout
    check_plot(report, plot_path)
    rows = report["rows"]
    assert [(r["model"], r["batch_size"]) for r in rows] == [
        ("ours", 1), ("ours", 2), ("openai-whisper decode", 1), ("openai-whisper decode", 2),
        ("openai-whisper transcribe", 1)]  # transcribe takes one utterance per call
    openai_version = importlib.metadata.version("openai-whisper")
    for row in rows:
        assert set(row) == set(bench_peers.ROW_FIELDS)
        assert row["status"] == "ok", row["status"]
        assert row["version"] == (None if row["model"] == "ours" else openai_version)
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
    def clip(utt_id, seconds):
        return bench_common.Clip(utt_id, np.zeros(int(seconds * 16000), np.float32), utt_id)

    clips = [clip("1-10-0001", 12), clip("1-10-0002", 10), clip("1-10-0003", 9), clip("1-11-0001", 14),
             clip("1-11-0002", 15), clip("2-20-0001", 29)]
    windows = bench_common.joined_windows(clips, 2)
    # the chapter 1-10 run fits (31 s would not), 1-11 joins to 29 s, 2-20 is one utterance of 29 s
    assert [w.id for w in windows] == ["1-11-0001..0002", "2-20-0001..0001"]
    assert [w.seconds for w in windows] == [29, 29]
    assert windows[0].text == "1-11-0001 1-11-0002"


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
    from audio import load_audio
    from data import list_utterances
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
