"""Speech to text: batches of short clips, long recordings window by window, and the command line.

    python transcribe.py AUDIO... [--model base] [--beam-size 5] [--device cpu] [--format txt|srt|json]

- `transcribe_clips`: clips of up to 30 s, batched: one log-Mel call and one decode per batch.
- `transcribe`: audio of any length, by sequential 30 s windows. Each window is decoded with timestamps;
  the next window starts at the last complete timestamp pair, so no word is cut in two (openai/whisper's
  scheme), and the text so far is the prompt for the next window.

How much audio the encoder sees is the model's `audio_context`: 30 s windows for the official models;
for a student made for the real length, each clip (and the last, shorter window of a long recording) is
encoded at its own length plus the model's margin, with clips batched by length so little is padded.
"""
import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, load_audio, loudest_frame_db, pad_or_trim
from decoding import (
    NO_FALLBACK, TIME_PRECISION, DecodingOptions, DecodingResult, FallbackRules, decode_with_fallback, detect_language,
    sample_length,
)
from kernels import log_mel_spectrogram
from load import DTYPES, load_model
from model import AudioContext, Whisper
from quantize import DEFAULT_SCOPE, SCOPES, int8_for_decoding
from tokenizer import tokenizer_for

FRAMES_PER_TOKEN = 2  # the encoder's stride: one timestamp step (20 ms) is two Mel frames
SILENCE_DB = -60.0  # a window whose loudest 100 ms is quieter than this holds no speech: not decoded


def is_silent(waveform: np.ndarray) -> bool:
    return loudest_frame_db(waveform) < SILENCE_DB


def _as_waveform(audio) -> np.ndarray:
    if isinstance(audio, (str, Path)):
        return load_audio(audio)
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"expected non-empty mono audio (samples,), got shape {audio.shape}")
    return audio


def frames_of_samples(n_samples: int) -> int:
    """Mel frames (10 ms each) that hold a clip's audio."""
    return -(-n_samples // HOP_LENGTH)


def clip_mels(clips: Sequence[np.ndarray], n_mels: int, device) -> torch.Tensor:
    """Log-Mel of clips padded to 30 s: (B, n_mels, 3000), each normalised by its own maximum."""
    too_long = [i for i, clip in enumerate(clips) if len(clip) > N_SAMPLES]
    if too_long:
        raise ValueError(f"clips {too_long[:5]} are longer than 30 s: use transcribe() for long audio")
    batch = torch.from_numpy(np.stack([pad_or_trim(clip) for clip in clips])).to(device)
    return log_mel_spectrogram(batch, n_mels=n_mels)


@torch.no_grad()
def transcribe_clips(
    model: Whisper,
    clips: Sequence,
    options: DecodingOptions = DecodingOptions(without_timestamps=True),
    rules: FallbackRules = FallbackRules(),
    batch_size: int = 16,
) -> List[DecodingResult]:
    """One result per clip (<= 30 s each, arrays or paths), decoded batch_size at a time."""
    waveforms = [_as_waveform(c) for c in clips]
    results: List[DecodingResult] = [_silent_result(options) if is_silent(w) else None for w in waveforms]
    speech = [i for i, r in enumerate(results) if r is None]
    if model.audio_context.mode == "dynamic":  # neighbours in length share a batch: little is padded
        speech.sort(key=lambda i: len(waveforms[i]))
    for start in range(0, len(speech), batch_size):
        rows = speech[start : start + batch_size]
        mel, lengths = encoder_input(model, [waveforms[i] for i in rows])
        for i, result in zip(rows, decode_with_fallback(model, mel, options, rules, lengths)):
            results[i] = result
    return results


def encoder_input(model: Whisper, clips: Sequence[np.ndarray]):
    """What the encoder gets for a batch of clips under the model's audio context: (mel (B, n_mels, 2 S),
    positions per row (B,) or None). The Mel is always computed on the 30 s window, so each frame has the
    value it has there; a model made for the real length is given only its first positions."""
    mel = clip_mels(clips, model.dims.n_mels, model.device)  # (B, n_mels, 3000)
    if model.audio_context.mode == "fixed":
        return mel, None
    positions = [model.audio_positions(frames_of_samples(len(clip))) for clip in clips]
    return mel[:, :, : 2 * max(positions)], torch.tensor(positions, device=model.device)


def _silent_result(options: DecodingOptions) -> DecodingResult:
    return DecodingResult(
        tokens=[], text="", language=options.language or "en", avg_logprob=0.0,
        no_speech_prob=1.0, temperature=0.0, compression_ratio=0.0,
    )


@torch.no_grad()
def transcribe(
    model: Whisper,
    audio,
    options: DecodingOptions = DecodingOptions(),
    rules: FallbackRules = FallbackRules(),
    condition_on_previous_text: bool = True,
    initial_prompt: Optional[str] = None,
) -> dict:
    """Transcribe audio of any length. Returns {"text", "language", "segments": [{start, end, text, ...}],
    "windows": [{seek, tokens, temperature, at_limit}]} (at_limit: the window produced the most tokens a
    window may, which is how a loop shows)."""
    waveform = _as_waveform(audio)
    # One log-Mel for the whole recording (30 s of silence appended so the last window is full).
    padded = torch.from_numpy(np.concatenate([waveform, np.zeros(N_SAMPLES, np.float32)])).to(model.device)
    mel = log_mel_spectrogram(padded, n_mels=model.dims.n_mels)  # (n_mels, frames)
    content_frames = mel.shape[-1] - N_FRAMES
    if options.language is None and model.is_multilingual:  # one language for the whole recording
        features = model.embed_audio(mel[None, :, :N_FRAMES].to(model.dtype))
        multilingual = tokenizer_for(model)
        options = replace(options, language=detect_language(model, features, multilingual)[0][0])
    language = options.language or "en"
    tokenizer = tokenizer_for(model, language=language, task=options.task)

    seek, segments, all_tokens, prompt_start, windows = 0, [], [], 0, []
    limit = sample_length(options, model.dims.n_text_ctx)
    initial = tokenizer.encode(" " + initial_prompt.strip()) if initial_prompt else []
    while seek < content_frames:
        window_size = min(N_FRAMES, content_frames - seek)
        if is_silent(waveform[seek * HOP_LENGTH : (seek + window_size) * HOP_LENGTH]):
            seek += window_size
            continue
        window = pad_or_trim(mel[:, seek : seek + N_FRAMES], N_FRAMES)
        if window_size < N_FRAMES:  # the last window: a model made for the real length sees only its audio
            window = window[:, : 2 * model.audio_positions(window_size)]
        prompt = initial + all_tokens[prompt_start:]
        result = decode_with_fallback(model, window, replace(options, prompt=prompt or None), rules)[0]
        windows.append(dict(seek=seek, tokens=len(result.tokens), temperature=result.temperature,
                            at_limit=len(result.tokens) >= limit))
        if rules.is_silence(result):
            seek += window_size
            continue
        new_segments, advance = _split_segments(result, tokenizer, seek, window_size)
        segments += new_segments
        all_tokens += [t for s in new_segments for t in s["tokens"]]
        seek += advance
        if not condition_on_previous_text or result.temperature > 0.5:
            prompt_start = len(all_tokens)  # a hot (unreliable) window must not steer the next
    for i, segment in enumerate(segments):
        segment["id"] = i
    return {"text": "".join(s["text"] for s in segments), "language": language, "segments": segments,
            "windows": windows}


def _split_segments(result: DecodingResult, tokenizer, seek: int, window_size: int):
    """Cut a window's tokens into timestamped segments; return them and how many frames to advance."""
    tokens = torch.tensor(result.tokens, dtype=torch.long)
    time_offset = seek * HOP_LENGTH / SAMPLE_RATE
    is_timestamp = tokens.ge(tokenizer.timestamp_begin)
    ends_with_single_timestamp = is_timestamp[-2:].tolist() == [False, True]
    pair_ends = (torch.where(is_timestamp[:-1] & is_timestamp[1:])[0] + 1).tolist()

    def segment(start: float, end: float, seg_tokens: List[int]) -> dict:
        text_tokens = [t for t in seg_tokens if t < tokenizer.eot]
        text = tokenizer.decode(text_tokens)
        if start == end or not text.strip():  # instantaneous or empty: keep the time, drop the text
            text, seg_tokens = "", []
        return dict(
            seek=seek, start=round(start, 3), end=round(end, 3), text=text, tokens=seg_tokens,
            temperature=result.temperature, avg_logprob=result.avg_logprob,
            compression_ratio=result.compression_ratio, no_speech_prob=result.no_speech_prob,
        )

    def time_of(token: int) -> float:
        return time_offset + (token - tokenizer.timestamp_begin) * TIME_PRECISION

    if pair_ends:
        if ends_with_single_timestamp:
            pair_ends.append(len(tokens))
        segments, last = [], 0
        for end in pair_ends:
            piece = result.tokens[last:end]
            segments.append(segment(time_of(piece[0]), time_of(piece[-1]), piece))
            last = end
        if ends_with_single_timestamp:  # the text ran to the end of the window
            return segments, window_size
        # Resume at the last complete timestamp: the rest of this window is decoded again next time.
        return segments, (result.tokens[last - 1] - tokenizer.timestamp_begin) * FRAMES_PER_TOKEN

    duration = window_size * HOP_LENGTH / SAMPLE_RATE
    timestamps = tokens[is_timestamp].tolist()
    if timestamps and timestamps[-1] != tokenizer.timestamp_begin:
        duration = (timestamps[-1] - tokenizer.timestamp_begin) * TIME_PRECISION
    return [segment(time_offset, time_offset + duration, result.tokens)], window_size


# ---------------------------------------------------------------------------------------------
# Output formats


def format_timestamp(seconds: float, decimal_marker: str = ",") -> str:
    milliseconds = round(seconds * 1000)
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    seconds, milliseconds = divmod(milliseconds, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}{decimal_marker}{milliseconds:03d}"


def to_srt(result: dict) -> str:
    blocks, n = [], 0
    for segment in result["segments"]:
        if not segment["text"].strip():
            continue
        n += 1
        span = f"{format_timestamp(segment['start'])} --> {format_timestamp(segment['end'])}"
        blocks.append(f"{n}\n{span}\n{segment['text'].strip()}\n")
    return "\n".join(blocks)


def to_json(path: str, result: dict) -> dict:
    keep = ("id", "start", "end", "text", "avg_logprob", "no_speech_prob", "temperature", "compression_ratio")
    return {
        "file": path, "language": result["language"], "text": result["text"].strip(),
        "segments": [{k: s[k] for k in keep} for s in result["segments"]],
    }


def add_model_arguments(parser: argparse.ArgumentParser):
    """--model, --device, --dtype and --int8: the flags of every CLI that decodes (this one and evaluate.py)."""
    parser.add_argument("--model", default="base", help="model name (tiny.en, base, ...) or checkpoint path")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="weights and activations (default: float16 on CUDA, float32 on CPU; bfloat16 is faster on CPUs with AVX512-BF16)")
    parser.add_argument("--int8", choices=list(SCOPES), default=None, metavar="SCOPE",
                        help="CPU, float32 model: the products of SCOPE read int8 weights (quantize.py); a decoded "
                             f"token costs less, WER rises: {'; '.join(f'{k}: {v}' for k, v in SCOPES.items()).replace('%', '%%')} "
                             f"({DEFAULT_SCOPE} is the one we recommend)")
    add_audio_context_arguments(parser)


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 0, got {text}")
    return value


def add_audio_context_arguments(parser: argparse.ArgumentParser, whose: str = "the model's",
                                margin_default: str = "the model's") -> None:
    """--audio-ctx and --audio-margin (see audio_context_override): for one model here, for every model
    in bench.py."""
    parser.add_argument("--audio-ctx", choices=("fixed", "dynamic"), default=None,
                        help=f"override {whose} audio context: 30 s windows, or the real length plus a margin "
                             "(default: what the checkpoint says; official models: fixed)")
    parser.add_argument("--audio-margin", type=non_negative_int, default=None,
                        help=f"under a dynamic context: encoder positions (20 ms) past the audio (default: "
                             f"{margin_default})")


def load_model_for_decoding(args: argparse.Namespace) -> Whisper:
    """The model those flags name, set up for inference; a bad name or checkpoint exits with its error."""
    try:
        model = load_model(args.model, device=args.device, dtype=args.dtype and DTYPES[args.dtype])
    except (OSError, ValueError) as err:  # unknown name, missing package, broken checkpoint
        sys.exit(f"error: {err}")
    if args.audio_ctx is not None:
        model.audio_context = audio_context_override(model, args.audio_ctx, args.audio_margin)
    model.optimize_for_decoding()
    try:
        return int8_for_decoding(model, args.int8) if args.int8 else model
    except ValueError as err:  # not CPU float32, or no int8 engine in this build
        sys.exit(f"error: --int8: {err}")


def audio_context_override(model: Whisper, mode: str, margin: Optional[int]) -> AudioContext:
    """--audio-ctx/--audio-margin for experiments; the margin defaults to the model's own."""
    margin = model.audio_context.margin if margin is None else margin
    return AudioContext(mode, min(margin, model.dims.n_audio_ctx) if mode == "dynamic" else 0)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Transcribe audio files with Whisper.")
    parser.add_argument("audio", nargs="+", help="audio files (any rate or channel count soundfile reads)")
    add_model_arguments(parser)
    parser.add_argument("--beam-size", type=int, default=None, help="beam search width (default: greedy)")
    parser.add_argument("--patience", type=float, default=None, help="beam search patience")
    parser.add_argument("--best-of", type=int, default=5, help="samples per window when falling back to temperature > 0")
    parser.add_argument("--language", default=None, help="spoken language (default: detect, or en for .en models)")
    parser.add_argument("--task", default="transcribe", choices=["transcribe", "translate"])
    parser.add_argument("--format", default="txt", choices=["txt", "srt", "json"])
    parser.add_argument("--no-fallback", action="store_true", help="decode at temperature 0 only")
    parser.add_argument("--no-condition", action="store_true", help="do not prompt each window with the text before it")
    parser.add_argument("--initial-prompt", default=None, help="text to prompt the first window with")
    parser.add_argument("--static-step", action="store_true", help="fixed-shape decoder steps, replayed as a CUDA graph on GPU")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling used by temperature fallback")
    args = parser.parse_args(argv)

    model = load_model_for_decoding(args)
    options = DecodingOptions(
        task=args.task, language=args.language, beam_size=args.beam_size, patience=args.patience,
        best_of=args.best_of, static_step=args.static_step, seed=args.seed,
    )
    rules = NO_FALLBACK if args.no_fallback else FallbackRules()
    failures = 0
    for path in args.audio:
        try:
            result = transcribe(model, path, options, rules, not args.no_condition, args.initial_prompt)
        except (OSError, ValueError) as err:
            print(f"error: {path}: {err}", file=sys.stderr)
            failures += 1
            continue
        if args.format == "json":
            print(json.dumps(to_json(path, result), ensure_ascii=False))
        elif args.format == "srt":
            print(to_srt(result))
        else:
            prefix = f"{path}: " if len(args.audio) > 1 else ""
            print(prefix + result["text"].strip())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
