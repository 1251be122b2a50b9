"""Log-Mel spectrogram: the Whisper audio front end, waveform in, normalised log-Mel frames out.

    audio (B, samples) --STFT--> |.|^2 (B, 201, frames) --Mel filters--> (B, n_mels, frames)
        --> log10, clamp to (row max - 8), (x + 4) / 4

Versions in this file (llm.c dev/cuda style: the reference is the spec, the kernel is checked against it):
- `log_mel_spectrogram_reference`: plain PyTorch, the spec. It follows openai-whisper's
  `whisper.audio.log_mel_spectrogram` step for step, with two deliberate differences that make
  batches behave like single utterances:
    1. `lengths`: samples at index >= lengths[b] are treated as zero, so a padded batch buffer may
       hold anything (even NaN) past each utterance's end.
    2. the dynamic-range clamp uses each utterance's own maximum; openai-whisper takes one maximum
       over the whole batch, so there a loud utterance changes its quiet neighbours.
  It runs in the input's dtype, so float64 input gives a high-precision answer to compare kernels to.
- `log_mel_spectrogram_triton`: two launches, float32 out, no (B, 201, frames) spectrogram in memory.
    1. one program per (tile of BLOCK_T frames, utterance): gathers its frames straight from the
       waveform (reflect padding and the `lengths` mask are index arithmetic), computes the DFT as
       `tl.dot` of the frames against cos/sin bases with the Hann window folded in, squares, projects
       onto the Mel filters with a second `tl.dot`, takes log10 and writes the tile and its maximum.
    2. one program per block of an utterance's output: max over its tiles' maxima, then the clamp
       and (x + 4) / 4, in place.
  The frame is folded about its centre before the DFT: window and cosines are even about the centre,
  sines odd, so re = sum (x[c - d] + x[c + d]) * cos-basis and im = sum (x[c - d] - x[c + d]) * sin-basis
  over d = 0..199 instead of 400 samples, half the multiply-adds. The DFT runs on tensor cores as tf32x3
  (three tf32 passes, about fp32 accuracy): plain tf32 loses too much in quiet bins.
- `log_mel_spectrogram`: the public entry point (accepts numpy too): the Triton kernel for CUDA
  tensors when Triton is installed, the reference otherwise (and for float64 input, which asks for
  the precise answer).

Run:
    python kernels/log_mel.py                    # checks Triton against the float64 reference (on CPU
                                                 # through Triton's interpreter, switched on below)
    python bench.py kernels [--sweep-tiles]      # the timing, and Triton under each of TILE_CANDIDATES

The Mel filterbank is computed here (Slaney scale and area normalisation, as librosa's default),
not loaded from a file, and matches openai-whisper's `assets/mel_filters.npz` to 1e-6.
This module imports nothing from the repository: it is leaf math.
"""
import math
import os
from functools import lru_cache

import numpy as np
import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships wheels for Linux x86-64 only: elsewhere the reference serves
    triton = None
TRITON_AVAILABLE = triton is not None

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


# ----------------------------------------------------------------------------- Triton kernel
#
# Frame t is centred on sample c = 160 t and covers c - 200 .. c + 199 (torch.stft, center=True).
# Writing each sample as x[c - d], d = -199..200, the DFT of the windowed frame is
#     X_f = (-1)^f sum_d w[200 - d] x[c - d] (cos + i sin)(2 pi f d / 400)
# The Hann window and the cosine are even in d, the sine odd, and w[0] = 0 drops d = 200, so
#     re_f = (-1)^f sum_{d=0}^{199} w[200 - d] cos(2 pi f d / 400) * (x[c - d] + x[c + d])   (d = 0 halved)
#     im_f = (-1)^f sum_{d=1}^{199} w[200 - d] sin(2 pi f d / 400) * (x[c - d] - x[c + d])
# i.e. two (201, 200) @ (200, frames) products instead of two with 400-long sums.
#
# The kernel works transposed, (freq, frame) rather than (frame, freq): the bases and the Mel filters are
# then the left operands, which go from memory to shared memory as they are, and the output tile comes
# out as (mel, frame), contiguous along frames as `out` is.

HALF_WINDOW = N_FFT // 2  # 200 offsets d from a frame's centre
DFT_ROWS = 256  # the bases' 200 offsets zero-padded, so any power-of-two K_CHUNK can step through them
FREQS_PAD = 256  # the 201 bins zero-padded to a power of two, as tl.dot needs
N_MELS_PAD = 128  # 80 Mel bins get 48 zero filters; 128 needs none
MAX_ABS_ERROR = 2e-3  # the kernel's contract against the float64 reference (tf32 tensor cores on GPU)

# Tile sizes for an H100 (sm_90), where registers are the limit. Compiled for sm_90a with Triton 3.6 and
# 3.9 (ptxas -v), these use ~250 registers a thread and spill none; BLOCK_T = 128 spills, and so does
# K_CHUNK = 32 under 3.6. K_CHUNK = 16 pads the 200 offsets to 208. F_CHUNK = 128 gathers each frame
# twice, once per half of the spectrum (from L1/L2); F_CHUNK = 256 does not, but needs 192 KB of shared
# memory. Untimed so far: `python bench.py kernels --sweep-tiles` times each of TILE_CANDIDATES.
DEFAULT_TILES = {"BLOCK_T": 64, "F_CHUNK": 128, "K_CHUNK": 16, "num_warps": 8, "num_stages": 2}
# overrides of DEFAULT_TILES that also compile without spills for sm_90a (Triton 3.6 and 3.9)
TILE_CANDIDATES = ({}, {"F_CHUNK": 256}, {"num_stages": 3}, {"BLOCK_T": 32},
                   {"BLOCK_T": 32, "F_CHUNK": 256, "K_CHUNK": 32})
NORMALISE_BLOCK = 1024  # output elements per program of the second launch
TILES_BLOCK = 128  # tile maxima read per step when the second launch reduces an utterance's maximum


@lru_cache(maxsize=None)
def _dft_bases(device) -> tuple:
    """Folded DFT bases, float32 (FREQS_PAD, DFT_ROWS) each: row f, column d as in the derivation above."""
    f = torch.arange(N_FREQS, dtype=torch.float64)[:, None]  # (201, 1)
    d = torch.arange(HALF_WINDOW)[None, :]  # (1, 200)
    window = torch.hann_window(N_FFT, dtype=torch.float64)[HALF_WINDOW - d]  # (1, 200): periodic Hann
    sign = 1.0 - 2.0 * (f % 2)  # (-1)^f: keeps re and im the true DFT's (the power would not notice)
    angle = 2.0 * math.pi * f * d / N_FFT  # (201, 200)
    cos_basis = window * sign * torch.cos(angle)
    cos_basis[:, 0] *= 0.5  # the centre sample enters the fold twice (x[c - 0] + x[c + 0])
    sin_basis = window * sign * torch.sin(angle)
    padded = torch.zeros(2, FREQS_PAD, DFT_ROWS, dtype=torch.float64)
    padded[0, :N_FREQS, :HALF_WINDOW] = cos_basis
    padded[1, :N_FREQS, :HALF_WINDOW] = sin_basis
    padded = padded.to(device=device, dtype=torch.float32)
    return padded[0], padded[1]


@lru_cache(maxsize=None)
def _padded_mel_filters(n_mels: int, device) -> torch.Tensor:
    """The Mel filters zero-padded to float32 (N_MELS_PAD, FREQS_PAD)."""
    padded = torch.zeros(N_MELS_PAD, FREQS_PAD, dtype=torch.float32)
    padded[:n_mels, :N_FREQS] = mel_filters(n_mels)
    return padded.to(device)


if TRITON_AVAILABLE:  # the kernels exist only where Triton is installed
    # module constants the kernels read as compile-time values
    _HOP = tl.constexpr(HOP_LENGTH)
    _HALF_WINDOW = tl.constexpr(HALF_WINDOW)
    _DFT_ROWS = tl.constexpr(DFT_ROWS)
    _FREQS_PAD = tl.constexpr(FREQS_PAD)
    _LOG_FLOOR = tl.constexpr(LOG_FLOOR)
    _LOG10_2 = tl.constexpr(math.log10(2.0))
    _DYNAMIC_RANGE = tl.constexpr(DYNAMIC_RANGE)

    @triton.jit
    def _reflected_samples(row_audio_ptr, index, samples, length, valid):
        """x[index] of the zero-masked row under torch.stft's reflect padding, as float32; 0 where not valid."""
        index = tl.abs(index)  # before the start: x[-i] = x[i]
        index = tl.where(index >= samples, 2 * (samples - 1) - index, index)  # past the end: x[n-1+i] = x[n-1-i]
        # the reflection is of the whole buffer, so past `length` it reflects zeros, exactly as the reference
        return tl.load(row_audio_ptr + index, mask=valid & (index < length), other=0.0).to(tl.float32)

    @triton.jit
    def _log_mel_tile_kernel(
        audio_ptr, audio_row_stride,   # (B, samples), any float dtype, unit column stride
        lengths_ptr,                   # (B,) int64: valid samples of each row
        cos_basis_ptr, sin_basis_ptr,  # (FREQS_PAD, DFT_ROWS) float32: the folded bases of _dft_bases
        filters_ptr,                   # (N_MELS_PAD, FREQS_PAD) float32: the Mel filters, zero-padded
        out_ptr,                       # (B, N_MELS, frames) float32: receives log10 of the Mel power
        tile_max_ptr,                  # (B, n_tiles) float32: receives each tile's maximum
        samples, frames, n_tiles,
        N_MELS: tl.constexpr, N_MELS_PAD: tl.constexpr,
        BLOCK_T: tl.constexpr, F_CHUNK: tl.constexpr, K_CHUNK: tl.constexpr,
    ):
        tile = tl.program_id(0)
        row = tl.program_id(1)
        row_audio_ptr = audio_ptr + row.to(tl.int64) * audio_row_stride  # int64: B * samples may pass 2^31
        length = tl.load(lengths_ptr + row).to(tl.int32)

        t = tile * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,) frame indices
        in_frames = t < frames
        centre = t * _HOP  # (BLOCK_T,)
        mels = tl.arange(0, N_MELS_PAD)

        mel = tl.zeros((N_MELS_PAD, BLOCK_T), dtype=tl.float32)
        for f0 in range(0, _FREQS_PAD, F_CHUNK):
            freqs = f0 + tl.arange(0, F_CHUNK)
            re = tl.zeros((F_CHUNK, BLOCK_T), dtype=tl.float32)
            im = tl.zeros((F_CHUNK, BLOCK_T), dtype=tl.float32)
            for d0 in range(0, _HALF_WINDOW, K_CHUNK):
                d = d0 + tl.arange(0, K_CHUNK)  # (K_CHUNK,) offsets from the frame centre
                valid = (d < _HALF_WINDOW)[:, None] & in_frames[None, :]  # (K_CHUNK, BLOCK_T)
                before = _reflected_samples(row_audio_ptr, centre[None, :] - d[:, None], samples, length, valid)
                after = _reflected_samples(row_audio_ptr, centre[None, :] + d[:, None], samples, length, valid)
                basis_offsets = freqs[:, None] * _DFT_ROWS + d[None, :]  # (F_CHUNK, K_CHUNK)
                # tf32x3, not tf32: quiet bins are small differences of large terms. Simulating tensor-core
                # rounding on CPU, plain tf32 (10-bit mantissa) put speech 0.03 off the float64 reference;
                # tf32x3 (three passes) with a plain-tf32 Mel projection put it 2e-4 off, mostly the latter's
                re = tl.dot(tl.load(cos_basis_ptr + basis_offsets), before + after, re, input_precision="tf32x3")
                im = tl.dot(tl.load(sin_basis_ptr + basis_offsets), before - after, im, input_precision="tf32x3")
            power = re * re + im * im  # (F_CHUNK, BLOCK_T)
            filters = tl.load(filters_ptr + mels[:, None] * _FREQS_PAD + freqs[None, :])  # (N_MELS_PAD, F_CHUNK)
            # plain tf32 is enough here: every term is positive, so nothing cancels
            mel = tl.dot(filters, power, mel, input_precision="tf32")  # (N_MELS_PAD, BLOCK_T)

        log_mel = tl.log2(tl.maximum(mel, _LOG_FLOOR)) * _LOG10_2  # log10
        keep = (mels < N_MELS)[:, None] & in_frames[None, :]  # (N_MELS_PAD, BLOCK_T)
        out_offsets = row.to(tl.int64) * N_MELS * frames + mels[:, None] * frames + t[None, :]  # out[row, mel, t]
        tl.store(out_ptr + out_offsets, log_mel, mask=keep)
        tile_max = tl.max(tl.max(tl.where(keep, log_mel, float("-inf")), axis=1), axis=0)
        tl.store(tile_max_ptr + row * n_tiles + tile, tile_max)

    @triton.jit
    def _normalise_kernel(out_ptr, tile_max_ptr, row_numel, n_tiles, BLOCK: tl.constexpr, TILES: tl.constexpr):
        """In place on one block of row `row` of out (B, row_numel): clamp to (row max - 8), then (x + 4) / 4."""
        block = tl.program_id(0)
        row = tl.program_id(1)
        row_max = float("-inf")
        for start in range(0, n_tiles, TILES):  # the utterance's maximum, from its tiles' maxima
            tiles = start + tl.arange(0, TILES)
            maxima = tl.load(tile_max_ptr + row * n_tiles + tiles, mask=tiles < n_tiles, other=float("-inf"))
            row_max = tl.maximum(row_max, tl.max(maxima, axis=0))

        offsets = block * BLOCK + tl.arange(0, BLOCK)
        in_row = offsets < row_numel
        ptrs = out_ptr + row.to(tl.int64) * row_numel + offsets
        log_mel = tl.maximum(tl.load(ptrs, mask=in_row), row_max - _DYNAMIC_RANGE)
        tl.store(ptrs, (log_mel + 4.0) / 4.0, mask=in_row)


def log_mel_spectrogram_triton(audio: torch.Tensor, n_mels: int = 80, lengths=None, out=None,
                               tiles=None) -> torch.Tensor:
    """The reference's result in float32 from two Triton launches; (B, samples) -> (B, n_mels, samples // 160).

    out: optional float32 contiguous tensor of the result's shape, on audio's device, that receives it
    (every element is written). tiles: overrides of DEFAULT_TILES (tests, tuning).
    Runs on CPU tensors only under TRITON_INTERPRET=1."""
    if not TRITON_AVAILABLE:
        raise RuntimeError("log_mel_spectrogram_triton needs Triton: pip install triton (Linux x86-64 wheels "
                           "only); log_mel_spectrogram falls back to the reference without it")
    single = audio.dim() == 1
    audio = audio[None] if single else audio
    lengths = _check_inputs(audio, n_mels, lengths)
    if audio.stride(1) != 1:
        audio = audio.contiguous()
    batch, samples = audio.shape
    frames = samples // HOP_LENGTH
    shape = (n_mels, frames) if single else (batch, n_mels, frames)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=audio.device)
    elif (tuple(out.shape) != shape or out.dtype != torch.float32 or out.device != audio.device
          or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous float32 tensor of shape {shape} on {audio.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if batch == 0:
        return out

    tiles = {**DEFAULT_TILES, **(tiles or {})}
    for name in ("BLOCK_T", "F_CHUNK", "K_CHUNK"):  # tl.dot wants powers of two of at least 16
        if not 16 <= tiles[name] <= FREQS_PAD or tiles[name] & (tiles[name] - 1):
            raise ValueError(f"{name} must be a power of two in [16, {FREQS_PAD}], got {tiles[name]}")
    n_tiles = triton.cdiv(frames, tiles["BLOCK_T"])
    tile_max = torch.empty(batch, n_tiles, dtype=torch.float32, device=audio.device)
    cos_basis, sin_basis = _dft_bases(audio.device)
    _log_mel_tile_kernel[(n_tiles, batch)](
        audio, audio.stride(0), lengths, cos_basis, sin_basis, _padded_mel_filters(n_mels, audio.device),
        out, tile_max, samples, frames, n_tiles,
        N_MELS=n_mels, N_MELS_PAD=N_MELS_PAD,
        BLOCK_T=tiles["BLOCK_T"], F_CHUNK=tiles["F_CHUNK"], K_CHUNK=tiles["K_CHUNK"],
        num_warps=tiles["num_warps"], num_stages=tiles["num_stages"],
    )
    row_numel = n_mels * frames
    _normalise_kernel[(triton.cdiv(row_numel, NORMALISE_BLOCK), batch)](
        out, tile_max, row_numel, n_tiles, BLOCK=NORMALISE_BLOCK, TILES=TILES_BLOCK, num_warps=4,
    )
    return out


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
    # float64 asks for the precise answer, which the float32 kernel does not give: the reference computes it
    if audio.is_cuda and audio.dtype != torch.float64 and TRITON_AVAILABLE:
        return log_mel_spectrogram_triton(audio, n_mels, lengths)
    return log_mel_spectrogram_reference(audio, n_mels, lengths)


# ----------------------------------------------------------------------------- check (timing: python bench.py kernels)

def _check(device, batch, samples, n_mels, ragged):
    """Triton on `device` against the float64 reference, on seeded noise; ragged rows hold NaN past their end."""
    gen = torch.Generator().manual_seed(samples + batch)
    audio = 0.1 * torch.randn(batch, samples, generator=gen, dtype=torch.float64)
    lengths = None
    if ragged:
        lengths = torch.randint(HALF_WINDOW + 1, samples + 1, (batch,), generator=gen)
        lengths[0] = samples  # one full row: its end reflects real samples, the others reflect zeros
        past_end = torch.arange(samples)[None, :] >= lengths[:, None]
        audio = audio.masked_fill(past_end, float("nan"))
    expected = log_mel_spectrogram_reference(audio, n_mels, lengths)
    got = log_mel_spectrogram_triton(audio.float().to(device), n_mels, lengths)
    error = (got.cpu().double() - expected).abs().max().item()
    ok = error <= MAX_ABS_ERROR
    print(f"B={batch:2d} samples={samples:6d} n_mels={n_mels:3d} ragged={ragged!s:5s}  "
          f"max |triton - float64 reference| {error:.1e}  {'OK' if ok else 'FAIL'}")
    return ok


if __name__ == "__main__":
    if not TRITON_AVAILABLE:
        print("Triton is not installed: the reference is the only version, there is nothing to check against it")
        raise SystemExit(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = [(1, SAMPLE_RATE, 80, False), (3, 20001, 128, True), (2, 12345, 80, True), (1, 401, 128, False)]
    if device == "cuda":
        cases += [(16, 30 * SAMPLE_RATE, 80, True), (4, 30 * SAMPLE_RATE, 128, False)]
    all_ok = all([_check(device, *case) for case in cases])
    print("all checks passed" if all_ok else "SOME CHECKS FAILED")
    if not all_ok:
        raise SystemExit(1)
    if device == "cuda":
        print("timing: python bench.py kernels [--sweep-tiles]")
