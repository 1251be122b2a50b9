"""Decoding gives openai-whisper's transcripts on the same weights, batched; long-form and bad inputs behave."""
import copy
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
import whisper  # test-only reference implementation

from audio import SAMPLE_RATE, load_audio, resample
from data import DEV_SPEAKERS, list_utterances
from decoding import NO_FALLBACK, DecodingOptions, decode
from evaluate import word_error_rate
from load import load_model
from model import onednn_takes
from transcribe import clip_mels, transcribe, transcribe_clips

GREEDY = DecodingOptions(language="en", without_timestamps=True)
N_GREEDY = 20  # utterances compared per model


@pytest.fixture(scope="module", params=["tiny.en", "base"])
def models(request):
    ours = load_model(request.param, device="cpu", dtype=torch.float32)
    reference = whisper.model.Whisper(whisper.model.ModelDimensions(**ours.dims.__dict__))
    reference.load_state_dict(ours.state_dict())
    return ours, reference.eval()


@pytest.fixture(scope="module")
def dev_clips(data_dir):
    """Short dev utterances (the shortest, to keep CI fast), with their references."""
    utterances = list_utterances(data_dir / "train-clean-5", speakers=DEV_SPEAKERS)
    clips = [(u, load_audio(u.audio)) for u in utterances]
    clips.sort(key=lambda c: len(c[1]))
    return clips[:N_GREEDY]


def _openai_decode(reference, clip, **options):
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(clip)))
    return whisper.decode(reference, mel, whisper.DecodingOptions(language="en", fp16=False, **options))


def test_greedy_transcripts_identical_to_openai_whisper(models, dev_clips):
    ours, reference = models
    results = transcribe_clips(ours, [a for _, a in dev_clips], GREEDY, NO_FALLBACK, batch_size=10)
    expected = [_openai_decode(reference, a, without_timestamps=True) for _, a in dev_clips]
    mismatches = [(o.text, e.text) for o, e in zip(results, expected) if o.text != e.text]
    assert not mismatches, mismatches[:3]
    for o, e in zip(results, expected):  # the numbers the fallback rules read agree too
        assert o.tokens == e.tokens
        assert abs(o.avg_logprob - e.avg_logprob) < 1e-3
        assert abs(o.no_speech_prob - e.no_speech_prob) < 1e-3
    refs = [u.text for u, _ in dev_clips]
    ours_wer = word_error_rate(refs, [r.text for r in results])["wer"]
    theirs_wer = word_error_rate(refs, [e.text for e in expected])["wer"]
    assert abs(ours_wer - theirs_wer) <= 0.002 and ours_wer < 0.15


def test_decoding_optimized_for_cpu_gives_the_same_transcripts(models, dev_clips):
    """optimize_for_decoding (oneDNN matmuls) moves logits by ~1e-5: the transcripts must not change, at
    batch 1 (one row per matrix product, the latency case) and batched."""
    plain, _ = models
    fast = copy.deepcopy(plain).optimize_for_decoding()
    clips = [a for _, a in dev_clips]
    for batch_size in (1, 10):
        expected = transcribe_clips(plain, clips, GREEDY, NO_FALLBACK, batch_size=batch_size)
        results = transcribe_clips(fast, clips, GREEDY, NO_FALLBACK, batch_size=batch_size)
        assert [r.tokens for r in results] == [e.tokens for e in expected]
        assert max(abs(r.avg_logprob - e.avg_logprob) for r, e in zip(results, expected)) < 1e-3


def test_bfloat16_on_cpu_keeps_the_word_error_rate(dev_clips):
    """The bfloat16 CPU path (blocked oneDNN weights where the CPU takes them, else F.linear; the
    cross-attention's matmul path) is a different model numerically: its transcripts may differ here and
    there, its accuracy must not. Emulated bfloat16 (no hardware support) is slow: there, tiny.en only."""
    hardware = onednn_takes(torch.bfloat16)
    print(f"bfloat16 path: {'oneDNN' if hardware else 'F.linear fallback'} ({torch.backends.cpu.get_cpu_capability()})")
    names = ["tiny.en", "base"] if hardware else ["tiny.en"]
    clips, refs = [a for _, a in dev_clips], [u.text for u, _ in dev_clips]
    for name in names:
        plain = load_model(name, device="cpu", dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the no-hardware-support warning, on CPUs without it
            half = copy.deepcopy(plain).to(torch.bfloat16).optimize_for_decoding()
        expected = transcribe_clips(plain, clips, GREEDY, NO_FALLBACK, batch_size=10)
        float32_wer = word_error_rate(refs, [e.text for e in expected])["wer"]
        for batch_size in (1, 10):
            results = transcribe_clips(half, clips, GREEDY, NO_FALLBACK, batch_size=batch_size)
            same = sum(r.tokens == e.tokens for r, e in zip(results, expected))
            assert same >= 0.8 * len(clips), f"{name}, batch {batch_size}: {same} of {len(clips)} transcripts unchanged"
            assert word_error_rate(refs, [r.text for r in results])["wer"] <= float32_wer + 0.01, (name, batch_size)


def test_beam_search_and_timestamps_identical_to_openai_whisper(models, dev_clips):
    ours, reference = models
    clips = [a for _, a in dev_clips[:3]]
    mel = clip_mels(clips, ours.dims.n_mels, "cpu")
    for options in (dict(beam_size=3, without_timestamps=True), dict(beam_size=2, patience=2.0), dict()):
        results = decode(ours, mel, DecodingOptions(language="en", **options))
        expected = [_openai_decode(reference, a, **options) for a in clips]
        assert [r.tokens for r in results] == [e.tokens for e in expected], options


def test_batch_results_do_not_depend_on_batch_company(models, dev_clips):
    ours, _ = models
    clips = [a for _, a in dev_clips[:4]]
    together = transcribe_clips(ours, clips, GREEDY, NO_FALLBACK, batch_size=4)
    alone = [transcribe_clips(ours, [c], GREEDY, NO_FALLBACK)[0] for c in clips]
    assert [r.text for r in together] == [r.text for r in alone]


def test_multilingual_model_detects_english(data_dir):
    model = load_model("base", device="cpu")
    clip = load_audio(data_dir / "longform" / "jfk.flac")
    (result,) = decode(model, clip_mels([clip], 80, "cpu"), DecodingOptions(without_timestamps=True))
    assert result.language == "en" and result.language_probs["en"] > 0.9
    assert "ask not what your country can do for you" in result.text.lower()


def test_jfk_44k_stereo_long_form_path(data_dir):
    model = load_model("tiny.en", device="cpu")
    result = transcribe(model, str(data_dir / "longform" / "jfk.flac"))
    reference = (data_dir / "longform" / "jfk.txt").read_text()
    assert word_error_rate([reference], [result["text"]])["wer"] == 0.0
    assert result["segments"][0]["start"] == 0.0 and 10.0 <= result["segments"][-1]["end"] <= 11.0


def test_long_form_chapter_end_to_end(data_dir):
    """A 190 s chapter (a knitting pattern: repetitive text, a stress case for loops) in sequential windows."""
    model = load_model("tiny.en", device="cpu")
    path = data_dir / "longform" / "train-clean-5_1737-146161.flac"
    result = transcribe(model, str(path))
    reference = path.with_suffix(".txt").read_text()
    assert word_error_rate([reference], [result["text"]])["wer"] < 0.12
    starts = [s["start"] for s in result["segments"]]
    assert starts == sorted(starts) and result["segments"][-1]["end"] > 180.0


def test_resampled_rates_transcribe_like_the_original(data_dir, tmp_path):
    model = load_model("tiny.en", device="cpu")
    utterance = list_utterances(data_dir / "test-clean")[0]
    original = load_audio(utterance.audio)
    for rate, channels in ((8000, 1), (44100, 2)):
        path = tmp_path / f"clip_{rate}.wav"
        wave = resample(original, SAMPLE_RATE, rate)
        sf.write(path, np.stack([wave] * channels, axis=1) if channels == 2 else wave, rate, subtype="FLOAT")
        (result,) = transcribe_clips(model, [path], GREEDY, NO_FALLBACK)
        assert word_error_rate([utterance.text], [result.text])["wer"] <= 0.1, (rate, result.text)


def test_silence_gives_no_text():
    model = load_model("tiny.en", device="cpu")
    result = transcribe(model, np.zeros(SAMPLE_RATE * 5, dtype=np.float32))
    assert result["text"].strip() == ""


def test_empty_audio_is_rejected():
    model = load_model("tiny.en", device="cpu")
    with pytest.raises(ValueError, match="non-empty"):
        transcribe(model, np.zeros(0, dtype=np.float32))
    with pytest.raises(ValueError, match="longer than 30 s"):
        transcribe_clips(model, [np.ones(SAMPLE_RATE * 31, dtype=np.float32)])


def test_option_conflicts_are_errors():
    model = load_model("tiny.en", device="cpu")
    mel = torch.randn(1, 80, 3000)
    with pytest.raises(ValueError, match="English-only"):
        decode(model, mel, DecodingOptions(language="de"))
    with pytest.raises(ValueError, match="patience needs beam_size"):
        decode(model, mel, DecodingOptions(patience=2.0))


def _cli(*args):
    return subprocess.run([sys.executable, "transcribe.py", *args], capture_output=True, text=True, timeout=300)


def test_cli_formats_and_bad_files(data_dir, tmp_path):
    jfk = str(data_dir / "longform" / "jfk.flac")
    not_audio = tmp_path / "notes.flac"
    not_audio.write_text("this is not audio")
    run = _cli(jfk, "--model", "tiny.en", "--device", "cpu", "--format", "json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert "ask not what your country can do for you" in report["text"].lower() and report["segments"]
    run = _cli(jfk, str(not_audio), str(tmp_path / "missing.wav"), "--model", "tiny.en", "--format", "srt")
    assert run.returncode == 1
    assert "00:00:00,000 -->" in run.stdout
    assert "notes.flac" in run.stderr and "missing.wav" in run.stderr
    run = _cli(jfk, "--model", "no-such-model")
    assert run.returncode != 0 and "unknown model 'no-such-model'" in run.stderr


def test_static_step_decoding_gives_the_same_tokens(models, dev_clips):
    """The CUDA-graph path's fixed-shape steps (run eagerly on CPU) decode exactly as the ordinary path."""
    ours, _ = models
    mel = clip_mels([a for _, a in dev_clips[:3]], ours.dims.n_mels, "cpu")
    for options in (dict(without_timestamps=True), dict(), dict(beam_size=2, without_timestamps=True)):
        plain = decode(ours, mel, DecodingOptions(language="en", **options))
        static = decode(ours, mel, DecodingOptions(language="en", static_step=True, **options))
        assert [r.tokens for r in plain] == [r.tokens for r in static], options


def test_sampling_is_reproducible_with_a_seed(dev_clips):
    model = load_model("tiny.en", device="cpu")
    mel = clip_mels([a for _, a in dev_clips[:2]], 80, "cpu")
    hot = DecodingOptions(language="en", without_timestamps=True, temperature=1.0, best_of=2)
    first, again = decode(model, mel, hot), decode(model, mel, hot)
    assert [r.tokens for r in first] == [r.tokens for r in again]
    other = decode(model, mel, DecodingOptions(**{**hot.__dict__, "seed": 1}))
    assert [r.tokens for r in other] != [r.tokens for r in first]
