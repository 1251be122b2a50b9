"""Word error rate of a model on a speech set.

    python evaluate.py --model base --data ../shared/data/test-clean [--limit N] [--batch-size 16] [--json report.json]

Both sides are put through Whisper's English text normaliser (case, punctuation, spelled-out numbers,
British spellings...) before jiwer counts substitutions, deletions and insertions, so "Mr. Smith paid
$20." and "MISTER SMITH PAID TWENTY DOLLARS" agree. Clips up to 30 s are decoded in batches; longer
recordings go window by window through transcribe().
"""
import argparse
import json
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import List

import jiwer
import torch
from tqdm import tqdm

from audio import SAMPLE_RATE, N_SAMPLES, AudioError, load_audio
from data import Utterance, list_utterances
from decoding import NO_FALLBACK, DecodingOptions, FallbackRules
from model import Whisper
from normalizer import EnglishTextNormalizer
from transcribe import add_model_arguments, load_model_for_decoding, transcribe, transcribe_clips

normalize = EnglishTextNormalizer()


def word_error_rate(references: List[str], hypotheses: List[str]) -> dict:
    """WER and its parts over normalised text; utterances whose reference normalises to nothing are not counted."""
    pairs = [(normalize(r), normalize(h)) for r, h in zip(references, hypotheses)]
    pairs = [(r, h) for r, h in pairs if r.strip()]
    if not pairs:
        raise ValueError("no utterance with a non-empty reference to score")
    out = jiwer.process_words([r for r, _ in pairs], [h for _, h in pairs])
    n_words = out.hits + out.substitutions + out.deletions
    return dict(
        wer=out.wer, substitutions=out.substitutions, deletions=out.deletions,
        insertions=out.insertions, hits=out.hits, reference_words=n_words,
    )


def _load_all(utterances: List[Utterance]):
    """Waveforms of the readable files; the rest are reported, not fatal."""
    loaded, skipped = [], []
    for utt in utterances:
        try:
            loaded.append((utt, load_audio(utt.audio)))
        except (OSError, AudioError) as err:
            warnings.warn(f"skipping {utt.audio}: {err}")
            skipped.append({"id": utt.id, "audio": str(utt.audio), "error": str(err)})
    return loaded, skipped


@torch.no_grad()
def evaluate(
    model: Whisper,
    utterances: List[Utterance],
    options: DecodingOptions = DecodingOptions(without_timestamps=True),
    rules: FallbackRules = FallbackRules(),
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Transcribe every utterance and score it: the report evaluate.py writes as JSON."""
    loaded, skipped = _load_all([u for u in utterances if u.text is not None])
    if not loaded:
        raise ValueError("no readable utterance with a reference transcript")
    clips = [(u, a) for u, a in loaded if len(a) <= N_SAMPLES]
    long = [(u, a) for u, a in loaded if len(a) > N_SAMPLES]
    hypotheses = {}
    start = time.perf_counter()
    with tqdm(total=len(loaded), desc="evaluate", unit="utt", disable=not progress, file=sys.stderr) as bar:
        for i in range(0, len(clips), batch_size):
            batch = clips[i : i + batch_size]
            results = transcribe_clips(model, [a for _, a in batch], options, rules, batch_size)
            hypotheses.update({u.id: r.text for (u, _), r in zip(batch, results)})
            bar.update(len(batch))
        for utt, waveform in long:
            # Long recordings advance window by window on timestamps, so those stay on here.
            hypotheses[utt.id] = transcribe(model, waveform, replace(options, without_timestamps=False), rules)["text"].strip()
            bar.update(1)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    audio_seconds = sum(len(a) for _, a in loaded) / SAMPLE_RATE

    scored = [u for u, _ in loaded]
    report = word_error_rate([u.text for u in scored], [hypotheses[u.id] for u in scored])
    report.update(
        n_utterances=len(scored), audio_seconds=round(audio_seconds, 3),
        elapsed_seconds=round(elapsed, 3), rtf=elapsed / audio_seconds, skipped=skipped,
        utterances=[_utterance_report(u, hypotheses[u.id]) for u in scored],
    )
    return report


def long_form(model: Whisper, recordings: List[Utterance], options: DecodingOptions = DecodingOptions(language="en"),
              rules: FallbackRules = NO_FALLBACK) -> dict:
    """Recordings transcribed as a user would (transcribe(): 30 s windows, each prompted with the text
    before it; no fallback by default, so nothing hides a loop): the WER over all of them, and for each
    its WER, windows, and windows that reached the token limit (a loop). Unreadable recordings are skipped
    and listed (wer is None when none could be read)."""
    loaded, skipped = _load_all([u for u in recordings if u.text is not None])
    texts, each = [], {}
    for u, waveform in loaded:
        result = transcribe(model, waveform, options, rules)
        texts.append(result["text"].strip())
        windows = result["windows"]
        each[u.id] = dict(wer=word_error_rate([u.text], [texts[-1]])["wer"], windows=len(windows),
                          at_limit=sum(w["at_limit"] for w in windows),
                          max_tokens=max((w["tokens"] for w in windows), default=0))
    total = word_error_rate([u.text for u, _ in loaded], texts)["wer"] if loaded else None
    return dict(wer=total, at_limit=sum(r["at_limit"] for r in each.values()), recordings=each, skipped=skipped)


def _utterance_report(utt: Utterance, hypothesis: str) -> dict:
    reference, normalised = normalize(utt.text), normalize(hypothesis)
    if not reference.strip():
        return dict(id=utt.id, audio=str(utt.audio), reference=utt.text, hypothesis=hypothesis, wer=None)
    out = jiwer.process_words(reference, normalised)
    errors, words = out.substitutions + out.deletions + out.insertions, out.hits + out.substitutions + out.deletions
    return dict(id=utt.id, audio=str(utt.audio), reference=utt.text, hypothesis=hypothesis, wer=errors / words,
                errors=errors, words=words)


def paired_bootstrap(a: List[dict], b: List[dict], samples: int = 10_000, seed: int = 0) -> dict:
    """WER(a) - WER(b) over the utterances both reports scored, with a 95 % interval from resampling those
    utterances (Koehn 2004's paired bootstrap): a and b are evaluate() reports' "utterances". An interval
    that holds 0 means the set cannot tell the two apart."""
    b_by_id = {u["id"]: u for u in b if u.get("words")}
    pairs = [(u, b_by_id[u["id"]]) for u in a if u.get("words") and u["id"] in b_by_id]
    if not pairs:
        raise ValueError("the two reports share no scored utterance (reports from before per-utterance counts?)")
    errors_a = torch.tensor([float(x["errors"]) for x, _ in pairs], dtype=torch.float64)
    errors_b = torch.tensor([float(y["errors"]) for _, y in pairs], dtype=torch.float64)
    words = torch.tensor([float(x["words"]) for x, _ in pairs], dtype=torch.float64)
    draws = torch.randint(len(pairs), (samples, len(pairs)), generator=torch.Generator().manual_seed(seed))
    differences = (errors_a[draws].sum(1) - errors_b[draws].sum(1)) / words[draws].sum(1)  # (samples,)
    low, high = torch.quantile(differences, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return dict(difference=float((errors_a.sum() - errors_b.sum()) / words.sum()), low=low, high=high,
                utterances=len(pairs), words=int(words.sum()))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Word error rate of a Whisper model on a speech set.")
    add_model_arguments(parser)
    parser.add_argument("--data", nargs="+", help="LibriSpeech-layout folder(s), JSONL manifest(s), or folder(s) with .txt sidecars")
    parser.add_argument("--speakers", default=None, help="comma-separated speaker ids to keep (LibriSpeech)")
    parser.add_argument("--exclude-speakers", default=None, help="comma-separated speaker ids to leave out")
    parser.add_argument("--limit", type=int, default=None, help="first N utterances only")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--beam-size", type=int, default=None, help="beam search width (default: greedy)")
    parser.add_argument("--language", default="en", help="spoken language (default: en; 'auto' to detect)")
    parser.add_argument("--no-fallback", action="store_true", help="temperature 0 only, no fallback")
    parser.add_argument("--json", default=None, help="write the full report (per-utterance hypotheses) here")
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), default=None,
                        help="instead of evaluating: WER(A) - WER(B) of two --json reports, with a 95%% paired "
                             "bootstrap interval over their common utterances")
    args = parser.parse_args(argv)
    if args.compare:
        return print_comparison(*args.compare)

    if not args.data:
        parser.error("--data is required (unless --compare)")
    split = lambda s: s.split(",") if s else None  # noqa: E731
    utterances = [u for source in args.data for u in list_utterances(source, split(args.speakers), split(args.exclude_speakers))]
    utterances = utterances[: args.limit] if args.limit else utterances
    model = load_model_for_decoding(args)
    language = None if args.language == "auto" else args.language
    options = DecodingOptions(language=language, beam_size=args.beam_size, without_timestamps=True)
    report = evaluate(model, utterances, options, NO_FALLBACK if args.no_fallback else FallbackRules(), args.batch_size)
    report = {"model": str(args.model), "data": args.data, "device": str(model.device), **report}

    print(
        f"WER {100 * report['wer']:.2f}% on {report['n_utterances']} utterances ({report['reference_words']} words): "
        f"{report['substitutions']} substitutions, {report['deletions']} deletions, {report['insertions']} insertions; "
        f"RTF {report['rtf']:.3f} ({report['elapsed_seconds']:.1f} s for {report['audio_seconds']:.1f} s of audio)"
    )
    if report["skipped"]:
        print(f"skipped {len(report['skipped'])} unreadable file(s): see the warnings above", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False))
        print(f"report written to {args.json}")
    return 0


def compare_reports(path_a, path_b) -> dict:
    """paired_bootstrap of two evaluate.py --json reports; ValueError, saying which, if one is unreadable."""
    utterances = []
    for path in (path_a, path_b):
        try:
            utterances.append(json.loads(Path(path).read_text())["utterances"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a readable evaluate.py --json report ({err!r})") from None
    try:
        return paired_bootstrap(*utterances)
    except (KeyError, TypeError, AttributeError) as err:  # parsed, but not per-utterance counts
        raise ValueError(f"{path_a}, {path_b}: utterances without per-utterance counts ({err!r})") from None


def describe_comparison(result: dict, names=("the first", "the second")) -> str:
    """A paired_bootstrap result of names[0] - names[1] in words, and whether the set can tell them apart."""
    verdict = ("the set cannot tell them apart" if result["low"] <= 0 <= result["high"] else
               f"{names[0]} is better" if result["high"] < 0 else f"{names[1]} is better")
    return (f"{100 * result['difference']:+.2f} points, 95% interval [{100 * result['low']:+.2f}, "
            f"{100 * result['high']:+.2f}] (paired bootstrap over {result['utterances']} utterances, "
            f"{result['words']} words): {verdict}")


def print_comparison(path_a: str, path_b: str) -> int:
    try:
        result = compare_reports(path_a, path_b)
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    print(f"WER {path_a} - {path_b}: {describe_comparison(result)}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
