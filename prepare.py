"""Everything distillation computes once per run, before the first training step.

    examples = plan_examples(...)                  # utterances, plus real 30 s windows of joined utterances
    labels = label_examples(teacher, examples, ...)  # 1. the teacher's transcripts and its 30 s encoder output
    labels = attach_prompts(labels, ...)             #    some get the teacher's text of what came before
    targets = cache_targets(teacher, labels, ...)    # 2. its top-k logits on them, and the frozen encoder's
                                                     #    output on the real length (a few margins)
Each step fills an ArrayCache (cache.py): resumable after a kill, keyed on the teacher's weights and the
settings, verified on read. Progress bars show an ETA. Nothing here trains.

Why this split. A training step over a frozen encoder and a frozen teacher needs, per example, only
(a) the features the student's decoder attends to and (b) the teacher's distribution over each target
token. Both are fixed for the run, so they are computed here once instead of every epoch, and the step
runs the student alone. The teacher's logits are kept as their top-k per token (float16 values, int32
ids): the full rows would take ~100 KB per token.
"""
import hashlib
import sys
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import soundfile
import torch
from tqdm import tqdm

from audio import HOP_LENGTH, N_FFT, N_FRAMES, N_SAMPLES, SAMPLE_RATE, AudioError, change_speed, load_audio
from cache import ArrayCache, fingerprint_files, fingerprint_model
from data import IGNORE_LABEL, TEST_SPEAKERS, Utterance, chapter_of, list_utterances, training_tokens, window_runs
from decoding import DecodingOptions, FallbackRules, decode_with_fallback, prompt_limit
from evaluate import normalize, word_error_rate
from human_labels import human_tokens
from model import AudioContext, Whisper
from tokenizer import Tokenizer
from transcribe import clip_mels, frames_of_samples


@dataclass(frozen=True)
class Example:
    """One training example before labelling: one utterance, or consecutive utterances joined."""
    id: str
    audio: Tuple[Path, ...]  # files joined end to end, in order
    reference: Optional[str]  # the transcripts joined, None when a file has none (pseudo-labels only)
    timestamps: bool  # whether its target carries the teacher's timestamp tokens
    speed: float = 1.0  # played this many times as fast (speed perturbation, audio.change_speed); 1.0: as recorded


def share_picks(example_id: str, share: float, salt: str = "") -> bool:
    """Whether an example is among a share of them (timestamped targets, prompts): a fixed hash of its id,
    so every run (and seed) asks the teacher for the same targets and shares one cache."""
    bucket = int(hashlib.sha256((example_id + salt).encode()).hexdigest()[:8], 16) / 16**8
    return bucket < share


def plan_examples(utterances: Sequence[Utterance], timestamp_share: float, windows: Optional[int]) -> List[Example]:
    """Every utterance as an example, plus up to `windows` real 30 s windows: runs of consecutive utterances
    of one chapter joined end to end (they teach long-form transcription: full windows and timestamps)."""
    examples = [Example(u.id, (u.audio,), u.text, share_picks(u.id, timestamp_share)) for u in utterances]
    if windows == 0:
        return examples
    sized = [(u, n) for u in utterances if (n := recorded_samples([u.audio])) is not None]
    for run in window_runs([(u.id, n) for u, n in sized], windows):
        if len(run) < 2:
            continue  # a single utterance is already an example
        parts = [sized[i][0] for i in run]
        reference = None if any(p.text is None for p in parts) else " ".join(p.text for p in parts)
        examples.append(Example(f"{parts[0].id}+{len(parts)}", tuple(p.audio for p in parts), reference, True))
    return examples


def recorded_samples(paths) -> Optional[int]:
    """The files' total length in samples at 16 kHz, read from their headers only; None if one is unreadable
    (labelling reports it)."""
    total = 0
    for path in paths:
        try:
            info = soundfile.info(str(path))
        except (RuntimeError, OSError):
            return None
        total += info.frames * SAMPLE_RATE // info.samplerate
    return total


def training_utterances(sources: Sequence, exclude_speakers: Sequence[str]) -> List[Utterance]:
    """The utterances of the sources minus the excluded speakers (the dev set) and, always, the test split's."""
    leave_out = {*exclude_speakers, *TEST_SPEAKERS}
    found = []
    for source in sources:
        found += list_utterances(source, exclude_speakers=leave_out)
    return found


def load_example_audio(example: Example) -> np.ndarray:
    """The example's waveform (16 kHz mono float32), at its speed; AudioError if unreadable or longer than 30 s."""
    audio = np.concatenate([load_audio(path) for path in example.audio])
    if example.speed != 1.0:
        audio = change_speed(audio, example.speed)
    if len(audio) > N_SAMPLES:
        raise AudioError(f"{len(audio) / SAMPLE_RATE:.1f} s is longer than Whisper's 30 s window")
    return audio


def item_name(example: Example) -> Optional[str]:
    """The labels cache's name for an example: its audio's content and its target's form (one name for all
    its speeds: the label of a perturbed copy is the recording's); None if a file of it cannot be read (it
    is then counted as unreadable, not cached: it may be back on the next run)."""
    try:
        return f"{fingerprint_files(example.audio)}-{'ts' if example.timestamps else 'tx'}"
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# 1. Labels: the teacher's transcript of each example, and its encoder's 30 s output


LABEL_OPTIONS = dict(language="en", task="transcribe")  # the teacher's decoding; greedy with fallback


def labelling_key(teacher: Whisper) -> dict:
    return dict(kind="labels", teacher=fingerprint_model(teacher), n_mels=teacher.dims.n_mels,
                sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP_LENGTH, decoding=LABEL_OPTIONS, version=1)


@dataclass(frozen=True)
class Labelled:
    example: Example
    item: str  # its name in the labels cache
    tokens: List[int]  # the teacher's target: text tokens, with timestamp tokens when example.timestamps
    text: str
    prompt: Tuple[int, ...] = ()  # the teacher's tokens for the audio before it (see attach_prompts)
    human: bool = False  # tokens are the reference's words in the teacher's style, not the teacher's (human_labels)

    @property
    def target_item(self) -> str:
        """Its name in the targets cache: the teacher's logits depend on the target, the speed and the prompt too."""
        name = self.item if self.example.speed == 1.0 else f"{self.item}-x{self.example.speed:g}"
        if self.human:
            name += f"-h{_digest(self.tokens)}"
        return f"{name}-p{_digest(self.prompt)}" if self.prompt else name


def _digest(tokens: Sequence[int]) -> str:
    """A short name for a token sequence, for cache item names."""
    return hashlib.sha256(repr(tuple(tokens)).encode()).hexdigest()[:16]


@torch.no_grad()
def label_examples(teacher: Whisper, examples: Sequence[Example], cache: ArrayCache, batch_size: int,
                   log: Callable = print) -> Tuple[List[Labelled], Dict[str, int]]:
    """Transcribe (with the teacher, 30 s windows) every example the cache lacks; return the labelled ones
    and counts of what was skipped. Unreadable or over-long audio is recorded once, counted and reported."""
    names = [item_name(e) for e in examples]
    for example, name in zip(examples, names):
        if name is None:
            log(f"warning: skipping {example.id}: cannot read {', '.join(map(str, example.audio[:2]))}")
    todo = [(e, n) for e, n in zip(examples, names) if n is not None and not (cache.has(n) and cache.verify(n))]
    if todo:
        log(f"labelling {len(todo)} of {len(examples)} examples with the teacher (cache: {cache.folder})")
    for timestamps in (False, True):
        group = [(e, n) for e, n in todo if e.timestamps == timestamps]
        options = DecodingOptions(without_timestamps=not timestamps, **LABEL_OPTIONS)
        for start in tqdm(range(0, len(group), batch_size), desc=f"labels{' + timestamps' if timestamps else ''}",
                          file=sys.stderr, disable=not group):
            _label_batch(teacher, group[start : start + batch_size], options, cache, log)
    return _collect_labels(examples, names, cache, log)


def _label_batch(teacher, batch, options, cache, log):
    clips, kept = [], []
    for example, name in batch:
        try:
            clips.append(load_example_audio(example))
            kept.append((example, name))
        except (OSError, AudioError) as err:
            log(f"warning: skipping {example.id} ({', '.join(map(str, example.audio[:2]))}): {err}")
            cache.put(name, {}, dict(error=str(err)))
    if not clips:
        return
    features = teacher.embed_audio(clip_mels(clips, teacher.dims.n_mels, teacher.device).to(teacher.dtype))
    results = decode_with_fallback(teacher, None, options, FallbackRules(), audio_features=features)
    for (example, name), row, result in zip(kept, features, results):
        cache.put(name, dict(teacher_features=row.half().cpu().numpy()),
                  dict(tokens=result.tokens, text=result.text, id=example.id))


def _collect_labels(examples, names, cache, log):
    labelled, counts = [], dict(examples=len(examples), unreadable=0, empty=0)
    for example, name in zip(examples, names):
        fields = None if name is None else cache.fields(name)
        if fields is None or "error" in fields:
            counts["unreadable"] += 1
        elif not fields["text"].strip():
            counts["empty"] += 1
        else:
            labelled.append(Labelled(example, name, fields["tokens"], fields["text"]))
    return labelled, counts


def filter_by_wer(labelled: List[Labelled], threshold: float) -> Tuple[List[Labelled], int]:
    """Drop pseudo-labels whose WER against the reference is above threshold (the teacher got it wrong);
    examples without a reference, or whose reference normalises to nothing (no words to score), are kept
    as they are."""
    def wrong(x: Labelled) -> bool:
        if x.example.reference is None or not normalize(x.example.reference).strip():
            return False
        return word_error_rate([x.example.reference], [x.text])["wer"] > threshold

    kept = [x for x in labelled if not wrong(x)]
    return kept, len(labelled) - len(kept)


def with_human_labels(labelled: Sequence[Labelled], tokenizer: Tokenizer) -> List[Labelled]:
    """Every example with a reference gets it as its target, in the teacher's style where the two agree
    (human_labels.human_tokens); an example without one (unlabeled audio) keeps the teacher's transcript.
    The teacher's soft targets are then teacher-forced on these tokens (cache_targets)."""
    out = []
    for x in labelled:
        tokens = x.tokens if x.example.reference is None else human_tokens(tokenizer, x.tokens, x.example.reference,
                                                                             x.example.timestamps)
        if tokens != x.tokens:
            x = replace(x, tokens=tokens, text=tokenizer.decode(tokens).strip(), human=True)
        out.append(x)
    return out


def attach_prompts(labelled: Sequence[Labelled], sources: Sequence[Labelled], share: float,
                   n_text_ctx: int) -> List[Labelled]:
    """Give a share of the examples a prompt: the teacher's tokens for the utterances before it in its
    chapter (from `sources`, single utterances), the latest that the decoder is given.

    Why: transcribe() prompts every window after the first with the text so far. A student that never
    saw a prompt in training takes it for text still to come and loops (measured: one long-form window
    at the token limit with prompts, none without)."""
    chapters = defaultdict(list)  # chapter -> [(utterance id, teacher tokens)], in id order
    for x in sources:
        if len(x.example.audio) == 1:
            chapters[chapter_of(x.example.id)].append((x.example.id, x.tokens))
    for run in chapters.values():
        run.sort()
    prompted = []
    for x in labelled:
        first = x.example.id.split("+")[0]  # a window's id is its first utterance's id + "+n"
        if share_picks(x.example.id, share, salt="prompt"):
            before = [t for utterance_id, tokens in chapters[chapter_of(first)] if utterance_id < first for t in tokens]
            x = replace(x, prompt=tuple(before[-prompt_limit(n_text_ctx) :]))
        prompted.append(x)
    return prompted


def at_speeds(labelled: Sequence[Labelled], speeds: Sequence[float], timestamp_begin: int) -> List[Labelled]:
    """Every example once per speed (speed perturbation: more acoustic variety from the same speech), with the
    recording's label: the same words, its timestamps moved with the audio (a token at t s goes to t / speed).
    A copy that would not fit Whisper's 30 s window at its speed is left out. Teacher soft targets and
    encoder features are computed on the perturbed audio (cache_targets), so every signal matches it."""
    lengths = [recorded_samples(x.example.audio) for x in labelled] if set(speeds) != {1.0} else []
    out = []
    for speed in speeds:  # speed by speed: a run can reuse the cached items of another speed while it makes its own
        for x, length in zip(labelled, lengths or [None] * len(labelled)):
            if speed == 1.0:
                out.append(x)
                continue
            if length is None or length / speed > N_SAMPLES:
                continue
            tokens = retimed(x.tokens, speed, timestamp_begin) if x.example.timestamps else x.tokens
            out.append(replace(x, example=replace(x.example, speed=speed), tokens=tokens))
    return out


def retimed(tokens: Sequence[int], speed: float, timestamp_begin: int, last: int = N_FRAMES // 2) -> List[int]:
    """Timestamp tokens (ids from timestamp_begin, 20 ms each: two Mel frames) for audio played `speed` times
    as fast; text tokens unchanged. `last`: the largest timestamp (30 s)."""
    return [t if t < timestamp_begin else timestamp_begin + min(round((t - timestamp_begin) / speed), last)
            for t in tokens]


# ---------------------------------------------------------------------------------------------
# 2. Targets: the teacher's top-k logits on each label, and the frozen encoder's real-length output


@dataclass(frozen=True)
class TargetSettings:
    top_k: int  # teacher logits kept per token
    temperature: float  # the distillation temperature: the cache keeps each row's log-normaliser at it
    margins: Tuple[int, ...]  # encoder positions past the audio: one cached variant each (the jitter)
    frozen_encoder_layers: Optional[int]  # the student encoder's blocks whose output is cached (all: its
    # output; None: nothing cached, the student's encoder runs from the log-Mel in training)


def targets_key(teacher: Whisper, student: Whisper, settings: TargetSettings) -> dict:
    return dict(kind="targets", teacher=fingerprint_model(teacher), student_encoder=fingerprint_model(student.encoder),
                n_mels=teacher.dims.n_mels, sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP_LENGTH,
                top_k=settings.top_k, temperature=settings.temperature, margins=list(settings.margins),
                frozen_encoder_layers=settings.frozen_encoder_layers, version=2)  # 2: the teacher's block outputs


@torch.no_grad()
def cache_targets(teacher: Whisper, student: Whisper, tokenizer: Tokenizer, labelled: Sequence[Labelled],
                  labels: ArrayCache, cache: ArrayCache, settings: TargetSettings, log: Callable = print) -> List[str]:
    """Fill `cache` for every labelled example it lacks; return the items that hold targets."""
    todo = [x for x in labelled if not (cache.has(x.target_item) and cache.verify(x.target_item))]
    if todo:
        log(f"caching teacher logits and encoder features for {len(todo)} of {len(labelled)} examples "
            f"(cache: {cache.folder})")
    for x in tqdm(todo, desc="targets", file=sys.stderr, disable=not todo):
        try:
            audio = load_example_audio(x.example)
        except (OSError, AudioError) as err:  # readable at labelling time, gone since
            log(f"warning: skipping {x.example.id}: {err}")
            continue
        arrays = teacher_targets(teacher, tokenizer, x, audio, labels, settings.top_k, settings.temperature)
        for margin in settings.margins if settings.frozen_encoder_layers is not None else ():
            arrays[f"features_m{margin}"] = frozen_encoder_output(student, audio, margin,
                                                                  settings.frozen_encoder_layers)
        cache.put(x.target_item, arrays, dict(id=x.example.id))
    return [x.target_item for x in labelled if cache.has(x.target_item)]


def teacher_targets(teacher: Whisper, tokenizer: Tokenizer, x: Labelled, audio: np.ndarray, labels: ArrayCache,
                    k: int, temperature: float) -> dict:
    """What the teacher says at each labelled position of the target, teacher-forced (after the example's
    prompt) on its own 30 s encoder output (cached by labelling; computed here for a perturbed copy):
    - its k largest logits and their token ids: (n_labels, k) float16 and int32;
    - the log-normaliser of each full row at 1 and at the temperature: (n_labels,) float32, so the kept
      probabilities are exact;
    - its decoder's hidden state after each block: (n_labels, n_layers, D) float16, for intermediate-layer
      distillation (a student block learns what the teacher blocks it replaces compute)."""
    if x.example.speed == 1.0:
        features = torch.from_numpy(np.array(labels.load(x.item)["teacher_features"])).to(teacher.device, teacher.dtype)
    else:
        features = teacher.embed_audio(clip_mels([audio], teacher.dims.n_mels, teacher.device).to(teacher.dtype))[0]
    tokens, targets = training_tokens(tokenizer, x.tokens, x.example.timestamps, x.prompt)
    blocks = []
    hidden = teacher.decoder.hidden(torch.tensor([tokens], device=teacher.device), features[None], block_outputs=blocks)
    labelled = torch.tensor(targets) != IGNORE_LABEL
    logits = teacher.decoder.logits_of(hidden[0, labelled])  # (n_labels, V)
    block_hidden = torch.stack([h[0, labelled] for h in blocks], dim=1)  # (n_labels, n_layers, D)
    values, ids = logits.topk(k, dim=-1)
    values = values.half()  # what training reads: the normalisers are computed from the same rounded values
    logits = torch.cat([values.float(), logits.scatter(-1, ids, float("-inf"))], dim=-1)
    return dict(top_values=values.cpu().numpy(), top_ids=ids.int().cpu().numpy(),
                lse_1=logits.logsumexp(-1).cpu().numpy(), lse_t=(logits / temperature).logsumexp(-1).cpu().numpy(),
                hidden=block_hidden.half().cpu().numpy())


def frozen_encoder_output(student: Whisper, audio: np.ndarray, margin: int, frozen_layers: int) -> np.ndarray:
    """What the student's frozen encoder blocks make of the audio's real length plus `margin` positions:
    (positions, D) float16, the encoder's output when every block is frozen."""
    encoder = student.encoder
    positions = AudioContext("dynamic", margin).positions(frames_of_samples(len(audio)), student.dims.n_audio_ctx)
    mel = clip_mels([audio], student.dims.n_mels, student.device)[:, :, : 2 * positions].to(student.dtype)
    x = encoder.embed(mel)
    for block in encoder.blocks[:frozen_layers]:
        x = block(x)
    if frozen_layers == len(encoder.blocks):
        x = encoder.ln_post(x)
    return x[0].half().cpu().numpy()
