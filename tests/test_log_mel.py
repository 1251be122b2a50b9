"""The log-Mel reference against openai-whisper, the batch semantics we add to it (lengths, per-row max), and
the Triton kernel against the float64 reference (on CPU through Triton's interpreter, switched on in conftest;
skipped where Triton is not installed)."""
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import whisper.audio

import kernels.log_mel
from kernels.log_mel import (HOP_LENGTH, SAMPLE_RATE, TRITON_AVAILABLE, log_mel_spectrogram,
                             log_mel_spectrogram_reference, log_mel_spectrogram_triton, mel_filters)

# The interpreter's tl.dot is exact float32, so the kernel should be float32-accurate here (~1e-5 seen);
# the looser MAX_ABS_ERROR = 2e-3 is the contract on the GPU, where tl.dot rounds through tf32.
INTERPRETER_ATOL = 1e-4
requires_triton = pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton is not installed")

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


@pytest.mark.parametrize("samples", [12345, SAMPLE_RATE, 401])
def test_noise_matches_whisper(samples):
    torch.manual_seed(samples)
    audio = 0.1 * torch.randn(samples)
    got = log_mel_spectrogram(audio)
    assert got.shape == (80, samples // HOP_LENGTH)
    torch.testing.assert_close(got, whisper.audio.log_mel_spectrogram(audio), rtol=0, atol=1e-4)


def _ragged_batch(seed=0):
    """Three noise utterances of different lengths and loudness in one buffer, garbage after each end."""
    torch.manual_seed(seed)
    lengths = torch.tensor([SAMPLE_RATE, 9001, 4321])
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


# ----------------------------------------------------------------------------- the Triton kernel

def _triton_into_nan(audio, n_mels, lengths=None, **kwargs):
    """log_mel_spectrogram_triton writing into a NaN-poisoned buffer, so an element it skips shows up."""
    frames = audio.shape[-1] // HOP_LENGTH
    out = torch.full((*audio.shape[:-1], n_mels, frames), float("nan"))
    got = log_mel_spectrogram_triton(audio, n_mels, lengths, out=out, **kwargs)
    assert got is out
    assert not got.isnan().any()
    return got


def _noise_with_garbage(batch, samples, lengths, seed):
    """(B, samples) float64 noise of varied loudness; NaN and huge values past each row's length."""
    torch.manual_seed(seed)
    gains = torch.logspace(0, -3, batch)[:, None]  # loud to quiet rows: each is clamped to its own maximum
    audio = gains * torch.randn(batch, samples, dtype=torch.float64)
    if lengths is not None:
        past_end = torch.arange(samples)[None, :] >= torch.tensor(lengths)[:, None]
        audio = torch.where(past_end, torch.full_like(audio, float("nan")), audio)
        if lengths[-1] <= samples - 3:
            audio[-1, -3:] = 1e30  # huge finite garbage as well as NaN
    return audio


@requires_triton
@pytest.mark.parametrize("batch, samples, n_mels, lengths", [
    (1, SAMPLE_RATE, 80, None),  # 100 frames: a partial last tile; samples % 160 = 0, so the end reflects
    (2, 12345, 128, None),  # odd length
    (3, 20001, 80, [20001, 9001, 4321]),  # one full row, two ending early: their reflections see zeros
    (3, 8039, 128, [150, 0, 8039]),  # shorter than the 200-sample reflection, and an empty row
    (1, 401, 80, None),  # two frames
    (2, 201, 128, [201, 200]),  # the shortest input: one frame
])
def test_triton_matches_float64_reference(batch, samples, n_mels, lengths):
    audio = _noise_with_garbage(batch, samples, lengths, seed=samples)
    expected = log_mel_spectrogram_reference(audio, n_mels, lengths)  # float64
    got = _triton_into_nan(audio.float(), n_mels, lengths)
    assert got.shape == (batch, n_mels, samples // HOP_LENGTH) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=INTERPRETER_ATOL)


@requires_triton
@pytest.mark.parametrize("tiles", [
    {"BLOCK_T": 16, "F_CHUNK": 256, "K_CHUNK": 64},  # the whole spectrum in one chunk
    {"BLOCK_T": 32, "F_CHUNK": 64, "K_CHUNK": 16},  # four frequency chunks, thirteen offset chunks
])
def test_triton_tile_sizes_agree(tiles):
    lengths = [6000, 3001]
    audio = _noise_with_garbage(2, 6000, lengths, seed=7)
    expected = log_mel_spectrogram_reference(audio, 80, lengths)
    got = _triton_into_nan(audio.float(), 80, lengths, tiles=tiles)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=INTERPRETER_ATOL)


@requires_triton
def test_triton_on_speech(speech):
    """The first 2 s of two test-clean utterances in one padded buffer, the second cut to 1.3 s."""
    lengths = [32000, 20800]
    buffer = torch.from_numpy(np.stack([audio[:32000] for audio in speech]))  # (2, 32000) float32
    expected = log_mel_spectrogram_reference(buffer.double(), 128, lengths)
    got = _triton_into_nan(buffer, 128, lengths)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=INTERPRETER_ATOL)
    assert (expected.amax(dim=(1, 2)) - expected.amin(dim=(1, 2))).min() > 1.0  # speech, not silence


@requires_triton
def test_triton_single_utterance_and_dtypes():
    torch.manual_seed(8)
    audio = 0.3 * torch.randn(3210, dtype=torch.float64)
    expected = log_mel_spectrogram_reference(audio)
    got = _triton_into_nan(audio, 80)  # 1-D in, (n_mels, frames) out; float64 is read and computed in float32
    assert got.shape == (80, 3210 // HOP_LENGTH) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=INTERPRETER_ATOL)
    half = log_mel_spectrogram_triton(audio.half())  # half in, float32 out, as the reference
    torch.testing.assert_close(half, log_mel_spectrogram_reference(audio.half()), rtol=0, atol=INTERPRETER_ATOL)
    strided = torch.randn(2, 2 * 3210, dtype=torch.float32)[:, ::2]  # no unit stride: copied first
    torch.testing.assert_close(log_mel_spectrogram_triton(strided), log_mel_spectrogram_reference(strided),
                               rtol=0, atol=INTERPRETER_ATOL)


@requires_triton
def test_triton_bad_inputs_raise():
    torch.manual_seed(9)
    audio = torch.randn(2, 4000)
    with pytest.raises(ValueError, match="n_mels"):
        log_mel_spectrogram_triton(audio, n_mels=64)
    with pytest.raises(ValueError, match="lengths"):
        log_mel_spectrogram_triton(audio, lengths=[4001, 10])
    with pytest.raises(ValueError, match="too short"):
        log_mel_spectrogram_triton(torch.randn(150))
    with pytest.raises(ValueError, match="out must be"):
        log_mel_spectrogram_triton(audio, out=torch.empty(2, 80, 24))  # 4000 // 160 = 25 frames
    with pytest.raises(ValueError, match="out must be"):
        log_mel_spectrogram_triton(audio, out=torch.empty(2, 80, 25, dtype=torch.float64))
    with pytest.raises(ValueError, match="K_CHUNK"):
        log_mel_spectrogram_triton(audio, tiles={"K_CHUNK": 24})


def test_cpu_tensors_take_the_reference_path(monkeypatch):
    calls = []
    real_reference = kernels.log_mel.log_mel_spectrogram_reference

    def reference(*args):
        calls.append("reference")
        return real_reference(*args)

    def triton_kernel(*args):
        calls.append("triton")
        raise AssertionError("a CPU tensor reached the Triton kernel")

    monkeypatch.setattr(kernels.log_mel, "log_mel_spectrogram_reference", reference)
    monkeypatch.setattr(kernels.log_mel, "log_mel_spectrogram_triton", triton_kernel)
    torch.manual_seed(10)
    audio = torch.randn(2, 4000)
    got = log_mel_spectrogram(audio, 80, torch.tensor([4000, 2500]))
    assert calls == ["reference"]
    torch.testing.assert_close(got, real_reference(audio, 80, torch.tensor([4000, 2500])), rtol=0, atol=0)
