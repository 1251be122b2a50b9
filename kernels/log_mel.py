"""Log-Mel spectrogram: the Whisper audio front end, waveform in, normalised log-Mel frames out.

    audio (B, samples) --STFT--> |.|^2 (B, 201, frames) --Mel filters--> (B, n_mels, frames)
        --> log10, clamp to (row max - 8), (x + 4) / 4

Versions in this file:
- `log_mel_spectrogram_reference`: plain PyTorch, the spec. It follows openai-whisper's
  `whisper.audio.log_mel_spectrogram` step for step, with two deliberate differences that make
  batches behave like single utterances:
    1. `lengths`: samples at index >= lengths[b] are treated as zero, so a padded batch buffer may
       hold anything (even NaN) past each utterance's end.
    2. the dynamic-range clamp uses each utterance's own maximum; openai-whisper takes one maximum
       over the whole batch, so there a loud utterance changes its quiet neighbours.
  It runs in the input's dtype, so float64 input gives a high-precision answer to compare kernels to.
- `log_mel_spectrogram`: the public entry point (accepts numpy too); it calls the reference.

The Mel filterbank is computed here (Slaney scale and area normalisation, as librosa's default),
not loaded from a file, and matches openai-whisper's `assets/mel_filters.npz` to 1e-6.
This module imports nothing from the repository: it is leaf math.
"""
import math
from functools import lru_cache

import numpy as np
import torch

SAMPLE_RATE = 16000  # Hz: every Whisper model hears 16 kHz audio
N_FFT = 400  # 25 ms analysis window
HOP_LENGTH = 160  # 10 ms between frames: 100 frames per second
N_FREQS = N_FFT // 2 + 1  # 201 one-sided STFT bins
SUPPORTED_N_MELS = (80, 128)  # 80 for every model up to large-v2, 128 for large-v3

LOG_FLOOR = 1e-10  # power floor before log10, so silence gives -10 instead of -inf
DYNAMIC_RANGE = 8.0  # keep 8 decades (80 dB) below each utterance's loudest bin


# ----------------------------------------------------------------------------- Mel filterbank

# Slaney's Mel scale: linear below 1 kHz (3 Mel per 200 Hz), logarithmic above (27 steps per factor 6.4)
_HZ_PER_MEL = 200.0 / 3.0
_LOG_START_HZ = 1000.0
_LOG_START_MEL = _LOG_START_HZ / _HZ_PER_MEL  # 15
_LOG_STEP = math.log(6.4) / 27.0


def _hz_to_mel(hz) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    log_part = _LOG_START_MEL + np.log(np.maximum(hz, _LOG_START_HZ) / _LOG_START_HZ) / _LOG_STEP
    return np.where(hz >= _LOG_START_HZ, log_part, hz / _HZ_PER_MEL)


def _mel_to_hz(mel) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    log_part = _LOG_START_HZ * np.exp(_LOG_STEP * (mel - _LOG_START_MEL))
    return np.where(mel >= _LOG_START_MEL, log_part, mel * _HZ_PER_MEL)


def _slaney_mel_filterbank(n_mels: int) -> np.ndarray:
    """librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels) in float64: (n_mels, 201)."""
    fft_freqs = np.linspace(0.0, SAMPLE_RATE / 2, N_FREQS)  # (201,) Hz of each STFT bin
    # n_mels triangles need n_mels + 2 edges, equally spaced in Mel from 0 Hz to Nyquist
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), n_mels + 2))
    widths = np.diff(edges)  # (n_mels + 1,)
    offsets = edges[:, None] - fft_freqs[None, :]  # (n_mels + 2, 201)
    rising = -offsets[:-2] / widths[:-1, None]  # left slope of triangle i: 0 at edge i, 1 at edge i+1
    falling = offsets[2:] / widths[1:, None]  # right slope: 1 at edge i+1, 0 at edge i+2
    triangles = np.maximum(0.0, np.minimum(rising, falling))  # (n_mels, 201)
    # Slaney normalisation: each triangle has unit area in Hz, so wide high bands are not louder
    return triangles * (2.0 / (edges[2:] - edges[:-2]))[:, None]


@lru_cache(maxsize=None)
def mel_filters(n_mels: int, device=None) -> torch.Tensor:
    """Mel filterbank, float32 (n_mels, 201), cached per (n_mels, device). Treat it as read-only."""
    if n_mels not in SUPPORTED_N_MELS:
        raise ValueError(f"n_mels must be one of {SUPPORTED_N_MELS}, got {n_mels!r}")
    return torch.from_numpy(_slaney_mel_filterbank(n_mels)).to(device=device, dtype=torch.float32)


# ----------------------------------------------------------------------------- reference

def _check_inputs(audio: torch.Tensor, n_mels: int, lengths) -> torch.Tensor:
    """Validate and return lengths as a LongTensor (B,) on audio's device."""
    if n_mels not in SUPPORTED_N_MELS:
        raise ValueError(f"n_mels must be one of {SUPPORTED_N_MELS}, got {n_mels!r}")
    if audio.dim() != 2:
        raise ValueError(f"audio must be (samples,) or (batch, samples), got shape {tuple(audio.shape)}")
    if not audio.is_floating_point():
        raise ValueError(f"audio must be a floating-point waveform in [-1, 1], got dtype {audio.dtype}")
    batch, samples = audio.shape
    # torch.stft's reflect padding needs more than n_fft // 2 samples to reflect
    if samples <= N_FFT // 2:
        raise ValueError(f"audio too short: {samples} samples, need more than {N_FFT // 2}")
    if lengths is None:
        return torch.full((batch,), samples, dtype=torch.long, device=audio.device)
    lengths = torch.as_tensor(lengths, device=audio.device).reshape(-1)
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must hold integers, got dtype {lengths.dtype}")
    if lengths.numel() != batch:
        raise ValueError(f"lengths has {lengths.numel()} entries for a batch of {batch}")
    if bool((lengths < 0).any()) or bool((lengths > samples).any()):
        raise ValueError(f"lengths must lie in [0, {samples}], got {lengths.tolist()}")
    return lengths.long()


def log_mel_spectrogram_reference(audio: torch.Tensor, n_mels: int = 80, lengths=None) -> torch.Tensor:
    """(B, samples) -> (B, n_mels, samples // 160), or (samples,) -> (n_mels, samples // 160)."""
    single = audio.dim() == 1
    audio = audio[None] if single else audio
    lengths = _check_inputs(audio, n_mels, lengths)
    if audio.dtype not in (torch.float32, torch.float64):
        audio = audio.float()  # torch.stft has no half-precision CPU path; compute those in float32
    samples = audio.shape[1]

    # zero everything past each utterance's end; `where`, not a multiply, so NaN garbage cannot leak
    valid = torch.arange(samples, device=audio.device)[None, :] < lengths[:, None]  # (B, samples)
    audio = torch.where(valid, audio, torch.zeros((), dtype=audio.dtype, device=audio.device))

    window = torch.hann_window(N_FFT, dtype=audio.dtype, device=audio.device)  # periodic Hann
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect",
                      return_complex=True)  # (B, 201, samples // 160 + 1)
    power = stft[..., :-1].abs() ** 2  # (B, 201, frames): the last frame is dropped, as Whisper does

    filters = mel_filters(n_mels, audio.device).to(audio.dtype)  # (n_mels, 201)
    mel = filters @ power  # (B, n_mels, frames)

    log_mel = torch.clamp(mel, min=LOG_FLOOR).log10()
    row_max = log_mel.amax(dim=(-2, -1), keepdim=True)  # (B, 1, 1): per utterance, not per batch
    log_mel = torch.maximum(log_mel, row_max - DYNAMIC_RANGE)
    log_mel = (log_mel + 4.0) / 4.0  # roughly into [-1, 1]
    return log_mel[0] if single else log_mel


# ----------------------------------------------------------------------------- dispatch

def log_mel_spectrogram(audio, n_mels: int = 80, lengths=None) -> torch.Tensor:
    """Whisper's normalised log-Mel spectrogram of 16 kHz audio (numpy array or tensor).

    audio: (samples,) or (B, samples); lengths: optional (B,) valid samples per row.
    Returns (n_mels, samples // 160) or (B, n_mels, samples // 160).
    """
    if isinstance(audio, np.ndarray):
        audio = torch.from_numpy(audio)
    if not torch.is_tensor(audio):
        raise ValueError(f"audio must be a numpy array or torch tensor, got {type(audio).__name__}")
    return log_mel_spectrogram_reference(audio, n_mels, lengths)
