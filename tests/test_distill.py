"""Distillation: the student, the ASKD schedule and loss, and distill.py end to end (CPU, tiny.en)."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from askd import ASKDConfig, ASKDSchedule, distillation_loss
from data import SpeechDataset, collate, length_bucketed_batches, list_utterances, training_tokens
from kernels import log_mel_spectrogram
from load import load_model
from student import make_student, shares_teacher_encoder, spaced_layers
from tokenizer import get_tokenizer

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


def _batch(data_dir, tokenizer, n=2):
    utterances = list_utterances(data_dir / "test-clean")[:n]
    dataset = SpeechDataset([(u, u.text.lower()) for u in utterances], tokenizer)
    batch = collate([dataset[i] for i in range(n)])
    mel = log_mel_spectrogram(batch["audio"], lengths=batch["lengths"])
    return mel, batch["tokens"], batch["labels"]


@pytest.mark.parametrize("method", ["ce", "kd", "askd"])
def test_loss_terms_finite_and_decreasing_on_a_repeated_batch(teacher, data_dir, method):
    torch.manual_seed(0)
    tokenizer = get_tokenizer(False)
    mel, tokens, labels = _batch(data_dir, tokenizer)
    student = make_student(teacher, decoder_layers=1)
    schedule = ASKDSchedule(ASKDConfig(method=method))
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=3e-4)
    with torch.no_grad():
        features = teacher.embed_audio(mel)
        soft = teacher(mel, tokens, audio_features=features)
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


def test_training_tokens_layout():
    tokenizer = get_tokenizer(True, language="en", task="transcribe")
    tokens, labels = training_tokens(tokenizer, "hello world")
    prompt = list(tokenizer.sot_sequence_including_notimestamps)
    assert tokens[: len(prompt)] == prompt and len(tokens) == len(labels)
    assert labels[: len(prompt) - 1] == [-100] * (len(prompt) - 1)
    assert labels[len(prompt) - 1 : -1] == tokens[len(prompt) :] and labels[-1] == tokenizer.eot


def test_batches_are_deterministic_and_sharded():
    lengths = [5, 9, 3, 7, 2, 8, 6, 4, 1, 10, 11]
    a = length_bucketed_batches(lengths, 2, seed=1, epoch=0)
    assert a == length_bucketed_batches(lengths, 2, seed=1, epoch=0)
    assert a != length_bucketed_batches(lengths, 2, seed=1, epoch=1)
    r0 = length_bucketed_batches(lengths, 2, 1, 0, rank=0, world_size=2)
    r1 = length_bucketed_batches(lengths, 2, 1, 0, rank=1, world_size=2)
    assert len(r0) == len(r1) and not set(sum(r0, [])) & set(sum(r1, []))


# ---------------------------------------------------------------------------------------------
# distill.py end to end


def _distill(out, *extra, data=None, env=None, wait=True):
    command = [
        sys.executable, "distill.py", "--teacher", "tiny.en", "--data", str(data), "--out", str(out),
        "--decoder-layers", "1", "--batch-size", "2", "--workers", "0", "--log-every", "1", "--seed", "3", *extra,
    ]
    environment = {**os.environ, **(env or {})}
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _losses(out):
    return {r["step"]: r["loss"] for r in _log(out) if "loss" in r}


@pytest.mark.parametrize("method", ["ce", "kd", "askd"])
def test_each_method_trains_and_writes_a_loadable_student(data_dir, tmp_path, method):
    out = tmp_path / method
    run = _distill(out, "--method", method, "--max-steps", "4", "--phase-a-end", "0.5", "--self-refresh", "1",
                   "--eval-data", str(data_dir / "test-clean"), "--eval-limit", "2", "--eval-every", "0",
                   "--labels", "transcript", data=data_dir / "test-clean")
    assert run.returncode == 0, run.stderr[-2000:]
    records = [r for r in _log(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    phases = [r["phase"] for r in records]
    assert phases == {"ce": ["none"] * 4, "kd": ["teacher"] * 4, "askd": ["teacher"] * 3 + ["self"]}[method]
    done = _log(out)[-1]
    assert done["done"] and 0 <= done["student_dev_wer"] and 0 <= done["teacher_dev_wer"] < 0.2
    student = load_model(out / "student.pt", device="cpu")
    assert student.dims.n_text_layer == 1
    run = subprocess.run([sys.executable, "evaluate.py", "--model", str(out / "student.pt"), "--data", str(data_dir / "test-clean"),
                          "--limit", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "WER" in run.stdout, run.stderr[-2000:]


def test_interrupt_and_resume_gives_the_same_trajectory(data_dir, tmp_path):
    common = ("--max-steps", "8", "--phase-a-end", "0.5", "--self-refresh", "2", "--labels", "transcript", "--eval-every", "0")
    data = data_dir / "test-clean"
    straight = tmp_path / "straight"
    assert _distill(straight, *common, data=data).returncode == 0
    expected = _losses(straight)

    broken = tmp_path / "broken"
    process = _distill(broken, *common, data=data, wait=False)
    deadline = time.time() + 300
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

    resumed = _distill(broken, *common, "--resume", data=data)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = _losses(broken)
    assert sorted(got) == list(range(1, 9))
    for step, loss in expected.items():
        assert math.isclose(got[step], loss, rel_tol=1e-5), (step, got[step], loss)

    mismatch = _distill(broken, *common, "--resume", "--method", "kd", data=data)
    assert mismatch.returncode != 0 and "--method" in mismatch.stderr


def test_resume_without_checkpoint_is_an_error(data_dir, tmp_path):
    run = _distill(tmp_path / "none", "--max-steps", "2", "--labels", "transcript", "--resume", data=data_dir / "test-clean")
    assert run.returncode != 0 and "does not exist" in run.stderr


def test_corrupt_audio_is_skipped_and_counted(data_dir, tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    for u in list_utterances(data_dir / "test-clean")[:3]:
        shutil.copy(u.audio, folder / u.audio.name)
        (folder / u.audio.name).with_suffix(".txt").write_text(u.text)
    (folder / "broken.flac").write_bytes(b"not audio at all" * 100)
    (folder / "broken.txt").write_text("SOME TEXT")
    out = tmp_path / "run"
    run = _distill(out, "--max-steps", "2", "--eval-every", "0", data=folder)
    assert run.returncode == 0, run.stderr[-2000:]
    assert '"unreadable": 1' in run.stderr and "broken.flac" in run.stderr
    # a file that breaks after labelling is skipped mid-epoch, not fatal
    (folder / list_utterances(data_dir / "test-clean")[0].audio.name).write_bytes(b"gone bad")
    run = _distill(out, "--max-steps", "2", "--eval-every", "0", "--labels", "transcript", data=folder)
    assert run.returncode == 0, run.stderr[-2000:]
    assert sum(r.get("skipped", 0) > 0 for r in _log(out)) >= 1


def test_torchrun_two_processes_with_gloo(data_dir, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
        "distill.py", "--teacher", "tiny.en", "--data", str(data_dir / "test-clean"), "--out", str(out),
        "--decoder-layers", "1", "--batch-size", "1", "--workers", "0", "--max-steps", "2",
        "--labels", "transcript", "--eval-every", "0", "--log-every", "1",
    ]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    records = _log(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2] and records[-1]["done"]
    assert (out / "student.pt").exists()
