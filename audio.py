"""Audio files in, float32 16 kHz mono waveforms out.

- `load_audio`: decode with soundfile (libsndfile: FLAC, WAV, OGG, MP3, ...), down-mix to mono,
  resample to 16 kHz. Every failure names the file: FileNotFoundError when it is missing,
  AudioError (a ValueError) when it cannot be decoded, is empty or is cut short.
- `resample`: band-limited polyphase resampling with a Kaiser-windowed sinc, written here in torch
  (no scipy, no torchaudio, no ffmpeg).
- `change_speed`: the same audio faster or slower (speed perturbation, a training-data multiplier).
- `pad_or_trim`: fit a waveform (numpy or torch) to Whisper's 30-second window.

The log-Mel spectrogram itself is leaf math and lives in kernels/log_mel.py; this module knows
files, not models.
"""
import math
from functools import lru_cache
from pathlib import Path
from typing import List, Tuple

import numpy as np
import soundfile
import torch
import torch.nn.functional as F

from kernels.log_mel import HOP_LENGTH, N_FFT, SAMPLE_RATE  # noqa: F401  (re-exported)

CHUNK_LENGTH = 30  # seconds of audio the encoder sees at once
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30-second chunk
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 log-Mel frames in a chunk
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100: one frame every 10 ms

# Resampling filter. 16 zero crossings on each side and a Kaiser window with beta 8.6 (about 86 dB
# stopband, by Kaiser's formula beta = 0.1102 (A - 8.7)) keep the 1 kHz error near 1e-5 and push
# tones above 9 kHz below -85 dB when going 44.1 kHz -> 16 kHz. The cutoff sits at 95 % of the
# lower Nyquist so that the transition band ends close to it instead of aliasing past it.
ZERO_CROSSINGS = 16
ROLLOFF = 0.95
KAISER_BETA = 8.6


class AudioError(ValueError):
    """An audio file exists but cannot be turned into a waveform."""


# ----------------------------------------------------------------------------- loading

def load_audio(path, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Decode an audio file to a mono float32 waveform in [-1, 1] at `sr` Hz: (samples,)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"audio file not found: {path}")
    if not path.is_file():
        raise AudioError(f"not an audio file (a folder or special file): {path}")
    _check_rate(sr, "sr")
    frames, file_sr = _decode(path)  # (samples, channels)
    # the plain average of the channels, as ffmpeg's `-ac 1` down-mix does for stereo
    audio = frames.mean(axis=1, dtype=np.float32) if frames.shape[1] > 1 else frames[:, 0]
    return resample(audio, file_sr, sr) if file_sr != sr else audio


def _decode(path: Path) -> Tuple[np.ndarray, int]:
    """(samples, channels) float32 frames and the file's sample rate, or AudioError."""
    try:
        with soundfile.SoundFile(str(path)) as f:
            declared, file_sr = f.frames, f.samplerate
            frames = f.read(dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError) as e:  # libsndfile's errors (format, codec, I/O)
        raise AudioError(f"cannot decode audio file {path}: {e}") from e
    if frames.shape[0] == 0:
        raise AudioError(f"audio file holds no samples: {path}")
    # libsndfile stops quietly at a cut-off stream; the header still says how long it should be
    if frames.shape[0] < declared:
        raise AudioError(f"audio file is truncated: {path} declares {declared} frames but only "
                         f"{frames.shape[0]} could be decoded")
    return frames, file_sr


def _check_rate(rate, name: str) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise ValueError(f"{name} must be a positive integer sample rate in Hz, got {rate!r}")


# ----------------------------------------------------------------------------- resampling

def resample(audio: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Band-limited resampling of (..., samples) from orig_sr to new_sr Hz.

    Output sample j lies at time j / new_sr, so the first samples line up; the output has
    ceil(samples * new_sr / orig_sr) samples. float64 input stays float64, anything else is float32.
    """
    _check_rate(orig_sr, "orig_sr")
    _check_rate(new_sr, "new_sr")
    audio = np.asarray(audio)
    if audio.ndim == 0:
        raise ValueError("audio must have a time axis, got a scalar")
    dtype = np.float64 if audio.dtype == np.float64 else np.float32
    if orig_sr == new_sr:
        return audio.astype(dtype, copy=True)
    # work on the reduced ratio: 44100 -> 16000 is 441 input samples for every 160 output samples
    step = math.gcd(orig_sr, new_sr)
    up, down = new_sr // step, orig_sr // step
    x = torch.from_numpy(np.ascontiguousarray(audio, dtype=dtype)).reshape(-1, 1, audio.shape[-1])
    y = _polyphase_resample(x, up, down)  # (B, out_samples)
    return y.reshape(*audio.shape[:-1], -1).numpy()


def _polyphase_resample(x: torch.Tensor, up: int, down: int) -> torch.Tensor:
    """(B, 1, samples) -> (B, ceil(samples * up / down)), up and down coprime.

    Output j = m * up + p (block m, phase p) is a dot product of the filter row taps[p] with
    the inputs starting at m * down + first_tap[p] (in the padded signal). Phases are convolved a
    group at a time, with stride `down`, so each group's kernel holds only the taps it needs.
    """
    batch, samples = x.shape[0], x.shape[-1]
    taps, width = _sinc_table(up, down)  # (up, n_taps)
    n_taps = taps.shape[1]
    first_tap = [p * down // up for p in range(up)]  # floor(position of phase p), in input samples
    n_out = math.ceil(samples * up / down)
    n_blocks = math.ceil(n_out / up)
    # pad so tap 0 of output 0 is sample -(width - 1) and the last block still has all its inputs
    right = (n_blocks - 1) * down + first_tap[-1] + n_taps - (width - 1) - samples
    padded = F.pad(x, (width - 1, max(right, 0)))
    out = x.new_empty(batch, n_blocks, up)
    for p0, p1, kernel in _phase_group_kernels(up, down, x.dtype):
        y = F.conv1d(padded[..., first_tap[p0]:], kernel, stride=down)  # (B, p1 - p0, >= n_blocks)
        out[:, :, p0:p1] = y[..., :n_blocks].transpose(1, 2)
    return out.reshape(batch, -1)[:, :n_out]


@lru_cache(maxsize=16)
def _phase_group_kernels(up: int, down: int, dtype: torch.dtype) -> List[Tuple[int, int, torch.Tensor]]:
    """Conv kernels for groups of consecutive phases: [(p0, p1, kernel (p1 - p0, 1, k))]."""
    taps, _ = _sinc_table(up, down)
    n_taps = taps.shape[1]
    first_tap = torch.arange(up, dtype=torch.long) * down // up
    # a group's first taps spread over about one filter length, so at most half its kernel is zeros
    group = max(1, n_taps * up // down)
    groups = []
    for p0 in range(0, up, group):
        p1 = min(p0 + group, up)
        offset = first_tap[p0:p1] - first_tap[p0]  # (G,) where each phase's taps start in the kernel
        kernel = torch.zeros(p1 - p0, int(offset[-1]) + n_taps, dtype=torch.float64)
        columns = offset[:, None] + torch.arange(n_taps)  # (G, n_taps)
        kernel.scatter_(1, columns, taps[p0:p1])
        groups.append((p0, p1, kernel.to(dtype)[:, None, :]))
    return groups


@lru_cache(maxsize=16)
def _sinc_table(up: int, down: int) -> Tuple[torch.Tensor, int]:
    """Kaiser-windowed sinc taps, float64 (up, 2 * width), one row per output phase; and width."""
    # low-pass at ROLLOFF x the lower Nyquist: the sinc's zero crossings are this many inputs apart
    crossing = down / (min(up, down) * ROLLOFF)
    width = math.ceil(ZERO_CROSSINGS * crossing)  # input samples on each side of an output
    offsets = torch.arange(-width + 1, width + 1, dtype=torch.float64)  # (n_taps,) from floor(position)
    fraction = (torch.arange(up, dtype=torch.float64) * down % up) / up  # (up,) position - floor(position)
    t = (offsets[None, :] - fraction[:, None]) / crossing  # (up, n_taps) in zero crossings
    inside = (1.0 - (t / ZERO_CROSSINGS) ** 2).clamp(min=0.0)
    window = torch.i0(KAISER_BETA * inside.sqrt()) / torch.i0(torch.tensor(KAISER_BETA, dtype=torch.float64))
    window = torch.where(t.abs() < ZERO_CROSSINGS, window, torch.zeros_like(window))
    # dividing by `crossing` gives unit gain at DC: the sinc's area is `crossing` input samples
    return torch.sinc(t) * window / crossing, width


def change_speed(audio: np.ndarray, speed: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """The waveform played `speed` times as fast: duration / speed, every frequency x speed (tempo and pitch
    together, like a tape run faster), by resampling (Ko et al. 2015's speed perturbation for ASR training).

    Read as if sampled at sr * speed and resampled to sr: at 0.9 the result is 1/0.9 as long and a little
    lower. speed * sr must be a whole number of Hz (0.9 and 1.1 at 16 kHz: 14400 and 17600)."""
    if not 0.5 <= speed <= 2.0:
        raise ValueError(f"speed must be within [0.5, 2] (a factor on tempo and pitch), got {speed}")
    played_as = round(sr * speed)
    if abs(played_as - sr * speed) > 1e-6 * sr:
        raise ValueError(f"speed {speed} x {sr} Hz is not a whole number of Hz")
    return resample(audio, played_as, sr) if played_as != sr else np.asarray(audio, dtype=np.float32).copy()


# ----------------------------------------------------------------------------- fitting to a window

def pad_or_trim(array, length: int = N_SAMPLES, axis: int = -1):
    """Zero-pad at the end or cut `array` (numpy or torch) along `axis` to exactly `length`."""
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
        raise ValueError(f"length must be a non-negative integer, got {length!r}")
    if torch.is_tensor(array):
        axis = axis % array.dim()
        current = array.shape[axis]
        if current > length:
            return array.narrow(axis, 0, length)
        pad = [0, 0] * array.dim()  # F.pad lists (left, right) pairs from the last axis backwards
        pad[2 * (array.dim() - 1 - axis) + 1] = length - current
        return F.pad(array, pad) if current < length else array
    array = np.asarray(array)
    current = array.shape[axis]
    if current > length:
        return np.take(array, np.arange(length), axis=axis)
    if current < length:
        widths = [(0, 0)] * array.ndim
        widths[axis] = (0, length - current)
        return np.pad(array, widths)
    return array


def loudest_frame_db(audio: np.ndarray, frame_seconds: float = 0.1) -> float:
    """Level of the loudest 100 ms frame, in dB relative to full scale (-inf for digital silence).

    Used to skip windows with no signal at all: Whisper hallucinates text ("you", "Thank you.")
    on silence with high confidence, so its own no-speech rule does not catch them.
    """
    frame = int(frame_seconds * SAMPLE_RATE)
    audio = np.asarray(audio, dtype=np.float64)
    if audio.size == 0:
        return -math.inf
    padded = np.pad(audio, (0, -audio.size % frame)).reshape(-1, frame)
    loudest = np.sqrt((padded**2).mean(axis=1)).max()
    return 20 * math.log10(loudest) if loudest > 0 else -math.inf
