"""A smaller Whisper built from a bigger one: the student that distillation trains.

As in distil-whisper: the student keeps the teacher's encoder (frozen by default; the encoder runs once
per 30 s window, the decoder once per token, so decoder depth is what decoding time is made of) and a
decoder of a few layers copied from maximally spaced teacher layers (first and last for 2).
Optionally the encoder is thinned the same way, for the depth/speed trade-off. A shortlist of the tokens
it may emit (output_shortlist) shrinks its output layer, the largest matrix a decoding step reads.
"""
import copy
from dataclasses import replace
from typing import Iterable, List, Optional, Sequence

import numpy as np
from torch import nn

from model import Whisper


def spaced_layers(n_teacher: int, n_student: int) -> List[int]:
    """Indices of n_student teacher layers spread evenly from the first to the last (distil-whisper's
    np.linspace(..., dtype=int) mapping: 2 of 6 -> [0, 5], 3 of 6 -> [0, 2, 5], 1 -> [0])."""
    if not 1 <= n_student <= n_teacher:
        raise ValueError(f"a student needs 1..{n_teacher} layers here, got {n_student}")
    return np.linspace(0, n_teacher - 1, n_student, dtype=int).tolist()


def layers_stood_for(n_teacher: int, n_student: int) -> List[int]:
    """For each student block, the teacher block whose output it should reproduce: block j starts as
    teacher block spaced[j] and replaces the run spaced[j] .. spaced[j+1] - 1, so its output stands for the
    last of that run (2 of 4: [2, 3]; 3 of 6: [1, 4, 5]). The targets of intermediate-layer distillation."""
    spaced = spaced_layers(n_teacher, n_student)
    return [following - 1 for following in spaced[1:]] + [n_teacher - 1]


def make_student(
    teacher: Whisper,
    decoder_layers: int = 2,
    encoder_layers: Optional[int] = None,
    freeze_encoder: Optional[bool] = None,
) -> Whisper:
    """Student = teacher's embeddings and norms + a subset of its blocks. Its dims say its depth,
    so save_checkpoint/load_model rebuild it like any Whisper.

    freeze_encoder defaults to True when the encoder is the teacher's whole encoder, False when thinned.
    """
    encoder_layers = encoder_layers or teacher.dims.n_audio_layer
    dims = replace(teacher.dims, n_text_layer=decoder_layers, n_audio_layer=encoder_layers)
    student = Whisper(dims).to(device=teacher.device, dtype=teacher.dtype)
    # Start from the teacher's weights everywhere, then keep only the chosen blocks.
    student.load_state_dict(_student_state(teacher, encoder_layers, decoder_layers))
    if freeze_encoder is None:
        freeze_encoder = encoder_layers == teacher.dims.n_audio_layer
    student.encoder.requires_grad_(not freeze_encoder)
    return student


def _student_state(teacher: Whisper, encoder_layers: int, decoder_layers: int) -> dict:
    state = {}
    chosen = {
        "encoder.blocks.": spaced_layers(teacher.dims.n_audio_layer, encoder_layers),
        "decoder.blocks.": spaced_layers(teacher.dims.n_text_layer, decoder_layers),
    }
    for name, tensor in teacher.state_dict().items():
        prefix = next((p for p in chosen if name.startswith(p)), None)
        if prefix is None:
            state[name] = tensor.clone()
            continue
        index, rest = name[len(prefix) :].split(".", 1)
        if int(index) in chosen[prefix]:
            state[f"{prefix}{chosen[prefix].index(int(index))}.{rest}"] = tensor.clone()
    return state


def output_shortlist(targets: Iterable[Sequence[int]], eot: int, n_vocab: int, frequent: int) -> List[int]:
    """The token ids a student keeps in its output layer (model.OutputShortlist): every token of its
    training targets, every special and timestamp token (the ids from <|endoftext|> up), and the
    `frequent` lowest text ids. Why the lowest: BPE ids follow the order of the merges, which follows how
    often a pair occurred in the tokenizer's training text, so they stand in for a frequency list."""
    ids = set(range(min(frequent, eot))) | set(range(eot, n_vocab))
    for target in targets:
        ids.update(target)
    return sorted(ids)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A snapshot that takes no gradient: the self-teacher of ASKD's second phase."""
    snapshot = copy.deepcopy(model).eval()
    snapshot.requires_grad_(False)
    return snapshot


def shares_teacher_encoder(student: Whisper, teacher: Whisper) -> bool:
    """True when the student's encoder is the teacher's, frozen: its output can be computed once for both."""
    if student.dims.n_audio_layer != teacher.dims.n_audio_layer:
        return False
    if any(p.requires_grad for p in student.encoder.parameters()):
        return False
    theirs = teacher.encoder.state_dict()
    return all(t.equal(theirs[k]) for k, t in student.encoder.state_dict().items())
