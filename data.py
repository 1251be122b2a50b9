"""Speech data on disk: where it lives and which utterances a source holds.

Three kinds of source, all giving the same `Utterance` records:
- a LibriSpeech-layout folder: <speaker>/<chapter>/<speaker>-<chapter>-<n>.flac + <speaker>-<chapter>.trans.txt
- a JSONL manifest: one {"audio": path, "text": transcript} object per line (paths relative to the manifest)
- a folder of audio files with .txt sidecars (clip.flac + clip.txt), searched recursively
This module knows files and transcripts, never models.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional

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
