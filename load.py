"""From a model name or checkpoint to a ready Whisper, and from a Whisper back to disk.

weights.py reads the formats (CTranslate2, OpenAI .pt, Hugging Face) into one `(dims, state_dict)`;
this file builds the model from it, checks that every tensor fits, and places it on a device and dtype.
model.py stays pure architecture: it imports nothing of ours.
"""
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from model import FIXED_CONTEXT, MODEL_DIMS, AudioContext, ModelDimensions, Whisper
from weights import CheckpointError, read_checkpoint

# Our .pt files add entries beside OpenAI's two ("dims", "model_state_dict"), which openai-whisper ignores:
# "audio_context" (absent: 30 s windows, as every official checkpoint), "output_ids" (absent: the model may
# emit any token; see model.OutputShortlist) and, for students, their provenance under a format version. A version this code does not know is refused, never guessed at.
CHECKPOINT_FORMAT = 1
PROVENANCE_KEYS = ("teacher", "method", "seed", "data", "commit", "dev_wer")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # the --dtype choices


def default_device() -> torch.device:
    """CUDA when there is a GPU, else the CPU: the one rule every entry point uses."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device) -> torch.dtype:
    """float16 on GPU (tensor cores), float32 on CPU (exact, and fastest without bfloat16 hardware)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def load_model(name_or_path, device=None, dtype: Optional[torch.dtype] = None) -> Whisper:
    """A Whisper model from a name ("tiny.en", "base", ...) or a checkpoint path (CT2, OpenAI .pt, HF folder),
    in eval mode on `device` (default: default_device()) in `dtype` (default: default_dtype(device))."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    dims_dict, state, extra = read_checkpoint(name_or_path)
    try:
        dims = ModelDimensions(**dims_dict)
    except TypeError as err:
        raise CheckpointError(f"{name_or_path}: bad model dimensions {dims_dict} ({err})") from None
    expected = MODEL_DIMS.get(str(name_or_path))
    if expected is not None and dims != expected:
        raise CheckpointError(f"{name_or_path}: checkpoint dimensions {dims} are not those of {name_or_path} ({expected})")
    model = Whisper(dims, audio_context_of(extra, name_or_path))
    check_state_dict(model, state, name_or_path)
    model.load_state_dict(state)
    try:
        model.restrict_output(extra.get("output_ids"))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{name_or_path}: bad output_ids ({err})") from None
    return model.to(device=device, dtype=dtype).eval()


def audio_context_of(extra: dict, source) -> AudioContext:
    """The audio-context policy a checkpoint's extra entries declare (none: 30 s windows)."""
    version = extra.get("format_version", CHECKPOINT_FORMAT)
    if version != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{source}: checkpoint format version {version!r}; this code reads version "
                              f"{CHECKPOINT_FORMAT} (written by another FastWhisper release?)")
    policy = extra.get("audio_context")
    if policy is None:
        return FIXED_CONTEXT
    try:
        return AudioContext(**policy)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: bad audio_context {policy!r} ({err})") from None


def check_state_dict(model: nn.Module, state: dict, source) -> None:
    """Fail with names, not a wall of text, when a checkpoint does not fit the model."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", misshapen))
        if items
    ]
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not fit the model: " + "; ".join(problems))


def atomic_write(path, write) -> None:
    """write(f) into a temporary file in the same folder, then rename it over `path`: a reader (or a
    resumed run) sees the old file or the new one, never half of one, even if the process dies mid-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj, path) -> None:
    """torch.save, atomically (see atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(model: Whisper, path, **provenance) -> None:
    """Save atomically in OpenAI's .pt layout, which load_model (and openai-whisper) read back, with the
    model's audio-context policy, its output shortlist if it has one, and, for a student, its provenance (PROVENANCE_KEYS: the teacher, method,
    seed, data, commit and dev WER it was made with)."""
    unknown = set(provenance) - set(PROVENANCE_KEYS)
    if unknown:
        raise ValueError(f"unknown provenance {sorted(unknown)}; expected some of {PROVENANCE_KEYS}")
    checkpoint = {"dims": asdict(model.dims), "model_state_dict": model.state_dict(),
                  "format_version": CHECKPOINT_FORMAT, "audio_context": asdict(model.audio_context), **provenance}
    if model.output_ids is not None:
        checkpoint["output_ids"] = model.output_ids
    atomic_save(checkpoint, path)


def checkpoint_provenance(path) -> dict:
    """What a student checkpoint records of how it was made (empty for official weights)."""
    _, _, extra = read_checkpoint(path)
    return {k: extra[k] for k in PROVENANCE_KEYS if k in extra}
