"""More signal from the same speech: the test split kept out, speed perturbation, and the teacher's block
outputs as targets for intermediate-layer distillation (CPU, tiny.en, real utterances)."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from askd import ASKDConfig, SoftTargets, distillation_loss, hidden_state_loss
from audio import N_SAMPLES, SAMPLE_RATE, change_speed, load_audio
from cache import ArrayCache
from data import DEV_SPEAKERS, TEST_SOURCE, TEST_SPEAKERS, held_out_test, list_utterances
from load import load_model
from prepare import (
    Example, Labelled, TargetSettings, at_speeds, cache_targets, label_examples, labelling_key, load_example_audio,
    plan_examples, retimed, targets_key, training_utterances,
)
from student import layers_stood_for, make_student
from tokenizer import tokenizer_for


@pytest.fixture(scope="module")
def teacher():
    return load_model("tiny.en", device="cpu", dtype=torch.float32).requires_grad_(False)


def _dominant_hz(audio: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.argmax(spectrum)) * SAMPLE_RATE / len(audio)


# ---------------------------------------------------------------------------------------------
# The test split


def test_a_sidecar_folder_named_like_librispeech_gives_speakers(tmp_path, data_dir):
    source = list_utterances(data_dir / "test-clean")[0]
    for name in (source.id, "interview"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / f"{name}.flac").write_bytes(source.audio.read_bytes())
        (folder / f"{name}.txt").write_text("SOME WORDS\n")
    found = {u.id: u.speaker for u in list_utterances(tmp_path)}
    assert found == {source.id: source.speaker, "interview": None}
    assert [u.id for u in list_utterances(tmp_path, speakers=[source.speaker])] == [source.id]


def test_the_test_split_is_its_speakers_and_never_training_data(data_dir):
    test = held_out_test()
    assert test and {u.speaker for u in test} == set(TEST_SPEAKERS)
    assert all(u.text and u.audio.exists() for u in test)
    # left out of training even when nothing else is excluded, from any source that holds them
    training = training_utterances([data_dir / TEST_SOURCE, data_dir / "train-clean-5"], exclude_speakers=[])
    assert training and not {u.speaker for u in training} & set(TEST_SPEAKERS)
    assert {u.speaker for u in training} & set(DEV_SPEAKERS)  # dev is excluded by the caller's choice only
    assert not {u.id for u in training} & {u.id for u in test}


def test_windows_join_utterances_of_a_sidecar_librispeech_source(data_dir):
    utterances = list_utterances(data_dir / TEST_SOURCE, speakers=TEST_SPEAKERS[:1])[:12]
    windows = [e for e in plan_examples(utterances, 0.0, windows=2) if len(e.audio) > 1]
    assert len(windows) == 2
    for window in windows:
        ids = [path.stem for path in window.audio]
        assert len({i.rsplit("-", 1)[0] for i in ids}) == 1 and ids == sorted(ids)


# ---------------------------------------------------------------------------------------------
# Speed perturbation


@pytest.mark.parametrize("speed", [0.9, 1.1])
def test_speed_changes_length_and_pitch_together(speed):
    t = np.arange(2 * SAMPLE_RATE) / SAMPLE_RATE
    tone = (0.3 * np.sin(2 * np.pi * 1000 * t) + 0.2 * np.sin(2 * np.pi * 2500 * t)).astype(np.float32)
    faster = change_speed(tone, speed)
    assert faster.dtype == np.float32 and abs(len(faster) - len(tone) / speed) <= 1
    assert abs(_dominant_hz(faster) - 1000 * speed) < 2
    assert abs(np.sqrt(np.mean(faster**2)) - np.sqrt(np.mean(tone**2))) < 0.01  # loudness kept


def test_speed_one_is_a_copy_and_bad_speeds_are_refused():
    audio = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    same = change_speed(audio, 1.0)
    assert np.array_equal(same, audio) and same is not audio
    for bad in (0.0, 3.0, 1.00001):
        with pytest.raises(ValueError):
            change_speed(audio, bad)


def test_timestamps_move_with_the_audio_and_text_does_not():
    begin = 50363
    tokens = [begin + 0, 100, 200, begin + 110, begin + 110, 300, begin + 1490]
    assert retimed(tokens, 1.1, begin) == [begin + 0, 100, 200, begin + 100, begin + 100, 300, begin + 1355]
    assert retimed(tokens, 0.9, begin)[3] == begin + 122 and retimed(tokens, 0.9, begin)[-1] == begin + 1500


def _labelled(example, tokens=(440, 1110, 13), text=" The end."):
    return Labelled(example, f"item-of-{example.id}-{example.timestamps}", list(tokens), text)


def test_perturbed_copies_keep_the_label_and_get_their_own_cache_names(data_dir):
    utterances = list_utterances(data_dir / "test-clean")
    plain = _labelled(Example(utterances[0].id, (utterances[0].audio,), utterances[0].text, False))
    stamped = _labelled(replace(plain.example, timestamps=True), tokens=(50363, 440, 50463))
    # a window of 28.4 s: at 0.9 (31.5 s) it would not fit the encoder's window, so that copy is left out
    parts = (utterances[0].audio, utterances[0].audio, utterances[3].audio, utterances[2].audio)
    long_window = _labelled(Example("w", parts, None, True), tokens=(50363, 440, 50463))
    copies = at_speeds([plain, stamped, long_window], (1.0, 0.9, 1.1), timestamp_begin=50363)
    speeds = [(x.example.id, x.example.speed) for x in copies]
    ids = (plain.example.id, stamped.example.id)
    assert speeds == [(i, 1.0) for i in (*ids, "w")] + [(i, 0.9) for i in ids] + [(i, 1.1) for i in (*ids, "w")]
    assert all(x.text == plain.text for x in copies)  # the recording's label
    by_speed = {x.example.speed: x for x in copies if x.example.id == plain.example.id and not x.example.timestamps}
    assert [by_speed[s].item for s in (1.0, 0.9, 1.1)] == [plain.item] * 3
    assert [by_speed[s].tokens for s in (1.0, 0.9, 1.1)] == [plain.tokens] * 3
    stamped_copies = [x.tokens for x in copies if x.example.timestamps and x.example.id == stamped.example.id]
    assert stamped_copies == [[50363, 440, 50463], [50363, 440, 50474], [50363, 440, 50454]]
    names = {x.target_item for x in copies}
    assert len(names) == len(copies)  # each speed its own targets item; the labels item is shared
    assert at_speeds([plain], (1.1,), 50363)[0].target_item == by_speed[1.1].target_item


def test_a_perturbed_example_loads_at_its_speed(data_dir):
    utterance = list_utterances(data_dir / "test-clean")[0]
    example = Example(utterance.id, (utterance.audio,), utterance.text, False)
    recorded = load_audio(utterance.audio)
    for speed in (0.9, 1.1):
        audio = load_example_audio(replace(example, speed=speed))
        assert abs(len(audio) - len(recorded) / speed) <= 1
        np.testing.assert_array_equal(audio, change_speed(recorded, speed))


# ---------------------------------------------------------------------------------------------
# The cached targets of a perturbed copy, and the teacher's block outputs


def test_targets_of_a_perturbed_copy_are_computed_on_its_audio(teacher, data_dir, tmp_path):
    tokenizer = tokenizer_for(teacher, language="en", task="transcribe")
    student = make_student(teacher, decoder_layers=2)
    utterance = list_utterances(data_dir / "test-clean")[1]
    examples = [Example(utterance.id, (utterance.audio,), utterance.text, False)]
    labels = ArrayCache(tmp_path / "labels", labelling_key(teacher))
    labelled, _ = label_examples(teacher, examples, labels, batch_size=1, log=lambda *a: None)
    copies = at_speeds(labelled, (1.0, 1.1), tokenizer.timestamp_begin)
    settings = TargetSettings(top_k=8, temperature=2.0, margins=(16,), frozen_encoder_layers=4)
    targets = ArrayCache(tmp_path / "targets", targets_key(teacher, student, settings))
    items = cache_targets(teacher, student, tokenizer, copies, labels, targets, settings, log=lambda *a: None)
    assert items == [x.target_item for x in copies]
    recorded, faster = (targets.load(name) for name in items)
    n_labels = len(labelled[0].tokens) + 1  # the text and <|endoftext|>
    for arrays in (recorded, faster):
        assert arrays["top_ids"].shape == (n_labels, 8)
        assert arrays["hidden"].shape == (n_labels, teacher.dims.n_text_layer, teacher.dims.n_text_state)
        assert arrays["hidden"].dtype == np.float16 and np.isfinite(arrays["hidden"]).all()
    # the frozen encoder's output covers the audio it was given: 1/1.1 as many positions (+ the margin)
    positions = [len(a["features_m16"]) - 16 for a in (recorded, faster)]
    assert abs(positions[1] - positions[0] / 1.1) <= 2
    # the teacher heard a different recording, so its soft targets differ, but its likeliest tokens barely
    assert not np.array_equal(recorded["top_values"], faster["top_values"])
    assert (recorded["top_ids"][:, 0] == faster["top_ids"][:, 0]).mean() > 0.8
    # the last block's cached output is what the teacher projects onto the vocabulary
    last = torch.tensor(recorded["hidden"][:, -1], dtype=torch.float32)
    logits = teacher.decoder.logits_of(last)
    assert torch.equal(logits.topk(8, dim=-1).indices[:, 0], torch.tensor(recorded["top_ids"][:, 0]).long())


# ---------------------------------------------------------------------------------------------
# Intermediate-layer distillation


def test_each_student_block_stands_for_the_last_teacher_block_it_replaces():
    assert layers_stood_for(4, 2) == [2, 3]
    assert layers_stood_for(4, 3) == [0, 2, 3]
    assert layers_stood_for(4, 4) == [0, 1, 2, 3]
    assert layers_stood_for(6, 3) == [1, 4, 5]
    assert layers_stood_for(6, 1) == [5]


def test_hidden_state_loss_is_scale_free_and_pulls_toward_the_teacher():
    torch.manual_seed(0)
    teacher_blocks = torch.randn(5, 2, 16) * torch.tensor([1.0, 30.0])[None, :, None]  # deeper blocks are larger
    assert hidden_state_loss(3 * teacher_blocks + 1, teacher_blocks) < 1e-6  # per-position normalisation
    student_blocks = torch.randn(5, 2, 16, requires_grad=True)
    loss = hidden_state_loss(student_blocks, teacher_blocks)
    assert 1.0 < loss < 3.0  # 2 (1 - correlation) for unrelated vectors
    loss.backward()
    with torch.no_grad():
        assert hidden_state_loss(student_blocks - 0.5 * student_blocks.grad / student_blocks.grad.norm(), teacher_blocks) < loss


def test_the_hidden_term_enters_the_loss_with_the_teachers_weight():
    torch.manual_seed(1)
    logits, labels = torch.randn(3, 10), torch.tensor([1, 2, 3])
    soft = SoftTargets(top_values=torch.randn(3, 4), top_ids=torch.randint(10, (3, 4)),
                       teacher_lse=torch.full((3,), 5.0), hidden=torch.randn(3, 2, 8))
    student_blocks = torch.randn(3, 2, 8)
    without = distillation_loss(logits, labels, soft, 0.5, 1.0, 2.0)
    with_hidden = distillation_loss(logits, labels, soft, 0.5, 1.0, 2.0, student_blocks, hidden_weight=3.0)
    expected = without["loss"] + 0.5 * 3.0 * hidden_state_loss(student_blocks, soft.hidden)
    assert torch.isclose(with_hidden["loss"], expected) and with_hidden["hidden"] > 0 and without["hidden"] == 0
    with pytest.raises(ValueError):
        ASKDConfig(hidden_weight=-1.0)
