"""Leaf math for the hot paths: each file holds the plain-PyTorch reference (the spec), the Triton
kernel, and the dispatch (Triton on CUDA tensors, the reference elsewhere)."""
from .kl_div import kl_div, kl_div_reference, kl_div_triton
from .log_mel import log_mel_spectrogram, log_mel_spectrogram_reference, log_mel_spectrogram_triton, mel_filters

__all__ = [
    "kl_div", "kl_div_reference", "kl_div_triton",
    "log_mel_spectrogram", "log_mel_spectrogram_reference", "log_mel_spectrogram_triton", "mel_filters",
]
