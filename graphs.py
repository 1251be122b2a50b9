"""The decoder's per-token step with fixed shapes, replayed as a CUDA graph on GPU.

At batch 1 a decoder step of a small Whisper is a few hundred tiny kernels, and the GPU spends more time
waiting for Python to launch them than running them. Capturing the step once as a CUDA graph and
replaying it per token removes that launch cost. A graph replays the same kernels on the same
addresses, so the step must have fixed shapes: it writes its keys/values at a position given as a
tensor and attends over the whole preallocated cache under a mask (TextDecoder.step), and its inputs
are copied into buffers the graph owns.

On CPU the same fixed-shape step runs eagerly (no graph): that is how the tests check it gives the
same logits and transcripts as the ordinary step.
"""
import weakref
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from model import KVCache, Whisper


class StaticDecoderStep:
    """A KV cache plus a fixed-shape step for `batch_size` rows, reused across decode calls."""

    def __init__(self, model: Whisper, batch_size: int, max_length: int):
        self.model = model
        self.cache: KVCache = model.new_cache(batch_size, max_length)
        self.tokens = torch.zeros((batch_size, 1), dtype=torch.long, device=model.device)
        self.position = torch.zeros(1, dtype=torch.long, device=model.device)
        self.graph = None
        self.graph_key = None  # the buffers the captured graph reads (see _buffers_key)
        self.logits = None

    def start(self, prompt: Tensor, audio_features: Tensor, audio_lengths: Optional[Tensor] = None) -> Tensor:
        """Run the prompt (B, T) the ordinary way, filling the cache: returns its logits (B, T, V)."""
        self.cache.reset()
        logits = self.model.logits(prompt, audio_features, self.cache, audio_lengths)
        if self.model.device.type == "cuda" and self.graph_key != self._buffers_key():
            self._capture()  # new audio buffers (another audio length, or a mask where there was none)
        return logits

    def _buffers_key(self):
        """What a captured graph depends on beyond its own buffers: the cache's cross-attention buffers
        and audio mask, which are reallocated when the audio length changes."""
        mask = self.cache.audio_mask
        return (self.cache.cross_keys.data_ptr(), self.cache.cross_values.data_ptr(), tuple(self.cache.cross_keys.shape),
                None if mask is None else (mask.data_ptr(), tuple(mask.shape)))

    def __call__(self, tokens: Tensor) -> Tensor:
        """The next token of every row (B, 1) -> logits (B, 1, V)."""
        self.tokens.copy_(tokens)
        self.position.fill_(self.cache.length)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.logits = self.model.decoder.step(self.tokens, self.position, self.cache)
        self.cache.length += 1
        return self.logits

    def _capture(self):
        # Warm up on a side stream (allocations and autotuning must not land in the graph), then capture.
        # The warm-up writes the cache at the current position, which the first real step overwrites.
        self.position.fill_(self.cache.length)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.model.decoder.step(self.tokens, self.position, self.cache)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.model.decoder.step(self.tokens, self.position, self.cache)
        self.graph_key = self._buffers_key()


# One step object per (model, batch size), kept while the model lives: capturing costs milliseconds.
_steps: "weakref.WeakKeyDictionary[Whisper, Dict[Tuple[int, int], StaticDecoderStep]]" = weakref.WeakKeyDictionary()


def static_step(model: Whisper, batch_size: int) -> StaticDecoderStep:
    """The model's fixed-shape step for this many rows, with a cache as long as its text context."""
    per_model = _steps.setdefault(model, {})
    key = (batch_size, model.dims.n_text_ctx)
    if key not in per_model:
        per_model[key] = StaticDecoderStep(model, batch_size, model.dims.n_text_ctx)
    return per_model[key]
