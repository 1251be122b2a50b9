"""Whisper: a Transformer encoder over log-Mel frames and a Transformer decoder over text tokens.

Same architecture and parameter names as openai/whisper's model.py, so its checkpoints load as they are,
with two modernisations: attention goes through F.scaled_dot_product_attention, and the decoder's
keys/values live in an explicit, preallocated `KVCache` instead of forward hooks.

    mel (B, n_mels, 2 S) -> AudioEncoder -> audio features (B, S, D)
    tokens (B, T) + audio features -> TextDecoder -> logits (B, T, n_vocab)

S is 1500 positions (30 s) for every official model. The encoder also takes fewer (any even number of
frames up to 3000, the first S positions of its embedding), and a batch of rows of different lengths
carries `audio_lengths` (B,): each row's positions holding its audio. Positions past a row's length are
masked in the encoder's self-attention and the decoder's cross-attention, and its Mel frames there are
zeroed, so each row's result is what it would be alone. `AudioContext` says which a model was made for.
"""
import functools
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ModelDimensions:
    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int


@dataclass(frozen=True)
class AudioContext:
    """How much audio a model's encoder is given. "fixed": every input padded to 30 s, as every official
    Whisper (run on less, they loop and repeat). "dynamic": the real length of the audio plus `margin`
    positions (20 ms each) of the silence after it, which students trained for it use to see the end."""
    mode: str = "fixed"
    margin: int = 0

    def __post_init__(self):
        if self.mode not in ("fixed", "dynamic") or self.margin < 0:
            raise ValueError(f"audio context must be fixed or dynamic with a margin >= 0, got {self}")

    def positions(self, content_frames: int, n_ctx: int) -> int:
        """Encoder positions for audio of `content_frames` Mel frames (10 ms each): n_ctx when fixed; else
        the audio's own (two frames per position, at least one) plus the margin, at most n_ctx."""
        if self.mode == "fixed":
            return n_ctx
        return min(max(1, -(-content_frames // 2)) + self.margin, n_ctx)


FIXED_CONTEXT = AudioContext()


def padding_mask(lengths: Optional[Tensor], size: int) -> Optional[Tensor]:
    """(B, size) bool, True where a row holds audio; None when no row is padded (the unmasked kernels then
    run, bit for bit the same as without lengths)."""
    if lengths is None or bool((lengths >= size).all()):
        return None
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def _dims(n_mels, width, heads, layers, n_vocab, decoder_layers=None) -> ModelDimensions:
    return ModelDimensions(n_mels, 1500, width, heads, layers, n_vocab, 448, width, heads, decoder_layers or layers)


# The published models. English-only vocabularies have 51864 tokens, multilingual 51865 (51866 for v3).
MODEL_DIMS: Dict[str, ModelDimensions] = {
    "tiny.en": _dims(80, 384, 6, 4, 51864),
    "tiny": _dims(80, 384, 6, 4, 51865),
    "base.en": _dims(80, 512, 8, 6, 51864),
    "base": _dims(80, 512, 8, 6, 51865),
    "small.en": _dims(80, 768, 12, 12, 51864),
    "small": _dims(80, 768, 12, 12, 51865),
    "medium.en": _dims(80, 1024, 16, 24, 51864),
    "medium": _dims(80, 1024, 16, 24, 51865),
    "large-v1": _dims(80, 1280, 20, 32, 51865),
    "large-v2": _dims(80, 1280, 20, 32, 51865),
    "large-v3": _dims(128, 1280, 20, 32, 51866),
    "large-v3-turbo": _dims(128, 1280, 20, 32, 51866, decoder_layers=4),
}


# Layers that compute in the input's dtype while their parameters may be kept in float32,
# and LayerNorm that always normalises in float32 (as openai/whisper does, for fp16 stability).
class LayerNorm(nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        # The parameters are cast too: CPU layer_norm refuses float32 input with half-precision weights.
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type(x.dtype)


class Linear(nn.Linear):
    inference_weight = None  # set by Whisper.optimize_for_decoding (or quantize.int8_for_decoding)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return linear(x, self.weight, bias, self.inference_weight)


def onednn_linear_available() -> bool:
    try:
        return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    except (AttributeError, RuntimeError):  # an operator namespace this build does not have
        return False


@functools.lru_cache(maxsize=None)
def onednn_takes(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN reorders (and so multiplies) weights of `dtype`, found out once by trying.

    float32 works everywhere; bfloat16 and float16 need hardware support (AVX-512 BF16/FP16 or
    AVX-NE-CONVERT), and oneDNN raises on CPUs without it. Trying is more reliable than reading a
    capability string: some CPUs have AVX-NE-CONVERT without AVX-512."""
    if not onednn_linear_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 16, dtype=dtype), 1)
        return True
    except RuntimeError:
        return False


def weight_state(weight: Tensor) -> tuple:
    """What identifies a parameter's current values: its storage, version counter, shape, dtype and device.
    A training step, load_state_dict or .to() changes one of them; the copies kept for inference
    (OneDNNWeight, OutputShortlist's rows, quantize.Int8Weight) are rebuilt when it changes."""
    return weight.data_ptr(), weight._version, weight.shape, weight.dtype, weight.device


class OneDNNWeight:
    """A weight's copy in oneDNN's blocked layout, for CPU inference (see Whisper.optimize_for_decoding).

    Reordering costs a full pass over the weight, so it is done once and kept. The copy is keyed on the
    parameter's storage, version counter and the compute dtype: training steps, load_state_dict and .to()
    all change one of them, so a stale copy is never used; it is rebuilt on the next call.

    An inference weight (this, or quantize.Int8Weight) answers two calls: takes(x), whether it can
    multiply x, and linear(x, weight, bias)."""

    def __init__(self):
        self._key, self._blocked = None, None

    def __deepcopy__(self, memo):  # a copied model makes its own copy on first use (oneDNN's cannot be copied)
        return type(self)()

    def blocked(self, weight: Tensor, dtype: torch.dtype) -> Tensor:
        key = (weight_state(weight), dtype)
        if key != self._key:
            self._blocked = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), 1)
            self._key = key
        return self._blocked

    def takes(self, x: Tensor) -> bool:
        return x.device.type == "cpu" and onednn_takes(x.dtype)

    def linear(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.blocked(weight, x.dtype), bias, "none", [], "")


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], inference_weight=None) -> Tensor:
    """x @ weight.T + bias in x's dtype. With an `inference_weight` (a copy of the weight made for
    inference: OneDNNWeight, quantize.Int8Weight) that takes x, when no gradient is needed, it multiplies
    by that copy (inference only: those operators have no backward)."""
    if inference_weight is not None and not torch.is_grad_enabled() and inference_weight.takes(x):
        return inference_weight.linear(x, weight, bias)
    return F.linear(x, weight.to(x.dtype), bias)


class FusedLinear:
    """Linear layers that read the same input, multiplied as one product over their weights stacked, for
    inference (see Whisper.optimize_for_decoding): the decoder's self-attention gets its queries, keys and
    values from one call instead of three.

    Why: at batch 1 a decoding step multiplies one row by each matrix. Three calls over three (D, D) weights
    become one call over the stacked (3 D, D) weight: the same bytes read, one call's fixed cost instead of
    three, two fewer operators per layer and step.

    The stacked weight and bias are an inference copy, like OneDNNWeight's: kept, keyed on every layer's
    weight_state, rebuilt when one changes; the parameters, training and the state_dict stay the layers'
    own. The product goes through a new inference weight of the layers' own kind (OneDNNWeight, or
    quantize.Int8Weight once int8_for_decoding has run), so the stacked product is the same kind of product
    the layers make alone; both quantise per output row, so stacking changes no int8 scale. A missing bias
    (the key's) is zeros: adding 0 changes no value. Costs one more copy of these weights in memory."""

    def __init__(self):
        self._key, self._weight, self._bias, self._inference_weight = None, None, None, None

    def __deepcopy__(self, memo):  # a copied model stacks its own copy on first use, as OneDNNWeight does
        return type(self)()

    @staticmethod
    def takes(x: Tensor, layers: Sequence["Linear"]) -> bool:
        """Whether the layers would take their inference path for x, all of the same kind: then so does this."""
        kinds = {type(layer.inference_weight) for layer in layers}
        first = layers[0].inference_weight
        return first is not None and len(kinds) == 1 and not torch.is_grad_enabled() and first.takes(x)

    def __call__(self, x: Tensor, layers: Sequence["Linear"]) -> Tensor:
        """x (..., K) -> the layers' outputs side by side (..., sum of their out_features)."""
        key = (*(weight_state(layer.weight) for layer in layers), type(layers[0].inference_weight))
        if key != self._key:
            self._weight = torch.cat([layer.weight.detach() for layer in layers])  # (sum N, K)
            self._bias = torch.cat([layer.weight.new_zeros(layer.out_features) if layer.bias is None
                                    else layer.bias.detach() for layer in layers])  # (sum N,)
            self._inference_weight = type(layers[0].inference_weight)()
            self._key = key
        return self._inference_weight.linear(x, self._weight, self._bias.to(x.dtype))


class Conv1d(nn.Conv1d):
    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return super()._conv_forward(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def sinusoids(length: int, channels: int, max_timescale: float = 10000) -> Tensor:
    """The encoder's fixed sinusoidal position embedding, (length, channels)."""
    log_timescale_increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


class KVCache:
    """What the decoder has already computed, so each new token costs one step, not a re-run.

    Self-attention keys/values go into buffers preallocated for `max_length` tokens: no torch.cat per
    step, and fixed addresses and shapes, which CUDA graphs need. Cross-attention keys/values of the
    audio are computed on the first step into buffers of their own, and reused.
    """

    def __init__(self, dims: ModelDimensions, batch_size: int, max_length: int, device, dtype):
        head_dim = dims.n_text_state // dims.n_text_head
        shape = (dims.n_text_layer, batch_size, dims.n_text_head, max_length, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.cross_keys: Optional[Tensor] = None  # (layers, B, H, audio positions, head_dim), on first use
        self.cross_values: Optional[Tensor] = None
        self.audio_mask: Optional[Tensor] = None  # (B, 1, 1, audio positions) bool, None: no padding
        self.cross_ready = [False] * dims.n_text_layer
        self.length = 0  # tokens cached so far (the position of the next token)
        # The static step's causal mask, rewritten in place once per step (see_up_to) rather than built in
        # every layer: 0 where the new token may look, -inf beyond it. Additive, in the cache's dtype, because
        # SDPA turns a bool mask into this form itself on every call.
        self.positions = torch.arange(max_length, device=device)[None]  # (1, max_length)
        self.visible = torch.zeros((1, max_length), device=device, dtype=dtype)  # (1, max_length)
        self._seen = torch.zeros((1, max_length), device=device, dtype=torch.bool)  # (1, max_length)

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    def reset(self):
        """Empty the cache for new audio, keeping its buffers (and so any CUDA graph reading them)."""
        self.length = 0
        self.cross_ready = [False] * len(self.cross_ready)

    def extend(self, layer: int, k: Tensor, v: Tensor):
        """Store this step's (B, H, T, head_dim) keys/values; return all of them so far."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} tokens; step would reach {end}")
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def write_at(self, layer: int, k: Tensor, v: Tensor, position: Tensor):
        """Static-shape step: store one token's (B, H, 1, head_dim) keys/values at `position`, a (1,)
        tensor, and return the whole buffers; the caller masks what lies beyond the position (visible)."""
        self.keys[layer].index_copy_(2, position, k)
        self.values[layer].index_copy_(2, position, v)
        return self.keys[layer], self.values[layer]

    def see_up_to(self, position: Tensor):
        """Static-shape step: let the token at `position` (a (1,) tensor) see cached positions <= it, in place."""
        torch.le(self.positions, position, out=self._seen)
        self.visible.fill_(float("-inf")).masked_fill_(self._seen, 0.0)

    def store_cross(self, layer: int, k: Tensor, v: Tensor):
        if self.cross_keys is None or self.cross_keys.shape[1:] != k.shape:
            self.cross_keys = k.new_zeros((len(self.cross_ready), *k.shape))
            self.cross_values = v.new_zeros((len(self.cross_ready), *v.shape))
        self.cross_keys[layer].copy_(k)
        self.cross_values[layer].copy_(v)
        self.cross_ready[layer] = True

    def cross(self, layer: int):
        return self.cross_keys[layer], self.cross_values[layer]

    def store_audio_mask(self, mask: Optional[Tensor]):
        """Keep the cross-attention mask of this audio, in place when the shape allows (a CUDA graph
        holds its address)."""
        if mask is None or self.audio_mask is None or self.audio_mask.shape != mask.shape:
            self.audio_mask = mask
        else:
            self.audio_mask.copy_(mask)

    def reorder_beams(self, rows: Tensor):
        """Beam search: row i continues old row rows[i], in place. Only self-attention moves: beams of
        one utterance share its audio, so their cross-attention entries are already equal."""
        n = self.length
        self.keys[:, :, :, :n] = self.keys[:, rows, :, :n]
        self.values[:, :, :, :n] = self.values[:, rows, :, :n]


class MultiHeadAttention(nn.Module):
    fused_qkv: Optional[FusedLinear] = None  # the decoder's self-attention; see Whisper.optimize_for_decoding

    def __init__(self, n_state: int, n_head: int, causal: bool = False, cross: bool = False):
        super().__init__()
        self.n_head = n_head
        self.causal = causal  # the decoder's self-attention: token i sees tokens <= i
        self.cross = cross  # attends over the audio features instead of x
        self.query = Linear(n_state, n_state)
        self.key = Linear(n_state, n_state, bias=False)
        self.value = Linear(n_state, n_state)
        self.out = Linear(n_state, n_state)

    def forward(self, x: Tensor, source: Optional[Tensor] = None, cache: Optional[KVCache] = None,
                layer: int = 0, position: Optional[Tensor] = None, key_mask: Optional[Tensor] = None) -> Tensor:
        """x (B, T, D) -> (B, T, D). Cross-attention reads `source` (B, S, D), or the cache once filled.
        `position` (a (1,) tensor) marks a static-shape single-token step: see KVCache.write_at.
        `key_mask` (B, 1, 1, S) bool: the audio positions a row may attend to (None: all)."""
        if self.cross:
            q = self._heads(self.query(x))  # (B, H, T, hd)
            out = self._attend_audio(q, *self._cross_kv(source, cache, layer), key_mask)
        else:
            q, k, v = (self._heads(t) for t in self._project_qkv(x))  # (B, H, T, hd) each
            if position is not None:
                k, v = cache.write_at(layer, k, v, position)  # (B, H, max_length, hd): masked by cache.visible
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.visible)
            else:
                if cache is not None:
                    k, v = cache.extend(layer, k, v)
                out = self._attend(q, k, v, causal=self.causal, key_mask=key_mask)
        return self.out(out.transpose(1, 2).flatten(2))  # (B, T, D)

    def _project_qkv(self, x: Tensor):
        """x (B, T, D) -> queries, keys, values (B, T, D) each: one stacked product when the layers have an
        inference copy for it (FusedLinear), else one product per layer."""
        layers = (self.query, self.key, self.value)
        if self.fused_qkv is not None and self.fused_qkv.takes(x, layers):
            return self.fused_qkv(x, layers).chunk(3, dim=-1)  # views of (B, T, 3 D)
        return self.query(x), self.key(x), self.value(x)

    def _cross_kv(self, source: Optional[Tensor], cache: Optional[KVCache], layer: int):
        if cache is not None and cache.cross_ready[layer]:
            return cache.cross(layer)
        k, v = self._heads(self.key(source)), self._heads(self.value(source))
        if cache is not None:
            cache.store_cross(layer, k, v)
        return k, v

    def _heads(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, H, T, hd)
        return x.view(*x.shape[:2], self.n_head, -1).transpose(1, 2)

    @staticmethod
    def _attend_audio(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
        """Cross-attention: q (B, H, T, hd) over the audio's k, v (B, H, S, hd)."""
        if q.device.type == "cpu" and q.dtype != torch.float32 and q.shape[2] == 1:
            # A decoding step in bfloat16/float16 on CPU: PyTorch's CPU flash-attention kernel takes
            # ~0.8 ms per layer here, two matrix products and a float32 softmax ~0.2 ms.
            scores = (q @ k.transpose(-1, -2)).float().mul_(q.shape[-1] ** -0.5)  # (B, H, 1, S)
            if key_mask is not None:
                scores = scores.masked_fill(~key_mask, float("-inf"))
            return scores.softmax(-1).to(v.dtype) @ v
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)

    @staticmethod
    def _attend(q: Tensor, k: Tensor, v: Tensor, causal: bool, key_mask: Optional[Tensor] = None) -> Tensor:
        n_query, n_key = q.shape[2], k.shape[2]
        if key_mask is not None:  # the encoder over a batch of rows of different lengths (not causal)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        if not causal or n_query == 1:  # a single new token may see everything cached
            return F.scaled_dot_product_attention(q, k, v)
        if n_query == n_key:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # Queries come after n_key - n_query cached tokens: query i sees keys up to its own position.
        mask = torch.ones(n_query, n_key, dtype=torch.bool, device=q.device).tril(n_key - n_query)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int, cross_attention: bool = False, causal: bool = False):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head, causal=causal)
        self.attn_ln = LayerNorm(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head, cross=True) if cross_attention else None
        self.cross_attn_ln = LayerNorm(n_state) if cross_attention else None
        self.mlp = nn.Sequential(Linear(n_state, 4 * n_state), nn.GELU(), Linear(4 * n_state, n_state))
        self.mlp_ln = LayerNorm(n_state)

    def forward(self, x: Tensor, audio: Optional[Tensor] = None, cache: Optional[KVCache] = None, layer: int = 0,
                position: Optional[Tensor] = None, audio_mask: Optional[Tensor] = None):
        """audio_mask (B, 1, 1, S): the audio positions each row holds, for the encoder's self-attention
        and the decoder's cross-attention (None: every position)."""
        if self.cross_attn is None:  # an encoder block
            x = x + self.attn(self.attn_ln(x), key_mask=audio_mask)
            return x + self.mlp(self.mlp_ln(x))
        x = x + self.attn(self.attn_ln(x), cache=cache, layer=layer, position=position)
        x = x + self.cross_attn(self.cross_attn_ln(x), audio, cache=cache, layer=layer, key_mask=audio_mask)
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.conv1 = Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, n_state))
        self.blocks = nn.ModuleList([ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer)])
        self.ln_post = LayerNorm(n_state)

    def forward(self, mel: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        """mel (B, n_mels, 2 S) with S <= n_ctx -> audio features (B, S, n_state). lengths (B,): each row's
        positions holding audio (frames 2 * lengths); None: all S."""
        mask = padding_mask(lengths, mel.shape[-1] // 2)  # (B, S) or None
        return self.run_blocks(self.embed(mel, mask), mask)

    def embed(self, mel: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """The convolutional stem and positions: mel (B, n_mels, 2 S) -> (B, S, n_state), before any block."""
        n_ctx = self.positional_embedding.shape[0]
        n_frames = mel.shape[-1]
        if mel.ndim != 3 or mel.shape[1] != self.conv1.in_channels or n_frames % 2 or not 2 <= n_frames <= 2 * n_ctx:
            raise ValueError(f"encoder expects mel (B, {self.conv1.in_channels}, an even number of frames from 2 "
                             f"to {2 * n_ctx}), got {tuple(mel.shape)}")
        if mask is not None:
            # Frames past a row's end become the zeros its convolution would pad with if it ran alone.
            mel = mel * mask.repeat_interleave(2, dim=1)[:, None, :].to(mel.dtype)
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x))  # stride 2: two frames per position
        return (x.permute(0, 2, 1) + self.positional_embedding[: n_frames // 2]).to(x.dtype)  # (B, S, n_state)

    def run_blocks(self, x: Tensor, mask: Optional[Tensor] = None, first: int = 0) -> Tensor:
        """Blocks first.. and the final norm: (B, S, n_state) -> audio features. Distillation starts at a
        later block when the ones before are frozen and their output cached."""
        key_mask = None if mask is None else mask[:, None, None, :]
        for block in self.blocks[first:]:
            x = block(x, audio_mask=key_mask)
        return self.ln_post(x)


class OutputShortlist:
    """The token ids a model may emit, a sorted subset of its vocabulary, and the output projection's rows
    for them (gathered once per weight version, as OneDNNWeight keys its copy).

    Why: in a decoding step on CPU, the output projection (51864 x 384 for tiny.en) is the largest matrix
    read per token, larger than all of tiny.en's decoder blocks together. A student that only ever emits
    a known set of tokens (those of its training targets, the special and timestamp tokens, the most
    frequent text tokens) multiplies by those rows alone, as Marian NMT's CPU decoder does. Logits keep
    the full vocabulary's width (the rest are -inf), so decoding's rules and token ids are unchanged."""

    def __init__(self, ids: Sequence[int], n_vocab: int):
        ids = sorted(set(int(i) for i in ids))
        if not ids or ids[0] < 0 or ids[-1] >= n_vocab:
            raise ValueError(f"a shortlist needs ids in [0, {n_vocab}); got {len(ids)} ids in "
                             f"[{ids[0] if ids else None}, {ids[-1] if ids else None}]")
        self.ids = torch.tensor(ids)  # (K,)
        self._key, self._rows, self._ids_on = None, None, {}

    def ids_on(self, device: torch.device) -> Tensor:
        """The ids on `device`, copied once: a decoding step needs them every token."""
        if device not in self._ids_on:
            self._ids_on[device] = self.ids.to(device)
        return self._ids_on[device]

    def rows(self, weight: Tensor) -> Tensor:
        """weight's rows for the shortlist (K, D): a differentiable gather when a gradient is needed."""
        if torch.is_grad_enabled() and weight.requires_grad:
            return weight[self.ids_on(weight.device)]
        key = weight_state(weight)
        if key != self._key:
            self._rows, self._key = weight.detach()[self.ids_on(weight.device)], key
        return self._rows


class TextDecoder(nn.Module):
    inference_weight = None  # for the output projection; see Whisper.optimize_for_decoding
    shortlist: Optional[OutputShortlist] = None  # the tokens it may emit (None: all); see Whisper.restrict_output

    def __init__(self, n_vocab: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.token_embedding = nn.Embedding(n_vocab, n_state)
        # Learned, and overwritten when weights load; drawn small (as GPT-2) so that a model built from
        # dimensions alone computes finite values rather than whatever torch.empty's memory held.
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(n_ctx, n_state))
        self.blocks = nn.ModuleList(
            [ResidualAttentionBlock(n_state, n_head, cross_attention=True, causal=True) for _ in range(n_layer)]
        )
        self.ln = LayerNorm(n_state)

    def forward(self, tokens: Tensor, audio: Tensor, cache: Optional[KVCache] = None,
                audio_lengths: Optional[Tensor] = None) -> Tensor:
        """tokens (B, T) after the `cache.length` already seen; audio (B, S, D) with each row's positions
        holding audio in audio_lengths (B,) (None: all) -> logits (B, T, n_vocab) float32. With a cache,
        the audio's mask is kept from the first call, as its keys and values are."""
        return self.logits_of(self.hidden(tokens, audio, cache, audio_lengths))

    def hidden(self, tokens: Tensor, audio: Tensor, cache: Optional[KVCache] = None,
               audio_lengths: Optional[Tensor] = None, block_outputs: Optional[List[Tensor]] = None) -> Tensor:
        """The last block's output (B, T, D), before the final norm and the output projection: training
        projects only the positions that carry a loss (logits_of), the largest product of a step. Each
        block's output (B, T, D) is appended to `block_outputs` if given (intermediate-layer distillation)."""
        offset = cache.length if cache is not None else 0
        n_ctx = self.positional_embedding.shape[0]
        if offset + tokens.shape[1] > n_ctx:
            raise ValueError(f"decoder context is {n_ctx} tokens; got {offset + tokens.shape[1]}")
        x = self.token_embedding(tokens) + self.positional_embedding[offset : offset + tokens.shape[1]]
        x = x.to(audio.dtype)
        audio_mask = self._audio_mask(audio, cache, audio_lengths)
        for layer, block in enumerate(self.blocks):
            x = block(x, audio, cache=cache, layer=layer, audio_mask=audio_mask)
            if block_outputs is not None:
                block_outputs.append(x)
        if cache is not None:
            cache.length += tokens.shape[1]
        return x

    def step(self, tokens: Tensor, position: Tensor, cache: KVCache) -> Tensor:
        """One token per row at `position` (a (1,) tensor), with every shape fixed: the same kernels
        run at every position, so the step can be captured once as a CUDA graph and replayed.
        Needs a cache already holding the prompt and the audio's cross-attention. tokens (B, 1)."""
        x = self.token_embedding(tokens) + self.positional_embedding[position]  # (B, 1, D)
        x = x.to(cache.keys.dtype)
        cache.see_up_to(position)  # once for every layer
        for layer, block in enumerate(self.blocks):
            x = block(x, None, cache=cache, layer=layer, position=position, audio_mask=cache.audio_mask)
        return self.logits_of(x)

    @staticmethod
    def _audio_mask(audio: Tensor, cache: Optional[KVCache], audio_lengths: Optional[Tensor]) -> Optional[Tensor]:
        """The cross-attention mask (B, 1, 1, S): from the cache once it holds this audio, else built."""
        if cache is not None and cache.cross_ready[0]:
            return cache.audio_mask
        mask = padding_mask(audio_lengths, audio.shape[1])
        mask = None if mask is None else mask[:, None, None, :]
        if cache is not None:
            cache.store_audio_mask(mask)
            return cache.audio_mask
        return mask

    def logits_of(self, x: Tensor) -> Tensor:
        """Hidden states (..., D) -> logits (..., n_vocab) float32 (-inf outside a shortlist)."""
        x = self.ln(x)
        weight = self.token_embedding.weight  # the output projection is tied to the token embedding
        if self.shortlist is None:
            return linear(x, weight, None, self.inference_weight).float()
        rows = linear(x, self.shortlist.rows(weight), None, self.inference_weight).float()  # (..., K)
        logits = rows.new_full((*rows.shape[:-1], weight.shape[0]), float("-inf"))
        return logits.index_copy(-1, self.shortlist.ids_on(rows.device), rows)


class Whisper(nn.Module):
    def __init__(self, dims: ModelDimensions, audio_context: AudioContext = FIXED_CONTEXT):
        super().__init__()
        self.dims = dims
        self.audio_context = audio_context  # what the model was made for; checkpoints carry it
        self.encoder = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer)
        self.decoder = TextDecoder(dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head, dims.n_text_layer)

    def embed_audio(self, mel: Tensor, audio_lengths: Optional[Tensor] = None) -> Tensor:
        return self.encoder(mel, audio_lengths)

    def logits(self, tokens: Tensor, audio_features: Tensor, cache: Optional[KVCache] = None,
               audio_lengths: Optional[Tensor] = None) -> Tensor:
        return self.decoder(tokens, audio_features, cache, audio_lengths)

    def forward(self, mel: Optional[Tensor], tokens: Tensor, audio_features: Optional[Tensor] = None,
                audio_lengths: Optional[Tensor] = None) -> Tensor:
        """Teacher-forced logits (B, T, n_vocab). `audio_features` skips the encoder: distillation passes
        the output of a frozen encoder computed once (or cached). audio_lengths (B,): positions per row."""
        if audio_features is None:
            audio_features = self.encoder(mel, audio_lengths)
        return self.decoder(tokens, audio_features, audio_lengths=audio_lengths)

    def audio_positions(self, content_frames: int) -> int:
        """Encoder positions this model is given for audio of `content_frames` Mel frames."""
        return self.audio_context.positions(content_frames, self.dims.n_audio_ctx)

    def optimize_for_decoding(self) -> "Whisper":
        """Switches the model to its fastest inference path on its device; returns self. On CPU, every
        Linear and the output projection multiply through oneDNN when no gradient is needed; elsewhere
        nothing changes.

        Why: PyTorch's CPU linear goes to MKL, which on a 2-core EPYC reaches ~130 GFLOP/s on the
        encoder's (1500 x 512) @ (512 x 2048) products and reads weights at ~8 GB/s in a decoding step
        (one row times each matrix: bound by memory bandwidth); oneDNN reaches ~200 GFLOP/s and ~21 GB/s
        on the same products, more so from weights reordered once into its blocked layout (OneDNNWeight:
        a second copy of the weights in memory; in bfloat16 the output projection drops from 5.9 to 1.5 ms
        per step). The sums run in another order, so logits move by ~1e-5 (tests check that
        transcripts stay the same): `load_model` keeps the plain path, whose float32 logits are
        bit-identical to openai-whisper's, and the inference entry points (transcribe, evaluate, bench)
        call this. Where oneDNN cannot take the model's dtype (bfloat16 on a CPU without AVX-512 or
        AVX-NE-CONVERT), the layers fall back to F.linear, with a warning. The decoder's self-attention
        also stacks its query, key and value weights into one product (FusedLinear)."""
        use_onednn = self.device.type == "cpu" and onednn_linear_available()
        if use_onednn and self.dtype != torch.float32 and not onednn_takes(self.dtype):
            warnings.warn(f"{str(self.dtype)[6:]} has no hardware support on this CPU "
                          f"({torch.backends.cpu.get_cpu_capability()}): it runs through plain F.linear, emulated "
                          "and slower than float32", stacklevel=2)
        for module in self.modules():
            if isinstance(module, (Linear, TextDecoder)):
                module.inference_weight = OneDNNWeight() if use_onednn else None
        for block in self.decoder.blocks:  # a decoding step's q, k, v in one product (FusedLinear says why)
            block.attn.fused_qkv = FusedLinear() if use_onednn else None
        return self

    def restrict_output(self, ids: Optional[Sequence[int]]) -> "Whisper":
        """Let the model emit only these token ids (None: every id again); returns self. Checkpoints carry
        the list (see OutputShortlist for why)."""
        self.decoder.shortlist = None if ids is None else OutputShortlist(ids, self.dims.n_vocab)
        return self

    @property
    def output_ids(self) -> Optional[List[int]]:
        """The shortlist of token ids the model may emit, None when it may emit any."""
        return None if self.decoder.shortlist is None else self.decoder.shortlist.ids.tolist()

    def new_cache(self, batch_size: int, max_length: Optional[int] = None) -> KVCache:
        """An empty KV cache for decoding `batch_size` rows of up to `max_length` tokens."""
        max_length = min(max_length or self.dims.n_text_ctx, self.dims.n_text_ctx)
        return KVCache(self.dims, batch_size, max_length, self.device, self.dtype)

    @property
    def device(self) -> torch.device:
        return self.decoder.positional_embedding.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.positional_embedding.dtype

    @property
    def is_multilingual(self) -> bool:
        return self.dims.n_vocab >= 51865

    @property
    def num_languages(self) -> int:
        return self.dims.n_vocab - 51765 - int(self.is_multilingual)
