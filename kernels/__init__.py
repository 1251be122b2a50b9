"""Leaf math for the hot paths: each file holds the plain-PyTorch reference (the spec), the Triton
kernel, and the dispatch (Triton on CUDA tensors, PyTorch elsewhere).

Triton is optional (it ships wheels for Linux x86-64 only): without it every module here still imports,
the dispatch takes the PyTorch versions, and the *_triton functions raise RuntimeError when called.
TRITON_AVAILABLE says which case this is."""
from .kl_div import TRITON_AVAILABLE, kl_div, kl_div_chunked, kl_div_reference, kl_div_triton
from .log_mel import log_mel_spectrogram, log_mel_spectrogram_reference, log_mel_spectrogram_triton, mel_filters

__all__ = [
    "TRITON_AVAILABLE",
    "kl_div", "kl_div_chunked", "kl_div_reference", "kl_div_triton",
    "log_mel_spectrogram", "log_mel_spectrogram_reference", "log_mel_spectrogram_triton", "mel_filters",
]
