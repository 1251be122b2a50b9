"""int8 weights for decoding on CPU: the output projection, the decoder or every matrix product reads 8-bit weights.

    model = int8_for_decoding(load_model("tiny.en", device="cpu"))          # the output projection
    model = int8_for_decoding(load_model("tiny.en", device="cpu"), "all")   # every matrix product

Why: at batch 1 a decoding step multiplies one row by every weight matrix, so it is bound by how fast the
weights stream from memory and by the cost of each call. The largest matrix by far is the output projection
(51864 x 384 for tiny.en, 80 MB in float32): 4.9 ms per step through oneDNN on a 2-core AVX2 EPYC, 0.6 ms
from int8 (a quarter of the bytes, fbgemm's int8 kernels). The decoder blocks' 32 small products gain less
(~0.09 -> ~0.05 ms each), and the encoder's large ones less again. This is what faster-whisper's int8 mode
(CTranslate2) does on CPU. Measured per token in `bench.py models` (tiny.en, batch 1, the quieter of two
runs in RESULTS.md): 14.1 ms in float32, 9.9 with the projection in int8, 8.3 with the whole decoder.

How: each weight is quantised once per output row (symmetric, scale = max |w| / 127) and packed for
fbgemm; activations are quantised per call by PyTorch's dynamic quantised linear (`quantized::linear_dynamic`,
7-bit with reduce_range, which keeps fbgemm's int16 accumulation from saturating), on rows we first scale
to [-1, 1] each (Int8Weight says why). Results come back in float32. Everything else (layer norms, attention,
the convolutions, the softmax) stays float32, and so do the parameters: the int8 copies are inference
weights (see model.OneDNNWeight) kept beside them, rebuilt if the parameters change, never saved.

Which products go int8 is a choice (SCOPES), because the encoder's activations quantise worst: one scale
per call spans 1500 positions there, where a decoding step has one row. The cost in accuracy is measured,
not assumed: SCOPES and RESULTS.md give dev WER; tests keep test-clean's WER within a point of float32.
"""
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from model import Linear, TextDecoder, Whisper, weight_state

INT8_MAX = 127
REDUCE_RANGE = True  # 7-bit activations: what PyTorch's x86/fbgemm dynamic quantisation uses


def int8_available() -> bool:
    """Whether this PyTorch build has a CPU engine for dynamic int8 linear layers."""
    return bool({"x86", "fbgemm", "onednn", "qnnpack"} & set(torch.backends.quantized.supported_engines))


def row_scales(weight: Tensor) -> Tensor:
    """weight (N, K) -> scales (N,) float64, one per output row: w ~= round(w / scale) * scale in int8."""
    return (weight.detach().float().abs().amax(dim=1).clamp(min=1e-12) / INT8_MAX).double()  # zero rows: usable


def pack(weight: Tensor):
    """The weight quantised per output row, in the engine's packed layout (opaque, for linear_dynamic)."""
    scales = row_scales(weight)
    zero_points = torch.zeros(scales.shape, dtype=torch.int64)
    with warnings.catch_warnings():
        # PyTorch 2.x marks quantised-tensor creation as deprecated in favour of torchao; the operators
        # are still those of the pinned version, and torchao would be one more package for two calls.
        warnings.simplefilter("ignore", UserWarning)
        quantized = torch.quantize_per_channel(weight.detach().float(), scales, zero_points, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(quantized, None)


def unit_rows(x: Tensor):
    """x (M, K) -> (rows (M, K) each scaled to max |x| = 1, the scales (M, 1)). A zero row stays zero."""
    scales = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    return x / scales, scales


def int8_linear_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """The spec of Int8Weight.linear in plain PyTorch: x (..., K) float32, weight (N, K) -> (..., N).

    The weight rounded per output row to int8 (row_scales). Each row of x scaled to [-1, 1] by its own
    largest magnitude, then rounded to 7-bit unsigned integers on the grid that PyTorch's dynamic
    quantisation picks for that range (127 levels, the zero point that keeps 0 exact). The product of the
    two roundings, scaled back per row, plus the bias."""
    scales = row_scales(weight).float()[:, None]  # (N, 1)
    weight_q = torch.round(weight / scales).clamp(-INT8_MAX, INT8_MAX) * scales
    rows, x_scales = unit_rows(x.reshape(-1, x.shape[-1]))
    levels = 2 ** (7 if REDUCE_RANGE else 8) - 1
    step = 2.0 / levels  # the range [-1, 1]
    zero_point = round(1.0 / step)
    # The grid is chosen for 7 bits but values are stored in 8, so +1 (63.5 steps, rounded to 64) is kept.
    rows_q = (torch.round(rows / step) + zero_point).clamp(0, 255).sub(zero_point) * step
    out = F.linear(rows_q, weight_q) * x_scales
    out = out if bias is None else out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Int8Weight:
    """A weight's int8 copy for CPU inference, made on first use and kept (keyed like OneDNNWeight: a
    training step, load_state_dict or .to() rebuilds it).

    Activations get one scale per row, as CTranslate2 gives them, where PyTorch's operator takes one per
    call: each row is scaled to [-1, 1] first and the result scaled back (the product is linear in each
    row), and one extra row holding +1 and -1 pins the call's range to exactly [-1, 1]. So a row's result
    does not depend on the other rows of the batch, and a quiet row is not rounded on a loud row's grid
    (with one scale per call, the tiny.en teacher with every product in int8 lost 0.71 WER points on the
    dev set; RESULTS.md)."""

    def __init__(self):
        self._key, self._packed, self._anchor = None, None, None

    def __deepcopy__(self, memo):  # a copied model packs its own copy on first use (a packed one cannot be copied)
        return type(self)()

    def takes(self, x: Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype == torch.float32

    def linear(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        key = weight_state(weight)
        if key != self._key:
            self._packed, self._key = pack(weight), key
            self._anchor = torch.zeros(1, weight.shape[1])  # (1, K): +1, -1, then zeros
            self._anchor[0, :2] = torch.tensor([1.0, -1.0])
        rows, scales = unit_rows(x.reshape(-1, x.shape[-1]))  # (M, K), (M, 1)
        out = torch.ops.quantized.linear_dynamic(torch.cat([rows, self._anchor]), self._packed, REDUCE_RANGE)
        out = out[:-1] * scales  # (M, N) float32
        out = out if bias is None else out + bias
        return out.reshape(*x.shape[:-1], weight.shape[0])


def quantized_modules(model: Whisper, scope: str):
    """The modules whose products go int8 under `scope` (see SCOPES below)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown int8 scope {scope!r}; choose one of {', '.join(SCOPES)}")
    if scope == "output":
        return [model.decoder]  # TextDecoder's inference weight serves the output projection only
    root = model.decoder if scope == "decoder" else model
    return [m for m in root.modules() if isinstance(m, (Linear, TextDecoder))]


# What each scope quantises, and what it cost the tiny.en teacher on the 77 dev utterances (greedy, float32
# 6.19 % WER; RESULTS.md). The default is the output projection: most of the gain per token at no cost we
# can measure (the six tiny.en students moved by -0.09 to +0.09 points; with the decoder's blocks too, by
# +0.04 to +0.31).
SCOPES = {
    "output": "the output projection only (6.15 % WER)",
    "decoder": "the output projection and the decoder blocks (6.50 % WER)",
    "all": "every matrix product, the encoder's too, as faster-whisper int8 (6.28 % WER)",
}
DEFAULT_SCOPE = "output"


def int8_for_decoding(model: Whisper, scope: str = DEFAULT_SCOPE) -> Whisper:
    """The products of `scope` (SCOPES) multiply int8 copies of their weights when no gradient is needed;
    everything else keeps its path. Returns the model, which must be float32 on CPU."""
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise ValueError(f"int8 decoding runs on CPU from a float32 model; this one is {model.dtype} on "
                         f"{model.device}")
    if not int8_available():
        raise ValueError(f"this PyTorch build has no int8 CPU engine "
                         f"(supported: {torch.backends.quantized.supported_engines})")
    for module in quantized_modules(model, scope):
        module.inference_weight = Int8Weight()
    return model
