"""Speech data on disk: where it lives and which utterances a source holds.

Three kinds of source, all giving the same `Utterance` records:
- a LibriSpeech-layout folder: <speaker>/<chapter>/<speaker>-<chapter>-<n>.flac + <speaker>-<chapter>.trans.txt
- a JSONL manifest: one {"audio": path, "text": transcript} object per line (paths relative to the manifest)
- a folder of audio files with .txt sidecars (clip.flac + clip.txt), searched recursively; a file named
  like a LibriSpeech utterance (speaker-chapter-n) gets its speaker from the name, so speaker filters and
  the 30 s windows of consecutive utterances of a chapter work on such a folder too
This module knows files and transcripts, never models.
"""
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from audio import N_SAMPLES

DATA_ENV = "FASTWHISPER_DATA"
AUDIO_SUFFIXES = (".flac", ".wav", ".ogg", ".mp3", ".opus", ".aiff", ".aif")
DEV_SPEAKERS = ("669", "3242")  # convention: these two train-clean-5 speakers are the dev set (for choosing)
TEST_SPEAKERS = ("226", "332", "460")  # of train-clean-5-opus: the test split, scored only for final comparisons,
# never trained on and never used to choose anything (8,790 words: four times the dev set)
TEST_SOURCE = "train-clean-5-opus"  # under the data folder: where the test speakers are
LIBRISPEECH_ID = re.compile(r"^(\d+)-(\d+)-(\d+)$")  # speaker-chapter-n


def data_root() -> Path:
    """The shared speech folder: $FASTWHISPER_DATA, else ../shared/data beside this repository."""
    default = Path(__file__).resolve().parent.parent / "shared" / "data"
    return Path(os.environ.get(DATA_ENV, default)).expanduser().resolve()


@dataclass(frozen=True)
class Utterance:
    id: str
    audio: Path
    text: Optional[str]  # reference transcript; None when the source has none
    speaker: Optional[str] = None


def held_out_test() -> List[Utterance]:
    """The held-out test utterances: TEST_SPEAKERS of TEST_SOURCE under the data folder."""
    return list_utterances(data_root() / TEST_SOURCE, speakers=TEST_SPEAKERS)


def list_utterances(
    source,
    speakers: Optional[Iterable[str]] = None,
    exclude_speakers: Optional[Iterable[str]] = None,
    limit: Optional[int] = None,
) -> List[Utterance]:
    """All utterances of a folder or manifest, sorted by id, optionally filtered by speaker."""
    source = Path(source).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"data source not found: {source}")
    if source.is_file():
        utterances = _read_manifest(source)
    elif any(source.rglob("*.trans.txt")):
        utterances = _read_librispeech(source)
    else:
        utterances = _read_sidecar_folder(source)
    if speakers is not None:
        keep = set(map(str, speakers))
        utterances = [u for u in utterances if u.speaker in keep]
    if exclude_speakers is not None:
        drop = set(map(str, exclude_speakers))
        utterances = [u for u in utterances if u.speaker not in drop]
    if not utterances:
        raise ValueError(f"no utterances found in {source}")
    return utterances[:limit] if limit else utterances


def _read_librispeech(folder: Path) -> List[Utterance]:
    utterances = []
    for transcript_file in sorted(folder.rglob("*.trans.txt")):
        for line in transcript_file.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            utt_id, _, text = line.strip().partition(" ")
            audio = transcript_file.parent / f"{utt_id}.flac"
            utterances.append(Utterance(utt_id, audio, text, speaker=utt_id.split("-")[0]))
    return sorted(utterances, key=lambda u: u.id)


def _read_manifest(path: Path) -> List[Utterance]:
    utterances = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            audio = Path(record["audio"]).expanduser()
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{n}: expected a JSON object with an 'audio' field ({err})") from None
        if not audio.is_absolute():
            audio = path.parent / audio
        utt_id = str(record.get("id", audio.stem))
        utterances.append(Utterance(utt_id, audio, record.get("text"), record.get("speaker")))
    return utterances


def _read_sidecar_folder(folder: Path) -> List[Utterance]:
    utterances = []
    for audio in sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES):
        sidecar = audio.with_suffix(".txt")
        text = sidecar.read_text(encoding="utf-8").strip() if sidecar.exists() else None
        librispeech = LIBRISPEECH_ID.match(audio.stem)
        utterances.append(Utterance(audio.stem, audio, text, speaker=librispeech.group(1) if librispeech else None))
    return utterances


# ---------------------------------------------------------------------------------------------
# Training data: token sequences, batched by length; SpecAugment for the modes that see the log-Mel.


IGNORE_LABEL = -100  # label of positions that carry no loss (the prompt, padding)


def training_tokens(tokenizer, target: List[int], timestamps: bool = False, prompt: Sequence[int] = (),
                    max_length: int = 448) -> Tuple[List[int], List[int]]:
    """Decoder input and labels for a target's token ids (text, or text and timestamp tokens), with
    Whisper's start: <|notimestamps|> ends it unless the target carries timestamps. A prompt (the text
    before the audio, as transcribe() gives each window after the first) goes in front, after <|startofprev|>.

    input:  [<|startofprev|> p1 ... pm] <|sot|> [lang task] [<|notimestamps|>] t1 ... tn
    labels:   -                  ...       -    ...               t1           t2 ... eot
    (the prompt and the start carry no loss)
    """
    start = list(tokenizer.sot_sequence if timestamps else tokenizer.sot_sequence_including_notimestamps)
    if prompt:
        start = [tokenizer.sot_prev, *prompt] + start
    target = list(target)[: max_length - len(start)]
    tokens = start + target
    labels = [IGNORE_LABEL] * (len(start) - 1) + target + [tokenizer.eot]
    return tokens, labels


def length_bucketed_batches(
    lengths: List[int], batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> List[List[int]]:
    """This rank's batches for one epoch, the same on every run with the same seed and epoch.

    Examples are shuffled, cut into pools of 50 batches, sorted by length within a pool (so a batch
    pads little), and the batches shuffled again. Every rank gets the same number of batches.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = batch_size * 50
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    per_rank = len(batches) // world_size
    if per_rank == 0:
        raise ValueError(f"{len(lengths)} examples make {len(batches)} batches: too few for {world_size} processes")
    return batches[rank::world_size][:per_rank]


def spec_augment(mel, lengths_frames, generator, freq_masks: int = 2, freq_width: int = 27, time_masks: int = 2, time_ratio: float = 0.05):
    """SpecAugment (Park et al. 2019): blank random Mel bands and time spans, in place.

    mel (B, n_mels, frames); lengths_frames (B,) frames of real audio; masks are filled with each
    utterance's mean so they look like neither speech nor Whisper's padding.
    """
    n_mels = mel.shape[1]
    for row in range(mel.shape[0]):
        fill = mel[row].mean()
        for _ in range(freq_masks):
            width = int(torch.randint(0, freq_width + 1, (1,), generator=generator))
            start = int(torch.randint(0, max(n_mels - width, 1), (1,), generator=generator))
            mel[row, start : start + width, :] = fill
        valid = int(lengths_frames[row])
        for _ in range(time_masks):
            width = int(torch.randint(0, max(int(valid * time_ratio), 1) + 1, (1,), generator=generator))
            start = int(torch.randint(0, max(valid - width, 1), (1,), generator=generator))
            mel[row, :, start : start + width] = fill
    return mel


# ---------------------------------------------------------------------------------------------
# Long-form examples: real 30 s windows, not padding, from consecutive utterances of a chapter.


@dataclass(frozen=True, eq=False)
class Window:
    ids: Tuple[str, ...]  # the utterances joined, in order
    audio: np.ndarray  # their waveforms end to end, float32 16 kHz mono
    text: str  # their transcripts joined by spaces, so the reference stays exact


def chapter_of(utterance_id: str) -> str:
    """A LibriSpeech id is speaker-chapter-n: its chapter is all but n."""
    return utterance_id.rsplit("-", 1)[0]


def window_runs(utterances: List[Tuple[str, int]], n: Optional[int] = None,
                max_samples: int = N_SAMPLES) -> List[List[int]]:
    """Which utterances to join: the n longest runs (all, if n is None) of consecutive (id, n_samples)
    utterances of one chapter that fit in max_samples (Whisper's 30 s window), as index lists in id
    order. Utterances are taken whole, in the order given (chapter_of tells their chapter)."""
    def samples(run):
        return sum(utterances[i][1] for i in run)

    runs = []
    for index, (utt_id, length) in enumerate(utterances):
        run = runs[-1] if runs else []
        if run and chapter_of(utterances[run[-1]][0]) == chapter_of(utt_id) and samples(run) + length <= max_samples:
            run.append(index)
        else:
            runs.append([index])
    longest = sorted(runs, key=samples, reverse=True)[:n]  # stable: ties keep id order
    return sorted(longest, key=lambda run: run[0])


def joined_windows(utterances: List[Tuple[str, np.ndarray, str]], n: int,
                   max_samples: int = N_SAMPLES) -> List[Window]:
    """The n longest runs of consecutive (id, audio, text) utterances of one chapter that fit in
    max_samples, each joined end to end (see window_runs)."""
    runs = window_runs([(utt_id, len(audio)) for utt_id, audio, _ in utterances], n, max_samples)
    return [Window(tuple(utterances[i][0] for i in run), np.concatenate([utterances[i][1] for i in run]),
                   " ".join(utterances[i][2] for i in run)) for run in runs]
