"""Comparing two evaluations: the paired bootstrap over utterances."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from evaluate import paired_bootstrap

ROOT = Path(__file__).resolve().parents[1]


def _report(errors, words=20):
    return [dict(id=f"u{i}", errors=e, words=words, wer=e / words) for i, e in enumerate(errors)]


def test_a_clear_difference_has_an_interval_away_from_zero():
    rng = random.Random(0)
    better = _report([rng.randint(0, 1) for _ in range(80)])
    worse = _report([rng.randint(2, 4) for _ in range(80)])
    result = paired_bootstrap(better, worse)
    assert result["high"] < 0 and result["low"] <= result["difference"] <= result["high"]
    assert result["utterances"] == 80 and result["words"] == 1600


def test_equal_systems_differ_by_nothing_and_noise_straddles_zero():
    rng = random.Random(1)
    errors = [rng.randint(0, 3) for _ in range(80)]
    same = paired_bootstrap(_report(errors), _report(errors))
    assert same["difference"] == same["low"] == same["high"] == 0
    shuffled = errors[:]
    rng.shuffle(shuffled)  # the same total, spread over other utterances
    noisy = paired_bootstrap(_report(errors), _report(shuffled))
    assert noisy["low"] < 0 < noisy["high"] and noisy["difference"] == 0


def test_only_common_utterances_count_and_none_is_an_error():
    a, b = _report([1, 2, 3]), _report([1, 2])
    assert paired_bootstrap(a, b)["utterances"] == 2
    with pytest.raises(ValueError, match="share no scored utterance"):
        paired_bootstrap(a, [dict(id="other", errors=1, words=5)])


def test_the_command_line_compares_two_reports(tmp_path):
    for name, errors in (("a", [0, 1, 0, 0] * 20), ("b", [3, 2, 4, 3] * 20)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"utterances": _report(errors)}))
    run = subprocess.run([sys.executable, "evaluate.py", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "95% interval" in run.stdout and json.loads(run.stdout.splitlines()[-1])["high"] < 0
    assert "the first is better" in run.stdout

    (tmp_path / "b.json").write_text('{"utterances": [')  # cut short, as by a crash mid-write
    run = subprocess.run([sys.executable, "evaluate.py", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "b.json: not a readable evaluate.py --json report" in run.stderr
    assert "Traceback" not in run.stderr
    from evaluate import compare_reports
    for utterances in ([1], [{"id": "u0", "words": 3}]):  # valid JSON, not per-utterance counts
        (tmp_path / "b.json").write_text(json.dumps({"utterances": utterances}))
        with pytest.raises(ValueError, match="per-utterance counts"):
            compare_reports(tmp_path / "a.json", tmp_path / "b.json")


def test_a_comparison_says_when_the_set_cannot_tell_two_models_apart():
    from evaluate import describe_comparison, paired_bootstrap
    same = _report([1, 0, 2, 1] * 5)
    assert describe_comparison(paired_bootstrap(same, same)).endswith("the set cannot tell them apart")
    worse = _report([3, 2, 4, 3] * 5)
    assert describe_comparison(paired_bootstrap(worse, same), ("the student", "the teacher")).endswith(
        "the teacher is better")


def test_long_form_counts_the_windows_that_reach_the_token_limit(data_dir, tmp_path):
    """The loop detector of distill.py's closing report: a window that produces the most tokens a window
    may is counted; here the limit is set below what the recording needs."""
    import torch

    from data import list_utterances
    from decoding import DecodingOptions
    from evaluate import long_form
    from load import load_model

    model = load_model("tiny.en", device="cpu", dtype=torch.float32).optimize_for_decoding()
    recording = list_utterances(data_dir / "longform")
    recording = [u for u in recording if u.id == "jfk"]
    assert recording, "longform/jfk.flac with its transcript expected"
    normal = long_form(model, recording)
    assert normal["at_limit"] == 0 and normal["wer"] < 0.05 and normal["recordings"]["jfk"]["windows"] == 1
    cut = long_form(model, recording, DecodingOptions(language="en", sample_len=5))
    assert cut["at_limit"] >= 1 and cut["recordings"]["jfk"]["max_tokens"] == 5 and cut["wer"] > 0.5
    (tmp_path / "broken.flac").write_bytes(b"not audio" * 50)
    (tmp_path / "broken.txt").write_text("SOME WORDS")
    with pytest.warns(UserWarning, match="broken.flac"):
        unreadable = long_form(model, list_utterances(tmp_path))
    assert unreadable["wer"] is None and unreadable["recordings"] == {} and len(unreadable["skipped"]) == 1
