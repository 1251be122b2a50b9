"""Speech data on disk: where it lives and which utterances a source holds.

Three kinds of source, all giving the same `Utterance` records:
- a LibriSpeech-layout folder: <speaker>/<chapter>/<speaker>-<chapter>-<n>.flac + <speaker>-<chapter>.trans.txt
- a JSONL manifest: one {"audio": path, "text": transcript} object per line (paths relative to the manifest)
- a folder of audio files with .txt sidecars (clip.flac + clip.txt), searched recursively
This module knows files and transcripts, never models.
"""
import json
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

import torch

from audio import N_SAMPLES, SAMPLE_RATE, AudioError, load_audio

DATA_ENV = "FASTWHISPER_DATA"
AUDIO_SUFFIXES = (".flac", ".wav", ".ogg", ".mp3", ".opus", ".aiff", ".aif")
DEV_SPEAKERS = ("669", "3242")  # convention: these two train-clean-5 speakers are the dev set


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
        utterances.append(Utterance(audio.stem, audio, text))
    return utterances


# ---------------------------------------------------------------------------------------------
# Training data: waveforms and token sequences, batched by length. Log-Mel is computed by the
# training loop on whole batches (on GPU, by the fused kernel), not here.


IGNORE_LABEL = -100  # label of positions that carry no loss (the prompt, padding)


def training_tokens(tokenizer, text: str, max_length: int = 448) -> Tuple[List[int], List[int]]:
    """Decoder input and labels for a transcript, with Whisper's prompt and no timestamps.

    input:  <|sot|> [lang task] <|notimestamps|> t1 ... tn
    labels:   -     ...            t1           t2 ... eot     (the prompt itself carries no loss)
    """
    prompt = list(tokenizer.sot_sequence_including_notimestamps)
    text_tokens = tokenizer.encode(" " + text.strip())[: max_length - len(prompt)]
    tokens = prompt + text_tokens
    labels = [IGNORE_LABEL] * (len(prompt) - 1) + text_tokens + [tokenizer.eot]
    return tokens, labels


class SpeechDataset:
    """(utterance, target text) pairs -> dicts of waveform, tokens and labels; unreadable files give None."""

    def __init__(self, examples: List[Tuple[Utterance, str]], tokenizer, max_seconds: float = 30.0):
        self.examples = examples
        self.tokenizer = tokenizer
        self.max_samples = int(max_seconds * SAMPLE_RATE)
        self.token_lengths = [len(training_tokens(tokenizer, text)[0]) for _, text in examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Optional[dict]:
        utterance, text = self.examples[index]
        try:
            audio = load_audio(utterance.audio)
        except (OSError, AudioError) as err:  # a bad file costs one example, never the epoch
            warnings.warn(f"skipping unreadable {utterance.audio}: {err}")
            return None
        if len(audio) > self.max_samples:
            warnings.warn(f"skipping {utterance.audio}: longer than {self.max_samples / SAMPLE_RATE:.0f} s")
            return None
        tokens, labels = training_tokens(self.tokenizer, text)
        return dict(id=utterance.id, audio=audio, tokens=tokens, labels=labels)


def collate(items: List[Optional[dict]], n_samples: int = N_SAMPLES, pad_token: int = 50256) -> dict:
    """Stack a batch: audio (B, n_samples) zero-padded + lengths (B,), tokens/labels (B, T) padded.

    `skipped` counts the items that could not be read, so the training loop can report them.
    """
    good = [item for item in items if item is not None]
    batch = dict(skipped=len(items) - len(good), ids=[item["id"] for item in good])
    if not good:
        return batch
    width = max(len(item["tokens"]) for item in good)
    audio = torch.zeros(len(good), n_samples)
    tokens = torch.full((len(good), width), pad_token, dtype=torch.long)
    labels = torch.full((len(good), width), IGNORE_LABEL, dtype=torch.long)
    for row, item in enumerate(good):
        audio[row, : len(item["audio"])] = torch.from_numpy(item["audio"])
        tokens[row, : len(item["tokens"])] = torch.tensor(item["tokens"])
        labels[row, : len(item["labels"])] = torch.tensor(item["labels"])
    lengths = torch.tensor([len(item["audio"]) for item in good])
    batch.update(audio=audio, lengths=lengths, tokens=tokens, labels=labels)
    return batch


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


class PseudoLabelCache:
    """Teacher transcripts on disk (JSON), keyed by teacher, file path, size and mtime: computed once."""

    def __init__(self, path):
        self.path = Path(path)
        self.labels = json.loads(self.path.read_text()) if self.path.exists() else {}

    @staticmethod
    def key(teacher: str, audio: Path) -> str:
        stat = Path(audio).stat()
        return f"{teacher}|{Path(audio).resolve()}|{stat.st_size}|{int(stat.st_mtime)}"

    def get(self, teacher: str, audio: Path) -> Optional[dict]:
        """{"text": ...}, {"error": ...} for a file that could not be read, or None if not labelled yet."""
        try:
            return self.labels.get(self.key(teacher, audio))
        except OSError:  # the file has gone since: treat as unreadable, never crash
            return {"error": f"{audio} cannot be read"}

    def put(self, teacher: str, audio: Path, entry: dict):
        try:
            self.labels[self.key(teacher, audio)] = entry
        except OSError:
            pass  # missing file: nothing to key it by; get() reports it as unreadable

    def save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.labels, indent=0, ensure_ascii=False))
        temporary.replace(self.path)  # atomic: a crash never leaves half a cache
