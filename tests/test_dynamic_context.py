"""Audio context: the encoder on the real length of the audio. A row's result does not depend on what else is
in the batch, 30 s of audio gives the fixed path's logits bit for bit, and the policy travels with the model."""
import numpy as np
import pytest
import torch
import whisper  # test-only reference implementation

from audio import N_SAMPLES, SAMPLE_RATE, load_audio
from data import DEV_SPEAKERS, list_utterances
from decoding import NO_FALLBACK, DecodingOptions, decode
from load import CHECKPOINT_FORMAT, checkpoint_provenance, load_model, save_checkpoint
from model import AudioContext, ModelDimensions, Whisper
from transcribe import encoder_input, transcribe, transcribe_clips
from weights import CheckpointError

GREEDY = DecodingOptions(language="en", without_timestamps=True)
SMALL = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=2,
                        n_vocab=51864, n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=2)
ROW_TOLERANCE = 1e-4  # float32: a row in a padded batch against the row alone (other kernels, other sums)


@pytest.fixture(scope="module", params=["random", "tiny.en"])
def model(request):
    if request.param == "tiny.en":
        return load_model("tiny.en", device="cpu", dtype=torch.float32)
    torch.manual_seed(0)
    return Whisper(SMALL).eval()


@pytest.fixture(scope="module")
def dev_audio(data_dir):
    """Four dev utterances of different lengths."""
    utterances = list_utterances(data_dir / "train-clean-5", speakers=DEV_SPEAKERS)
    clips = sorted((load_audio(u.audio) for u in utterances[:12]), key=len)
    return clips[::3]


def _mixed_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([240, 97, 31, 1])  # encoder positions; the longest sets the batch's width
    mel = torch.randn(len(lengths), 80, 2 * int(lengths.max()), generator=generator)
    tokens = torch.randint(0, 50000, (len(lengths), 7), generator=generator)
    return mel, lengths, tokens


@torch.no_grad()
def test_each_row_of_a_mixed_batch_equals_the_row_alone(model):
    mel, lengths, tokens = _mixed_batch()
    features = model.embed_audio(mel, lengths)  # (B, 240, D)
    logits = model.logits(tokens, features, audio_lengths=lengths)
    for i, n in enumerate(lengths.tolist()):
        alone_features = model.embed_audio(mel[i : i + 1, :, : 2 * n])  # (1, n, D): nothing padded
        alone = model.logits(tokens[i : i + 1], alone_features)
        assert (features[i, :n] - alone_features[0]).abs().max() <= ROW_TOLERANCE
        assert (logits[i] - alone[0]).abs().max() <= ROW_TOLERANCE, f"row {i} ({n} positions)"


@torch.no_grad()
def test_the_kv_cache_keeps_the_audio_mask(model):
    """Token by token on the cache (the decoding path) equals the teacher-forced pass over mixed lengths."""
    mel, lengths, tokens = _mixed_batch(seed=1)
    features = model.embed_audio(mel, lengths)
    full = model.logits(tokens, features, audio_lengths=lengths)
    cache = model.new_cache(len(lengths), tokens.shape[1])
    steps = [model.logits(tokens[:, :3], features, cache, audio_lengths=lengths)]
    steps += [model.logits(tokens[:, i : i + 1], features, cache) for i in range(3, tokens.shape[1])]
    assert (torch.cat(steps, dim=1) - full).abs().max() <= ROW_TOLERANCE


@torch.no_grad()
def test_greedy_tokens_of_a_mixed_batch_equal_each_row_alone(model, dev_audio):
    model.audio_context = AudioContext("dynamic", margin=16)
    try:
        mel, lengths = encoder_input(model, dev_audio)
        assert len(set(lengths.tolist())) == len(dev_audio)  # really mixed
        options = DecodingOptions(language="en", without_timestamps=True, sample_len=24)
        batched = decode(model, mel, options, lengths)
        for clip, result in zip(dev_audio, batched):
            alone_mel, alone_lengths = encoder_input(model, [clip])
            (alone,) = decode(model, alone_mel, options, alone_lengths)
            assert result.tokens == alone.tokens
        static = decode(model, mel, DecodingOptions(language="en", without_timestamps=True, sample_len=24,
                                                     static_step=True), lengths)
        assert [r.tokens for r in static] == [r.tokens for r in batched]  # the fixed-shape step reads the mask too
    finally:
        model.audio_context = AudioContext()


@torch.no_grad()
def test_a_dynamic_run_of_30_seconds_is_the_fixed_run_bit_for_bit(model):
    generator = torch.Generator().manual_seed(2)
    mel = torch.randn(2, 80, 3000, generator=generator)
    tokens = torch.randint(0, 50000, (2, 5), generator=generator)
    full = torch.tensor([1500, 1500])
    fixed = model.logits(tokens, model.embed_audio(mel))
    dynamic = model.logits(tokens, model.embed_audio(mel, full), audio_lengths=full)
    assert torch.equal(fixed, dynamic)


def test_bad_encoder_inputs_are_clear_errors(model):
    for frames in (3002, 2999, 0):
        with pytest.raises(ValueError, match="even number of frames"):
            decode(model, torch.randn(1, 80, frames), GREEDY)


def test_positions_follow_the_audio_and_stay_in_range():
    dynamic = AudioContext("dynamic", margin=16)
    assert dynamic.positions(1000, 1500) == 500 + 16
    assert dynamic.positions(1001, 1500) == 501 + 16  # an odd frame count rounds up: no audio is cut
    assert AudioContext("dynamic", 0).positions(0, 1500) == 1  # shorter than one position: padded up to one
    assert AudioContext("dynamic", 5000).positions(10, 1500) == 1500  # a margin past the context is clamped
    assert AudioContext().positions(10, 1500) == 1500  # fixed: always 30 s
    with pytest.raises(ValueError):
        AudioContext("sliding")


@torch.no_grad()
def test_a_clip_shorter_than_one_position_decodes(model):
    model.audio_context = AudioContext("dynamic", margin=0)
    try:
        click = 0.5 * np.sin(np.arange(100, dtype=np.float32))  # 6 ms: less than one encoder position
        (result,) = transcribe_clips(model, [click], DecodingOptions(language="en", without_timestamps=True,
                                                                      sample_len=8), NO_FALLBACK)
        assert isinstance(result.text, str)
    finally:
        model.audio_context = AudioContext()


@torch.no_grad()
def test_long_audio_keeps_30_s_windows_and_encodes_the_last_one_at_its_length(monkeypatch):
    torch.manual_seed(0)
    model = Whisper(SMALL, AudioContext("dynamic", margin=8)).eval()
    widths = []
    encoder = model.encoder.forward
    monkeypatch.setattr(model.encoder, "forward", lambda mel, lengths=None: widths.append(mel.shape[-1]) or encoder(mel, lengths))
    audio = 0.1 * np.random.default_rng(0).standard_normal(N_SAMPLES + 7 * SAMPLE_RATE).astype(np.float32)
    transcribe(model, audio, DecodingOptions(language="en", sample_len=4), NO_FALLBACK)
    assert widths[0] == 3000  # full windows stay 30 s
    assert all(w < 3000 for w in widths[1:]) and widths[1:]  # the rest: its own frames plus the margin


def test_checkpoints_carry_the_policy_and_the_provenance(tmp_path):
    torch.manual_seed(0)
    student = Whisper(SMALL, AudioContext("dynamic", margin=16))
    path = tmp_path / "student.pt"
    save_checkpoint(student, path, teacher="tiny.en", method="kd", seed=3, dev_wer=0.061)
    loaded = load_model(path, device="cpu")
    assert loaded.audio_context == AudioContext("dynamic", 16)
    assert checkpoint_provenance(path) == dict(teacher="tiny.en", method="kd", seed=3, dev_wer=0.061)
    with pytest.raises(ValueError, match="unknown provenance"):
        save_checkpoint(student, path, favourite_colour="blue")


def test_a_fixed_context_student_loads_in_openai_whisper(tmp_path):
    torch.manual_seed(0)
    student = Whisper(SMALL)
    path = tmp_path / "student.pt"
    save_checkpoint(student, path, teacher="tiny.en")
    theirs = whisper.load_model(str(path), device="cpu")
    assert load_model(path, device="cpu").audio_context == AudioContext()
    mel, tokens = torch.randn(1, 80, 3000), torch.randint(0, 50000, (1, 4))
    with torch.no_grad():
        assert torch.equal(theirs(mel, tokens), student.eval()(mel, tokens))


def test_an_unknown_format_or_policy_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    state = {"dims": SMALL.__dict__, "model_state_dict": Whisper(SMALL).state_dict()}
    for extra, message in (({"format_version": CHECKPOINT_FORMAT + 1}, "format version"),
                           ({"audio_context": {"mode": "sliding", "margin": 0}}, "bad audio_context"),
                           ({"audio_context": {"mode": "dynamic", "width": 3}}, "bad audio_context")):
        path = tmp_path / "bad.pt"
        torch.save({**state, **extra}, path)
        with pytest.raises(CheckpointError, match=message):
            load_model(path, device="cpu")
