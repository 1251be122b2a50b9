"""Distillation: the student, the ASKD schedule and loss, and distill.py end to end (CPU, tiny.en)."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from askd import ASKDConfig, ASKDSchedule, SoftTargets, distillation_loss, top_k_kl_div
from audio import load_audio
from data import length_bucketed_batches, list_utterances, training_tokens
from kernels import kl_div_reference
from load import checkpoint_provenance, load_model
from model import AudioContext
from student import make_student, shares_teacher_encoder, spaced_layers
from tokenizer import get_tokenizer, tokenizer_for
from transcribe import clip_mels
from cache import ArrayCache
from data import DEV_SPEAKERS
from decoding import DecodingOptions, initial_tokens
from prepare import Example, Labelled, attach_prompts, filter_by_wer, label_examples, labelling_key, plan_examples
from training import NothingLoadable, Progress, Trainer, steps_that_fit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def teacher():
    return load_model("tiny.en", device="cpu", dtype=torch.float32).requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Student


def test_spaced_layers_follow_distil_whisper():
    assert spaced_layers(6, 2) == [0, 5]
    assert spaced_layers(4, 2) == [0, 3]
    assert spaced_layers(6, 3) == [0, 2, 5]
    assert spaced_layers(6, 4) == [0, 1, 3, 5]
    assert spaced_layers(6, 6) == list(range(6))
    with pytest.raises(ValueError):
        spaced_layers(4, 5)


def test_student_copies_teacher_layers_and_round_trips(teacher, tmp_path):
    student = make_student(teacher, decoder_layers=2)
    assert student.dims.n_text_layer == 2 and student.dims.n_audio_layer == 4
    for mine, theirs in ((0, 0), (1, 3)):
        for name, tensor in student.decoder.blocks[mine].state_dict().items():
            assert torch.equal(tensor, teacher.decoder.blocks[theirs].state_dict()[name])
    assert torch.equal(student.decoder.token_embedding.weight, teacher.decoder.token_embedding.weight)
    assert not any(p.requires_grad for p in student.encoder.parameters())
    assert all(p.requires_grad for p in student.decoder.parameters())
    assert shares_teacher_encoder(student, teacher)

    thin = make_student(teacher, decoder_layers=1, encoder_layers=2)
    assert thin.dims.n_audio_layer == 2 and all(p.requires_grad for p in thin.encoder.parameters())
    assert not shares_teacher_encoder(thin, teacher)

    from load import save_checkpoint

    save_checkpoint(thin, tmp_path / "student.pt")
    again = load_model(tmp_path / "student.pt", device="cpu")
    assert again.dims == thin.dims


# ---------------------------------------------------------------------------------------------
# Schedule and loss


@pytest.mark.parametrize("schedule", ["linear", "cosine", "exponential"])
def test_teacher_weight_decays_from_lambda0_to_lambda_min(schedule):
    s = ASKDSchedule(ASKDConfig(schedule=schedule, lambda_start=1.0, lambda_min=0.1, phase_a_end=0.6, mu_max=0.5))
    weights = [s.soft_weight(p / 100) for p in range(0, 61)]
    assert math.isclose(weights[0], 1.0) and math.isclose(weights[-1], 0.1, abs_tol=1e-9)
    assert all(a >= b - 1e-12 for a, b in zip(weights, weights[1:]))
    assert s.phase(0.6) == "teacher" and s.phase(0.61) == "self"
    # phase B: mu grows linearly from lambda_min to mu_max
    assert math.isclose(s.soft_weight(0.8), 0.1 + 0.4 * 0.5) and math.isclose(s.soft_weight(1.0), 0.5)


def test_adaptive_weight_follows_the_label_loss_gap():
    s = ASKDSchedule(ASKDConfig(schedule="adaptive", lambda_start=1.0, lambda_min=0.0, adaptive_momentum=0.0))
    s.observe(student_ce=3.0, teacher_ce=1.0)  # gap 2: fully open
    assert math.isclose(s.soft_weight(0.1), 1.0)
    s.observe(student_ce=2.0, teacher_ce=1.0)  # half closed
    assert math.isclose(s.soft_weight(0.1), 0.5)
    s.observe(student_ce=0.9, teacher_ce=1.0)  # caught up
    assert s.soft_weight(0.1) == 0.0
    restored = ASKDSchedule(s.config)
    restored.load_state_dict(s.state_dict())
    assert restored.soft_weight(0.1) == s.soft_weight(0.1)


def test_baselines_weights():
    kd, ce = ASKDSchedule(ASKDConfig(method="kd")), ASKDSchedule(ASKDConfig(method="ce"))
    assert (kd.phase(0.9), kd.soft_weight(0.9), kd.ce_weight()) == ("teacher", 1.0, 0.8)
    assert (ce.phase(0.1), ce.soft_weight(0.1), ce.ce_weight()) == ("none", 0.0, 1.0)
    with pytest.raises(ValueError):
        ASKDConfig(method="magic")


def _batch(teacher, data_dir, n=2):
    """Two test-clean utterances: 30 s mel, teacher-forcing tokens and labels for their transcripts."""
    tokenizer = tokenizer_for(teacher, language="en", task="transcribe")
    utterances = list_utterances(data_dir / "test-clean")[:n]
    pairs = [training_tokens(tokenizer, tokenizer.encode(" " + u.text.lower())) for u in utterances]
    width = max(len(tokens) for tokens, _ in pairs)
    tokens = torch.full((n, width), 50256)
    labels = torch.full((n, width), -100)
    for row, (t, lab) in enumerate(pairs):
        tokens[row, : len(t)], labels[row, : len(lab)] = torch.tensor(t), torch.tensor(lab)
    mel = clip_mels([load_audio(u.audio) for u in utterances], 80, "cpu")
    return mel, tokens, labels


@pytest.mark.parametrize("method", ["ce", "kd", "askd"])
def test_loss_terms_finite_and_decreasing_on_a_repeated_batch(teacher, data_dir, method):
    torch.manual_seed(0)
    mel, tokens, labels = _batch(teacher, data_dir)
    student = make_student(teacher, decoder_layers=1)
    schedule = ASKDSchedule(ASKDConfig(method=method))
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=3e-4)
    with torch.no_grad():
        features = teacher.embed_audio(mel)
        soft = SoftTargets(logits=teacher(mel, tokens, audio_features=features))
    history = []
    for step in range(6):
        losses = distillation_loss(
            student(mel, tokens, audio_features=features), labels, soft,
            schedule.soft_weight(step / 20), schedule.ce_weight(), 2.0,
        )
        assert all(torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    assert history[-1]["ce"] < history[0]["ce"]
    if method != "ce":
        assert history[0]["kl"] > 0 and history[-1]["kl"] < history[0]["kl"]
    else:
        assert all(h["kl"] == 0 for h in history)


def _teacher_rows(n=6, v=1271, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return 4 * torch.randn(n, v, generator=generator), 4 * torch.randn(n, v, generator=generator)


def _top_k(teacher_logits, k, temperature):
    values, ids = teacher_logits.topk(k, dim=-1)
    return values, ids, (teacher_logits / temperature).logsumexp(-1)


def test_top_k_kl_with_every_token_kept_is_the_full_kl():
    student, teacher = _teacher_rows()
    full = kl_div_reference(student, teacher, 2.0)
    assert torch.allclose(top_k_kl_div(student, *_top_k(teacher, teacher.shape[1], 2.0), 2.0), full, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 16, 256])
def test_top_k_kl_is_a_lower_bound_and_pulls_the_same_way(k):
    """Merging the teacher's other tokens into one bucket can only lose information (a lower bound); the
    gradient must still point the way the full KL's does."""
    student, teacher = _teacher_rows(seed=k)
    a, b = student.clone().requires_grad_(), student.clone().requires_grad_()
    approx = top_k_kl_div(a, *_top_k(teacher, k, 2.0), 2.0)
    full = kl_div_reference(b, teacher, 2.0)
    approx.backward()
    full.backward()
    assert 0 <= approx.item() <= full.item() + 1e-6
    cosine = torch.nn.functional.cosine_similarity(a.grad.flatten(), b.grad.flatten(), dim=0)
    assert cosine > {1: 0.3, 16: 0.6, 256: 0.95}[k], cosine


def test_previous_predictions_are_each_examples_own_from_last_time():
    from training import PreviousPredictions

    torch.manual_seed(0)
    memory = PreviousPredictions(k=8, temperature=2.0)
    logits = torch.randn(5, 50) * 3  # example 7 has rows 0-2, example 9 rows 3-4
    memory.record(logits, indices=[7, 9], row_lengths=[3, 2])
    assert memory.targets([4], [3], "cpu") is None  # never seen
    # a batch of an unseen example, example 9 and example 7 with another target length: only 9's rows
    soft = memory.targets([4, 9, 7], [2, 2, 1], "cpu")
    assert soft.rows.tolist() == [False, False, True, True, False] and soft.top_ids.shape == (2, 8)
    labels = torch.zeros(5, dtype=torch.long)
    # the student as it was then has nothing left to learn from itself; a changed student does
    same = torch.cat([torch.randn(2, 50), logits[3:5], torch.randn(1, 50)])
    assert distillation_loss(same, labels, soft, 1.0, 1.0, 2.0)["kl"] < 1e-3
    assert distillation_loss(torch.randn(5, 50), labels, soft, 1.0, 1.0, 2.0)["kl"] > 0.1
    restored = PreviousPredictions(k=8, temperature=2.0)
    restored.load_state_dict(memory.state_dict())
    assert torch.equal(restored.targets([9], [2], "cpu").top_values, memory.targets([9], [2], "cpu").top_values)
    with pytest.raises(ValueError):
        ASKDConfig(self_teacher="yesterday")


def test_training_tokens_layout():
    tokenizer = get_tokenizer(True, language="en", task="transcribe")
    text = tokenizer.encode(" hello world")
    tokens, labels = training_tokens(tokenizer, text)
    prompt = list(tokenizer.sot_sequence_including_notimestamps)
    assert tokens[: len(prompt)] == prompt and len(tokens) == len(labels)
    assert labels[: len(prompt) - 1] == [-100] * (len(prompt) - 1)
    assert labels[len(prompt) - 1 : -1] == tokens[len(prompt) :] and labels[-1] == tokenizer.eot
    stamped = [tokenizer.timestamp_begin, *text, tokenizer.timestamp_begin + 50]
    tokens, labels = training_tokens(tokenizer, stamped, timestamps=True)
    assert tokens[: len(tokenizer.sot_sequence)] == list(tokenizer.sot_sequence)
    assert tokenizer.no_timestamps not in tokens and labels[-2:] == [tokenizer.timestamp_begin + 50, tokenizer.eot]


@pytest.mark.parametrize("timestamps", [False, True])
def test_a_prompted_target_starts_as_decoding_starts_a_prompted_window(timestamps):
    """The student trains on the very tokens transcribe() gives it after the first window."""
    tokenizer = get_tokenizer(False, language="en", task="transcribe")
    prompt, text = tokenizer.encode(" Before this."), tokenizer.encode(" hello world")
    tokens, labels = training_tokens(tokenizer, text, timestamps=timestamps, prompt=prompt)
    start = initial_tokens(tokenizer, DecodingOptions(prompt=prompt, without_timestamps=not timestamps), 448)
    assert tokens == start + text and len(labels) == len(tokens)
    assert labels == [-100] * (len(start) - 1) + text + [tokenizer.eot]  # no loss on the prompt


def _labelled(utterance_id, tokens, parts=1):
    audio = tuple(f"{utterance_id}-{i}.flac" for i in range(parts))
    example = Example(utterance_id if parts == 1 else f"{utterance_id}+{parts}", audio, None, parts > 1)
    return Labelled(example, f"item-{example.id}", list(tokens), "text")


def test_prompts_are_the_teacher_text_before_the_example_in_its_chapter():
    chapter = [_labelled(f"11-22-{n:04d}", [100 + n, 200 + n]) for n in range(4)]
    other = _labelled("11-23-0000", [999])
    window = _labelled("11-22-0002", [7, 8], parts=2)  # utterances 2 and 3 joined
    examples = [other, window] + chapter[::-1]  # any order
    prompted = {x.example.id: x for x in attach_prompts(examples, examples, share=1.0, n_text_ctx=448)}
    assert prompted["11-22-0000"].prompt == () and prompted["11-23-0000"].prompt == ()  # nothing before them
    assert prompted["11-22-0002"].prompt == (100, 200, 101, 201)  # in order, from its own chapter only
    assert prompted["11-22-0002+2"].prompt == (100, 200, 101, 201)  # a window: what precedes its first utterance
    assert prompted["11-22-0003"].prompt[-2:] == (102, 202)
    # the decoder is given only the latest n_text_ctx // 2 - 1 prompt tokens
    assert attach_prompts(chapter, chapter, 1.0, n_text_ctx=8)[3].prompt == (201, 102, 202)
    # the share is a fixed pick per example, and the cache tells prompted targets apart
    assert all(x.prompt == () for x in attach_prompts(examples, examples, share=0.0, n_text_ctx=448))
    half = [_labelled(f"11-22-{n:04d}", [n]) for n in range(400)]
    picked = sum(bool(x.prompt) for x in attach_prompts(half, half, share=0.5, n_text_ctx=448))
    assert 150 < picked < 250
    x = prompted["11-22-0002"]
    assert x.target_item != x.item and prompted["11-22-0000"].target_item == prompted["11-22-0000"].item
    assert x.target_item != prompted["11-22-0003"].target_item


def test_batches_are_deterministic_and_sharded():
    lengths = [5, 9, 3, 7, 2, 8, 6, 4, 1, 10, 11]
    a = length_bucketed_batches(lengths, 2, seed=1, epoch=0)
    assert a == length_bucketed_batches(lengths, 2, seed=1, epoch=0)
    assert a != length_bucketed_batches(lengths, 2, seed=1, epoch=1)
    r0 = length_bucketed_batches(lengths, 2, 1, 0, rank=0, world_size=2)
    r1 = length_bucketed_batches(lengths, 2, 1, 0, rank=1, world_size=2)
    assert len(r0) == len(r1) and not set(sum(r0, [])) & set(sum(r1, []))


# ---------------------------------------------------------------------------------------------
# The cache and preparation


def test_cache_detects_another_key_and_damaged_items(tmp_path):
    cache = ArrayCache(tmp_path, dict(teacher="a", top_k=64), log=lambda *a: None)
    arrays = dict(x=np.arange(12, dtype=np.float16).reshape(3, 4), ids=np.arange(5, dtype=np.int32))
    cache.put("one", arrays, dict(text="hi"))
    cache.put("two", arrays)
    got = cache.load("one")
    assert isinstance(got["x"], np.memmap) and np.array_equal(got["x"], arrays["x"]) and cache.fields("one") == dict(text="hi")
    data = cache.items / "one.x.npy"
    data.write_bytes(data.read_bytes()[:-3])  # truncated
    assert not cache.verify("one") and not cache.has("one")  # detected, and removed to be recomputed
    flipped = bytearray((cache.items / "two.ids.npy").read_bytes())
    flipped[-1] ^= 1
    (cache.items / "two.ids.npy").write_bytes(bytes(flipped))  # same size, one bit wrong
    assert not cache.verify("two")
    cache.put("three", arrays)
    messages = []
    again = ArrayCache(tmp_path, dict(teacher="b", top_k=64), log=messages.append)
    assert not again.has("three") and "another key" in messages[0] and "teacher" in messages[0]


def test_labelling_resumes_and_recomputes_only_what_is_missing_or_damaged(teacher, data_dir, tmp_path):
    examples = plan_examples(list_utterances(data_dir / "test-clean")[:3], timestamp_share=0.5, windows=0)
    cache = ArrayCache(tmp_path, labelling_key(teacher), log=lambda *a: None)
    first, _ = label_examples(teacher, examples[:2], cache, batch_size=2, log=lambda *a: None)  # as if killed
    damaged = cache.items / f"{first[0].item}.teacher_features.npy"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    messages = []
    labelled, counts = label_examples(teacher, examples, cache, batch_size=2, log=messages.append)
    assert "labelling 2 of 3" in messages[0]  # the damaged one and the one never done
    assert [x.text for x in labelled[:2]] == [x.text for x in first] and counts["unreadable"] == 0


def test_a_missing_audio_file_is_counted_unreadable_not_fatal(teacher, data_dir, tmp_path):
    examples = plan_examples(list_utterances(data_dir / "test-clean")[:1], timestamp_share=0.0, windows=0)
    gone = Example("1-2-0003", (tmp_path / "moved-away.flac",), "SOME WORDS", False)
    cache = ArrayCache(tmp_path / "labels", labelling_key(teacher), log=lambda *a: None)
    messages = []
    labelled, counts = label_examples(teacher, examples + [gone], cache, batch_size=2, log=messages.append)
    assert [x.example.id for x in labelled] == [examples[0].id] and counts["unreadable"] == 1
    assert any("moved-away.flac" in m for m in messages)


def test_the_wer_filter_keeps_a_reference_without_words():
    hum = replace(_labelled("11-22-0000", [1]), text="hmm")
    hum = replace(hum, example=replace(hum.example, reference="Hmm."))  # normalises to nothing: no words to score
    wrong = replace(_labelled("11-22-0001", [2]), text="completely different words")
    wrong = replace(wrong, example=replace(wrong.example, reference="the cat sat"))
    kept, dropped = filter_by_wer([hum, wrong], threshold=0.2)
    assert kept == [hum] and dropped == 1


def test_a_time_budget_lays_the_schedules_over_the_steps_that_fit():
    assert steps_that_fit(step=10, steps_timed=10, elapsed_s=100, budget_s=300, total_steps=378) == 30
    assert steps_that_fit(step=10, steps_timed=10, elapsed_s=100, budget_s=10_000, total_steps=378) == 378
    assert steps_that_fit(step=10, steps_timed=10, elapsed_s=400, budget_s=300, total_steps=378) == 11
    logged = []
    trainer = SimpleNamespace(progress=Progress(step=10, total_steps=378), settings=SimpleNamespace(max_minutes=5),
                              world=1, log=lambda message=None, **record: logged.append(record))
    Trainer.fit_schedules_to_budget(trainer, start=time.time() - 100, first_step=0)
    assert trainer.progress.total_steps in (29, 30) and logged[0]["planned_total_steps"] == 378


def test_an_epoch_with_nothing_loadable_is_an_error_not_an_endless_loop():
    trainer = SimpleNamespace(progress=Progress(), settings=SimpleNamespace(grad_accum=1, batch_size=2),
                              dataset=[0] * 10, stop_reason=None, world=1)
    nothing = iter([dict(skipped=2, size=0)] * 1000)
    with pytest.raises(NothingLoadable, match="--resume"):
        Trainer.next_group(trainer, nothing)
    assert trainer.progress.skipped == 2 * 7  # one epoch's worth of batches, plus one, then the error
    trainer.stop_reason = "SIGINT"  # Ctrl-C while looking for a loadable batch is heard
    assert Trainer.next_group(trainer, nothing) is None


def test_long_windows_join_consecutive_utterances_of_a_chapter(data_dir):
    utterances = list_utterances(data_dir / "train-clean-5", exclude_speakers=DEV_SPEAKERS)[:40]
    examples = plan_examples(utterances, timestamp_share=0.0, windows=5)
    windows = [e for e in examples if len(e.audio) > 1]
    assert 1 <= len(windows) <= 5 and all(e.timestamps for e in windows)
    by_id = {u.audio: u for u in utterances}
    for window in windows:
        parts = [by_id[path] for path in window.audio]
        assert len({u.id.rsplit("-", 1)[0] for u in parts}) == 1  # one chapter
        assert [u.id for u in parts] == sorted(u.id for u in parts)
        assert window.reference == " ".join(u.text for u in parts)
        assert sum(sf.info(str(p)).frames for p in window.audio) <= 30 * 16000
    assert not any(e.timestamps for e in examples if len(e.audio) == 1)  # share 0


# ---------------------------------------------------------------------------------------------
# distill.py end to end (tiny.en on test-clean; one label/target cache shared by the runs)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _distill(out, *extra, data, cache, env=None, wait=True):
    command = [
        sys.executable, "distill.py", "--teacher", "tiny.en", "--data", str(data), "--out", str(out),
        "--cache", str(cache), "--decoder-layers", "1", "--batch-size", "2", "--workers", "0", "--log-every", "1",
        "--seed", "3", "--windows", "1", "--margins", "8,16", "--long-form", "", "--test-data", *extra,
    ]
    environment = {**os.environ, **(env or {})}
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=900)


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _losses(out):
    return {r["step"]: r["loss"] for r in _log(out) if "loss" in r}


@pytest.mark.parametrize("method", ["ce", "kd", "askd"])
def test_each_method_trains_and_writes_a_loadable_student(data_dir, tmp_path, shared_cache, method):
    out = tmp_path / method
    long_form = _clip_folder(data_dir, tmp_path / "long", n=1)  # one short recording: the report's shape
    # one feature per run: a shortlist (ce), speed perturbation and intermediate-layer KD (kd), a test set (askd)
    extra = {"ce": ("--shortlist", "1000"), "kd": ("--speeds", "1.1,1.0", "--hidden-weight", "1"),
             "askd": ("--test-data", str(data_dir / "test-clean"))}[method]
    run = _distill(out, *extra, "--method", method, "--max-steps", "4", "--phase-a-end", "0.5", "--self-refresh", "1",
                   "--eval-data", str(data_dir / "test-clean"), "--eval-limit", "2", "--eval-every", "0",
                   "--long-form", str(long_form), data=data_dir / "test-clean", cache=shared_cache)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [r for r in _log(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    phases = [r["phase"] for r in records]
    assert phases == {"ce": ["none"] * 4, "kd": ["teacher"] * 4, "askd": ["teacher"] * 3 + ["self"]}[method]
    assert all(0 <= r["share_forward"] <= 1 and r["audio_s_per_s"] > 0 for r in records)
    done = _log(out)[-1]
    assert done["done"] and 0 <= done["student_dev_wer"] and 0 <= done["teacher_dev_wer"] < 0.2
    reports = {name: json.loads((out / f"dev-{name}.json").read_text()) for name in ("student", "teacher")}
    assert [reports[name]["wer"] for name in ("student", "teacher")] == [done["student_dev_wer"], done["teacher_dev_wer"]]
    compared = next(r["student_vs_teacher"] for r in _log(out) if "student_vs_teacher" in r)
    assert compared["utterances"] == 2 and compared["low"] <= compared["difference"] <= compared["high"]
    assert math.isclose(compared["difference"], done["student_dev_wer"] - done["teacher_dev_wer"], abs_tol=1e-9)
    prepared = next(r["preparation"] for r in _log(out) if "preparation" in r)
    assert prepared["windows"] >= 1 and prepared["examples_kept"] >= 3
    if method == "kd":  # each example also at 1.1x; the pulled block outputs are a loss term
        assert prepared["perturbed"] == prepared["examples_kept"] // 2 and prepared["windows"] == 2
        assert all(r["hidden"] > 0 for r in records)
    else:
        assert prepared["perturbed"] == 0 and prepared["windows"] == 1 and all(r["hidden"] == 0 for r in records)
    tested = [r for r in _log(out) if "student_vs_teacher_test" in r]
    assert len(tested) == (method == "askd")
    if tested:
        assert tested[0]["student_vs_teacher_test"]["utterances"] == 4 and tested[0]["teacher_test_wer"] < 0.2
        assert json.loads((out / "test-student.json").read_text())["wer"] == tested[0]["student_test_wer"]
    teacher_long = next(r["teacher_long_form"] for r in _log(out) if "teacher_long_form" in r)
    assert teacher_long["wer"] < 0.2 and teacher_long["at_limit"] == 0 and len(teacher_long["recordings"]) == 1
    assert any("student_long_form" in r for r in _log(out))
    student = load_model(out / "student.pt", device="cpu")
    assert student.dims.n_text_layer == 1 and student.audio_context == AudioContext("dynamic", 16)
    if method == "ce":  # the shortlist: the 1000 most frequent ids, the targets' and the special ones
        assert 1000 + 1608 <= len(student.output_ids) < 4000 and student.output_ids[-1] == student.dims.n_vocab - 1
    else:
        assert student.output_ids is None
    assert checkpoint_provenance(out / "student.pt")["method"] == method
    run = subprocess.run([sys.executable, "evaluate.py", "--model", str(out / "student.pt"), "--data", str(data_dir / "test-clean"),
                          "--limit", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "WER" in run.stdout, run.stderr[-2000:]


@pytest.mark.parametrize("self_teacher", ["snapshot", "previous-epoch"])
def test_interrupt_and_resume_gives_the_same_trajectory(data_dir, tmp_path, shared_cache, self_teacher):
    common = ("--max-steps", "8", "--method", "askd", "--phase-a-end", "0.5", "--self-refresh", "2",
              "--self-teacher", self_teacher, "--eval-every", "0", "--exclude-speakers", "")
    data = data_dir / "test-clean"
    straight = tmp_path / "straight"
    straight.mkdir()
    for name in ("student", "teacher"):  # an earlier run's dev reports, which this run (no dev set) must not show
        (straight / f"dev-{name}.json").write_text(json.dumps({"wer": 0.1, "utterances": []}))
    assert _distill(straight, *common, data=data, cache=shared_cache).returncode == 0
    expected = _losses(straight)
    self_kl = [r["kl"] for r in _log(straight) if r.get("phase") == "self"]
    assert len(self_kl) == 3 and (self_teacher == "snapshot" or all(kl > 0 for kl in self_kl))
    assert not list(straight.glob("dev-*.json")) and not any("student_vs_teacher" in r for r in _log(straight))

    broken = tmp_path / "broken"
    process = _distill(broken, *common, data=data, cache=shared_cache, wait=False)
    deadline = time.time() + 600
    while time.time() < deadline:  # interrupt once a few steps are logged
        if (broken / "log.jsonl").exists() and len(_losses(broken)) >= 3:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 3, stderr[-2000:]
    assert "--resume" in stderr
    stopped_at = max(_losses(broken))
    assert stopped_at < 8

    resumed = _distill(broken, *common, "--resume", data=data, cache=shared_cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = _losses(broken)
    assert sorted(got) == list(range(1, 9))
    for step, loss in expected.items():
        assert math.isclose(got[step], loss, rel_tol=1e-5), (step, got[step], loss)

    mismatch = _distill(broken, *common, "--resume", "--method", "kd", data=data, cache=shared_cache)
    assert mismatch.returncode != 0 and "--method" in mismatch.stderr


def test_a_time_budget_ends_the_run_like_its_last_step(data_dir, tmp_path, shared_cache):
    out = tmp_path / "budget"
    run = _distill(out, "--max-steps", "50", "--max-minutes", "0.0001", "--eval-data", str(data_dir / "test-clean"),
                   "--eval-limit", "1", data=data_dir / "test-clean", cache=shared_cache)
    assert run.returncode == 0, run.stderr[-2000:]
    log = _log(out)
    assert next(r["budget_end_step"] for r in log if "budget_end_step" in r) == 1
    assert log[-1]["done"] and log[-1]["step"] == 1 and log[-1]["student_dev_wer"] is not None
    assert (out / "student.pt").exists() and any("speed_up" in r for r in log)
    assert any(r.get("speed_up_int8", 0) > 0 for r in log)  # the same ratio with both in int8 (CPU)


def test_spec_augment_only_where_the_student_trains_from_the_log_mel():
    from distill import parse_args

    with pytest.raises(SystemExit):  # a cached encoder output cannot follow a masked input
        parse_args(["--spec-augment"])
    assert parse_args(["--spec-augment", "--trainable-encoder-layers", "-1"]).spec_augment
    assert parse_args(["--spec-augment", "--encoder-layers", "2"]).spec_augment  # thinned: trained from the log-Mel


def test_resume_without_checkpoint_is_an_error(data_dir, tmp_path, shared_cache):
    run = _distill(tmp_path / "none", "--max-steps", "2", "--resume", data=data_dir / "test-clean", cache=shared_cache)
    assert run.returncode != 0 and "does not exist" in run.stderr


def _clip_folder(data_dir, folder, n=3):
    folder.mkdir()
    for u in list_utterances(data_dir / "test-clean")[:n]:
        shutil.copy(u.audio, folder / u.audio.name)
        (folder / u.audio.name).with_suffix(".txt").write_text(u.text)
    return folder


def test_unreadable_and_over_long_audio_is_skipped_and_counted(data_dir, tmp_path, shared_cache):
    folder = _clip_folder(data_dir, tmp_path / "clips")
    (folder / "broken.flac").write_bytes(b"not audio at all" * 100)
    (folder / "broken.txt").write_text("SOME TEXT")
    sf.write(folder / "long.flac", 0.1 * np.random.default_rng(0).standard_normal(31 * 16000), 16000)
    (folder / "long.txt").write_text("TOO LONG")
    out = tmp_path / "run"
    run = _distill(out, "--max-steps", "2", "--eval-every", "0", "--windows", "0", data=folder, cache=tmp_path / "c")
    assert run.returncode == 0, run.stderr[-2000:]
    assert '"unreadable": 2' in run.stderr and "broken.flac" in run.stderr and "longer than" in run.stderr
    # in the mode that reads audio during training, a file that breaks after preparation costs one example
    first = list_utterances(folder)[0]
    (folder / first.audio.name).write_bytes(b"gone bad")
    run = _distill(out, "--max-steps", "2", "--eval-every", "0", "--windows", "0", "--trainable-encoder-layers", "-1",
                   data=folder, cache=tmp_path / "c")
    assert run.returncode == 0, run.stderr[-2000:]


def test_sigkill_during_preparation_then_the_same_command_resumes(data_dir, tmp_path):
    folder = _clip_folder(data_dir, tmp_path / "clips", n=4)
    cache, out = tmp_path / "cache", tmp_path / "run"
    args = ("--max-steps", "1", "--eval-every", "0", "--windows", "0", "--batch-size", "1")
    process = _distill(out, *args, data=folder, cache=cache, wait=False)
    deadline = time.time() + 600
    while time.time() < deadline and len(list((cache / "labels" / "items").glob("*.json"))) < 1:
        time.sleep(0.05)
    process.kill()  # SIGKILL: no handler runs
    process.communicate(timeout=60)
    done_before = len(list((cache / "labels" / "items").glob("*.json")))
    assert 1 <= done_before < 4
    run = _distill(out, *args, data=folder, cache=cache)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"labelling {4 - done_before} of 4" in run.stderr  # what was done is kept
    assert not list((cache / "labels" / "items").glob(".*.tmp"))


def test_torchrun_two_processes_with_gloo(data_dir, tmp_path, shared_cache):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
        "distill.py", "--teacher", "tiny.en", "--data", str(data_dir / "test-clean"), "--out", str(out),
        "--cache", str(shared_cache), "--decoder-layers", "1", "--batch-size", "1", "--workers", "0", "--max-steps", "2",
        "--eval-every", "0", "--log-every", "1", "--windows", "1", "--margins", "8,16", "--exclude-speakers", "",
    ]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    records = _log(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2] and records[-1]["done"]
    assert (out / "student.pt").exists()
