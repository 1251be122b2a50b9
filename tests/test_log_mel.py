"""The log-Mel reference against openai-whisper, and the batch semantics we add to it (lengths, per-row max)."""
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import whisper.audio

from kernels.log_mel import HOP_LENGTH, log_mel_spectrogram, log_mel_spectrogram_reference, mel_filters

with np.load(Path(whisper.audio.__file__).parent / "assets" / "mel_filters.npz") as npz:
    WHISPER_FILTERS = dict(npz)  # mel_80 (80, 201), mel_128 (128, 201): librosa's float32 filterbanks


@pytest.fixture(scope="module")
def speech(data_dir):
    """Two real test-clean utterances, float32 16 kHz."""
    paths = sorted((data_dir / "test-clean").rglob("*.flac"))[:2]
    return [soundfile.read(str(p), dtype="float32")[0] for p in paths]


@pytest.mark.parametrize("n_mels", [80, 128])
def test_filters_match_whisper_assets(n_mels):
    ours = mel_filters(n_mels)
    assert ours.shape == (n_mels, 201) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), WHISPER_FILTERS[f"mel_{n_mels}"], rtol=0, atol=1e-6)
    assert mel_filters(n_mels) is ours  # cached


@pytest.mark.parametrize("n_mels", [80, 128])
def test_real_speech_matches_whisper(speech, n_mels):
    for audio in speech:
        audio = whisper.audio.pad_or_trim(audio)  # 30 s, as whisper.decode feeds the encoder
        expected = whisper.audio.log_mel_spectrogram(torch.from_numpy(audio), n_mels)
        got = log_mel_spectrogram(audio, n_mels)  # numpy in
        assert got.shape == (n_mels, 3000)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_float64_reference_agrees_with_float32(speech):
    audio = torch.from_numpy(whisper.audio.pad_or_trim(speech[0]))
    high = log_mel_spectrogram_reference(audio.double())
    assert high.dtype == torch.float64
    torch.testing.assert_close(log_mel_spectrogram_reference(audio).double(), high, rtol=0, atol=1e-4)


@pytest.mark.parametrize("samples", [12345, 16000, 401])
def test_noise_matches_whisper(samples):
    torch.manual_seed(samples)
    audio = 0.1 * torch.randn(samples)
    got = log_mel_spectrogram(audio)
    assert got.shape == (80, samples // HOP_LENGTH)
    torch.testing.assert_close(got, whisper.audio.log_mel_spectrogram(audio), rtol=0, atol=1e-4)


def _ragged_batch(seed=0):
    """Three noise utterances of different lengths and loudness in one buffer, garbage after each end."""
    torch.manual_seed(seed)
    lengths = torch.tensor([16000, 9001, 4321])
    gains = [1.0, 1e-3, 0.05]  # a loud row next to quiet ones: a batch-wide max would flatten them
    rows = [gain * torch.randn(int(n)) for gain, n in zip(gains, lengths)]
    buffer = 5.0 * torch.randn(len(rows), int(lengths.max()))  # garbage everywhere ...
    for row, audio in zip(buffer, rows):
        row[: len(audio)] = audio  # ... except the valid part
    return buffer, lengths, rows


def test_batch_with_lengths_equals_each_utterance_alone():
    buffer, lengths, rows = _ragged_batch()
    batch = log_mel_spectrogram(buffer, lengths=lengths)
    assert batch.shape == (3, 80, buffer.shape[1] // HOP_LENGTH)
    for got, audio in zip(batch, rows):
        alone = torch.nn.functional.pad(audio, (0, buffer.shape[1] - len(audio)))  # zeros past its end
        torch.testing.assert_close(got, log_mel_spectrogram(alone), rtol=0, atol=1e-5)
        torch.testing.assert_close(got, whisper.audio.log_mel_spectrogram(alone), rtol=0, atol=1e-4)
    # openai-whisper clamps a batch to one global max, which lifts the quiet row's silence floor
    zero_padded = torch.stack([torch.nn.functional.pad(a, (0, buffer.shape[1] - len(a))) for a in rows])
    global_max = whisper.audio.log_mel_spectrogram(zero_padded)
    assert (batch[1] - global_max[1]).abs().max() > 0.5


def test_garbage_past_length_has_no_effect():
    buffer, lengths, _ = _ragged_batch(seed=1)
    clean = buffer.clone()
    dirty = buffer.clone()
    for b, n in enumerate(lengths.tolist()):
        clean[b, n:] = 0.0
        dirty[b, n:] = float("nan")  # even NaN must not leak through the mask
    dirty[2, -5:] = 1e30
    expected = log_mel_spectrogram(clean)
    torch.testing.assert_close(log_mel_spectrogram(dirty, lengths=lengths), expected, rtol=0, atol=0)
    torch.testing.assert_close(log_mel_spectrogram(buffer, lengths=lengths), expected, rtol=0, atol=0)


def test_full_lengths_equal_no_lengths():
    torch.manual_seed(3)
    audio = 0.2 * torch.randn(2, 8000, dtype=torch.float64)
    with_lengths = log_mel_spectrogram(audio, lengths=torch.tensor([8000, 8000]))
    assert with_lengths.dtype == torch.float64
    torch.testing.assert_close(with_lengths, log_mel_spectrogram(audio), rtol=0, atol=0)


def test_bad_inputs_raise():
    torch.manual_seed(4)
    audio = torch.randn(2, 4000)
    for n_mels in (0, 64, 81, 256):
        with pytest.raises(ValueError, match="n_mels"):
            mel_filters(n_mels)
        with pytest.raises(ValueError, match="n_mels"):
            log_mel_spectrogram(audio, n_mels=n_mels)
    with pytest.raises(ValueError, match="lengths"):
        log_mel_spectrogram(audio, lengths=torch.tensor([4000]))  # one length for two rows
    with pytest.raises(ValueError, match="lengths"):
        log_mel_spectrogram(audio, lengths=torch.tensor([4001, 10]))  # longer than the buffer
    with pytest.raises(ValueError, match="lengths"):
        log_mel_spectrogram(audio, lengths=torch.tensor([-1, 10]))
    with pytest.raises(ValueError, match="lengths"):
        log_mel_spectrogram(audio, lengths=torch.tensor([100.0, 10.0]))
    with pytest.raises(ValueError, match="too short"):
        log_mel_spectrogram(torch.randn(150))
    with pytest.raises(ValueError, match="shape"):
        log_mel_spectrogram(torch.randn(2, 3, 4000))
    with pytest.raises(ValueError, match="floating-point"):
        log_mel_spectrogram(torch.randint(-100, 100, (4000,)))
    with pytest.raises(ValueError, match="numpy array or torch tensor"):
        log_mel_spectrogram([0.1] * 4000)
