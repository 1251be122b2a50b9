"""Loading, down-mixing and resampling audio files; fitting waveforms to the 30-second window."""
import time

import numpy as np
import pytest
import soundfile
import torch

import audio
from audio import SAMPLE_RATE, AudioError, load_audio, pad_or_trim, resample

EDGE = 1600  # samples ignored at each end of a resampled tone: the filter sees zeros past the edges there


def _tone(freq, sr, seconds=2.0, phase=0.3):
    t = np.arange(int(sr * seconds)) / sr
    return np.sin(2 * np.pi * freq * t + phase)


def _rms(x):
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def test_constants():
    assert (audio.SAMPLE_RATE, audio.N_FFT, audio.HOP_LENGTH) == (16000, 400, 160)
    assert (audio.CHUNK_LENGTH, audio.N_SAMPLES, audio.N_FRAMES, audio.FRAMES_PER_SECOND) == (30, 480000, 3000, 100)


# ----------------------------------------------------------------------------- real files

def test_librispeech_flac_loads_unchanged(data_dir):
    path = sorted((data_dir / "test-clean").rglob("*.flac"))[0]
    expected, sr = soundfile.read(str(path), dtype="float32")
    assert sr == SAMPLE_RATE
    got = load_audio(path)
    assert got.dtype == np.float32 and got.ndim == 1
    np.testing.assert_array_equal(got, expected)


def test_jfk_is_downmixed_and_resampled(data_dir):
    path = data_dir / "longform" / "jfk.flac"
    stereo, sr = soundfile.read(str(path), dtype="float64")
    assert sr == 44100 and stereo.shape[1] == 2  # the file really needs both steps
    got = load_audio(path)
    assert got.dtype == np.float32 and got.ndim == 1
    assert abs(len(got) - 11.0 * SAMPLE_RATE) <= 1
    expected = resample(stereo.mean(axis=1), 44100, SAMPLE_RATE)  # mix first, then resample, in float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert 0.1 < np.abs(got).max() <= 1.0  # speech, not silence or clipping garbage


def test_sample_rate_argument(data_dir):
    path = sorted((data_dir / "test-clean").rglob("*.flac"))[0]
    at_8k = load_audio(path, sr=8000)
    original = soundfile.read(str(path), dtype="float32")[0]
    assert len(at_8k) == (len(original) + 1) // 2
    with pytest.raises(ValueError, match="sr"):
        load_audio(path, sr=0)


# ----------------------------------------------------------------------------- written files

def test_8k_mono_file(tmp_path):
    path = tmp_path / "tone_8k.wav"
    soundfile.write(str(path), _tone(1000, 8000), 8000, subtype="FLOAT")
    got = load_audio(path)
    assert len(got) == 32000
    expected = _tone(1000, SAMPLE_RATE)
    assert _rms(got[EDGE:-EDGE] - expected[EDGE:-EDGE]) < 1e-4


def test_44k_stereo_file(tmp_path):
    path = tmp_path / "tone_44k_stereo.flac"
    left, right = 0.8 * _tone(1000, 44100), 0.4 * _tone(1000, 44100, phase=1.1)
    soundfile.write(str(path), np.stack([left, right], axis=1), 44100, subtype="PCM_24")
    got = load_audio(path)
    assert len(got) == 32000
    # the down-mix is the mean of the channels: a sum of two sines at 1 kHz, known exactly
    expected = 0.5 * (0.8 * _tone(1000, SAMPLE_RATE) + 0.4 * _tone(1000, SAMPLE_RATE, phase=1.1))
    assert _rms(got[EDGE:-EDGE] - expected[EDGE:-EDGE]) < 1e-4


@pytest.mark.parametrize("name", ["empty.wav", "empty.flac"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    soundfile.write(str(path), np.zeros((0, 1)), SAMPLE_RATE)
    with pytest.raises(AudioError, match=name):
        load_audio(path)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "nothing.flac"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match="nothing.flac"):
        load_audio(path)


def test_text_file_named_flac(tmp_path):
    path = tmp_path / "notes.flac"
    path.write_text("these are meeting notes, not audio\n" * 20)
    with pytest.raises(AudioError, match="notes.flac") as error:
        load_audio(path)
    assert isinstance(error.value, ValueError)  # AudioError is a ValueError


def test_truncated_flac(tmp_path, data_dir):
    source = sorted((data_dir / "test-clean").rglob("*.flac"))[0].read_bytes()
    for n_bytes in (1000, len(source) // 2):
        path = tmp_path / f"cut_{n_bytes}.flac"
        path.write_bytes(source[:n_bytes])
        with pytest.raises(AudioError, match=f"cut_{n_bytes}.flac"):
            load_audio(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_file.flac"):
        load_audio(tmp_path / "no_such_file.flac")
    with pytest.raises(AudioError, match="folder"):
        load_audio(tmp_path)


# ----------------------------------------------------------------------------- resampling

@pytest.mark.parametrize("orig_sr", [44100, 8000, 48000, 22050])
def test_resampled_sine_matches_analytic(orig_sr):
    got = resample(_tone(1000, orig_sr), orig_sr, SAMPLE_RATE)
    assert len(got) == 32000 and got.dtype == np.float64  # float64 in, float64 out
    expected = _tone(1000, SAMPLE_RATE)
    assert _rms(got[EDGE:-EDGE] - expected[EDGE:-EDGE]) < 1e-4


def test_downsampling_sine_matches_analytic():
    got = resample(_tone(1000, SAMPLE_RATE).astype(np.float32), SAMPLE_RATE, 8000)
    assert got.dtype == np.float32 and len(got) == 2 * 8000  # 2 s at 8 kHz
    expected = _tone(1000, 8000)
    assert _rms(got[EDGE:-EDGE] - expected[EDGE:-EDGE]) < 1e-4


@pytest.mark.parametrize("freq", [9000, 10000, 15000, 20000])
def test_tones_above_nyquist_are_removed(freq):
    got = resample(_tone(freq, 44100), 44100, SAMPLE_RATE)
    energy = float(np.mean(got[EDGE:-EDGE] ** 2))  # the input tone's energy is 0.5
    assert energy < 1e-7, f"{freq} Hz leaked through with energy {energy:.2e}"


def test_passband_tone_keeps_its_energy():
    got = resample(_tone(6000, 44100), 44100, SAMPLE_RATE)
    assert abs(np.mean(got[EDGE:-EDGE] ** 2) - 0.5) < 0.01


def test_coprime_rates():
    # 44101 and 16000 share no factor: 16000 phases, which must not blow up the kernel's size
    got = resample(_tone(1000, 44101), 44101, SAMPLE_RATE)
    assert len(got) == int(np.ceil(88202 * SAMPLE_RATE / 44101))
    expected = _tone(1000, SAMPLE_RATE, seconds=len(got) / SAMPLE_RATE)
    assert _rms(got[EDGE:-EDGE] - expected[EDGE:-EDGE]) < 1e-4


def test_resample_batch_and_identity():
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((2, 3, 4410)).astype(np.float32)
    got = resample(batch, 44100, SAMPLE_RATE)
    assert got.shape == (2, 3, 1600)
    np.testing.assert_allclose(got[1, 2], resample(batch[1, 2], 44100, SAMPLE_RATE), rtol=0, atol=1e-6)
    same = resample(batch, SAMPLE_RATE, SAMPLE_RATE)
    np.testing.assert_array_equal(same, batch)
    assert same is not batch


def test_resample_bad_rates():
    x = np.random.default_rng(1).standard_normal(1000)
    for orig_sr, new_sr in [(0, SAMPLE_RATE), (-8000, SAMPLE_RATE), (8000, float(SAMPLE_RATE)), (8000, None)]:
        with pytest.raises(ValueError, match="sr"):
            resample(x, orig_sr, new_sr)


def test_five_minutes_resample_quickly():
    x = np.random.default_rng(2).standard_normal(44100 * 300).astype(np.float32)
    resample(x[:44100], 44100, SAMPLE_RATE)  # build the filter once
    start = time.perf_counter()
    got = resample(x, 44100, SAMPLE_RATE)
    elapsed = time.perf_counter() - start
    assert len(got) == SAMPLE_RATE * 300
    assert elapsed < 3.0, f"5 minutes of 44.1 kHz audio took {elapsed:.2f} s to resample"


# ----------------------------------------------------------------------------- pad_or_trim

def test_pad_or_trim_numpy_and_torch():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 700)).astype(np.float32)
    for array in (x, torch.from_numpy(x)):
        as_numpy = np.asarray
        padded = pad_or_trim(array, 1000)
        assert tuple(padded.shape) == (2, 1000) and type(padded) is type(array)
        np.testing.assert_array_equal(as_numpy(padded[:, :700]), x)
        assert not as_numpy(padded[:, 700:]).any()
        np.testing.assert_array_equal(as_numpy(pad_or_trim(array, 500)), x[:, :500])
        np.testing.assert_array_equal(as_numpy(pad_or_trim(array, 700)), x)
        along_rows = pad_or_trim(array, 5, axis=0)
        assert tuple(along_rows.shape) == (5, 700)
        np.testing.assert_array_equal(as_numpy(along_rows[:2]), x)
        assert not as_numpy(along_rows[2:]).any()
        assert tuple(pad_or_trim(array, 1, axis=0).shape) == (1, 700)
    assert pad_or_trim(rng.standard_normal(10)).shape == (audio.N_SAMPLES,)
    with pytest.raises(ValueError, match="length"):
        pad_or_trim(x, -1)
