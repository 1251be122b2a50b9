"""`python bench.py` (mode `models`): how fast the teacher and its students transcribe, and where the time goes.

    python bench.py                              # base + students (6,2) (6,1) (4,2) (3,2) on 30 dev utterances
    python bench.py --threads 2 --student runs/askd/student.pt
    python bench.py --quick --device cpu --json out.json    # tiny.en, 3 utterances, batch 1 and 2, greedy (CI)

Every model is timed on the same fixed audio: real LibriSpeech utterances (evenly spaced over the chosen
speakers' sorted list), plus windows of up to 30 s made of consecutive utterances of one chapter joined whole
(so their references stay exact). Decoding is greedy and beam 5 at temperature 0 only (no fallback), without
timestamps, so every model does the same kind of work.

  end to end  transcribe_clips() batch by batch: latency per utterance at batch 1, throughput at larger
              batches (batches are full: the utterance list is cycled to fill the last); windows at batch 1.
              Each model first decodes batch 0 untimed (its peak memory is recorded); then, --passes times,
              the models take turns (teacher, students), each running all the batches (bench_common.
              time_in_turns); per batch the median. Wall time, the GPU drained before and after.
  the split   on a fixed batch: log-Mel (clip_mels), encoder (embed_audio), the first decoder step (the prompt,
              and the cross-attention keys/values of the audio), and each further token (the mean of
              STEPS_TIMED steps on the KV cache); median of --repeats after --warmup calls, CUDA events on GPU.
              overhead = end to end - log-Mel - the network's time for the steps the run took (logit filters,
              softmax, beam bookkeeping, Python), per decoding step.

A student made by make_student has not been trained: it may stop at once or never emit <|endoftext|>, and the
time either takes says nothing about its speed. So it is decoded with a forced length: for each batch exactly as
many decoder steps as the teacher took on that batch (sample_len = the teacher's steps, <|endoftext|>
suppressed). Everything else is the real pipeline, timed like the teacher; only its text is meaningless, so it
has no WER. A trained student (--student PATH) decodes freely and is scored.
"""
import functools
from dataclasses import dataclass, replace
from typing import List, Optional

import torch

from bench_common import (
    WINDOW_SECONDS, Clip, full_batches, load_clips, median_ms, number, pick_device, plot_runs,
    print_heading, report_header, run_summary, time_in_turns, write_json,
)
from decoding import NO_FALLBACK, DecodingOptions, initial_tokens
from evaluate import word_error_rate
from load import DTYPES, load_model
from model import Whisper
from student import make_student
from tokenizer import tokenizer_for
from transcribe import clip_mels, transcribe_clips

DECODERS = {"greedy": {}, "beam5": {"beam_size": 5}}  # extra DecodingOptions of each
STEPS_TIMED = 32  # one-token decoder steps per timed call of the split: about one utterance's worth
STUDENT_RTF_GOAL = 0.04  # the issue's goal for a student on 2 CPU threads (greedy, batch 1)

# What --quick changes: a CI-sized run (tiny.en, a few clips, greedy, batch 1 and 2).
QUICK = {"teacher": "tiny.en", "utterances": 3, "windows": 1, "batch_sizes": [1, 2], "decoders": ["greedy"],
         "repeats": 2, "passes": 1}

MODEL_FIELDS = ("name", "source", "encoder_layers", "decoder_layers", "parameters", "size_mib", "dtype",
                "forced_length")
RUN_FIELDS = ("model", "set", "decoder", "batch_size", "forced_length", "n_items", "n_batches", "audio_seconds",
              "total_s", "rtf", "audio_s_per_s", "latency_ms_median", "latency_ms_p90", "tokens", "tokens_per_s",
              "peak_mib", "wer", "speedup_vs_teacher", "batch_ms", "batch_audio_s", "steps")
SPLIT_FIELDS = ("model", "decoder", "batch_size", "rows", "mel_ms", "encoder_ms", "first_step_ms", "per_token_ms",
                "overhead_ms_per_step", "encoder_times_ms", "first_step_times_ms", "per_token_times_ms",
                "encoder_peak_mib", "decoder_peak_mib")


# ----------------------------------------------------------------------------- the models

@dataclass(eq=False)
class Contender:
    name: str
    model: Whisper
    source: str
    forced_length: bool  # untrained: decoded for the teacher's number of steps


def student_shapes(spec: Optional[List[str]], teacher: Whisper, quick: bool):
    """(encoder, decoder) layers of each made student. Default: the full encoder with 2 and 1 decoder layers,
    then two thirds and half the encoder with 2 (for base: (6,2) (6,1) (4,2) (3,2)); quick: the first only."""
    n_encoder, n_decoder = teacher.dims.n_audio_layer, teacher.dims.n_text_layer
    if spec is None:
        shapes = [(n_encoder, 2), (n_encoder, 1), (round(2 * n_encoder / 3), 2), (n_encoder // 2, 2)]
        shapes = list(dict.fromkeys((e, min(d, n_decoder)) for e, d in shapes))
        return shapes[:1] if quick else shapes
    shapes = [tuple(int(n) for n in item.split(",")) for item in spec]
    for encoder_layers, decoder_layers in shapes:
        if not (1 <= encoder_layers <= n_encoder and 1 <= decoder_layers <= n_decoder):
            raise SystemExit(f"--students {encoder_layers},{decoder_layers}: the teacher has {n_encoder} encoder "
                             f"and {n_decoder} decoder layers")
    return shapes


def load_contenders(args, device, dtype) -> List[Contender]:
    """The teacher first (the others are compared with it), then a trained student, then the made ones."""
    teacher = load_model(args.teacher, device, dtype)
    found = [Contender(f"teacher {args.teacher}", teacher, args.teacher, forced_length=False)]
    if args.student:
        found.append(Contender("student (trained)", load_model(args.student, device, dtype), args.student, False))
    for encoder_layers, decoder_layers in student_shapes(args.students, teacher, args.quick):
        student = make_student(teacher, decoder_layers=decoder_layers, encoder_layers=encoder_layers).eval()
        source = f"make_student({args.teacher}, decoder_layers={decoder_layers}, encoder_layers={encoder_layers})"
        found.append(Contender(f"student ({encoder_layers},{decoder_layers})", student, source, forced_length=True))
    for contender in found:
        contender.model.optimize_for_decoding()  # on CPU, the layout the inference entry points use
    return found


def model_row(contender: Contender) -> dict:
    model = contender.model
    tensors = list(model.parameters()) + list(model.buffers())
    return {"name": contender.name, "source": contender.source, "encoder_layers": model.dims.n_audio_layer,
            "decoder_layers": model.dims.n_text_layer, "parameters": sum(p.numel() for p in model.parameters()),
            "size_mib": sum(t.numel() * t.element_size() for t in tensors) / 2**20, "dtype": str(model.dtype),
            "forced_length": contender.forced_length}


def decoding_options(decoder: str) -> DecodingOptions:
    return DecodingOptions(language="en", without_timestamps=True, **DECODERS[decoder])


def forced_options(options: DecodingOptions, model: Whisper, steps: int) -> DecodingOptions:
    """Exactly `steps` decoder passes: decode() makes one per sampled token up to sample_len, and stops early
    only on <|endoftext|>, which is added to the suppressed tokens."""
    eot = tokenizer_for(model, language="en").eot
    return replace(options, sample_len=steps, suppress_tokens=f"-1,{eot}")


class StepCounter:
    """Counts decoder passes: every step, the first (the prompt) and each one-token step after it, runs the
    decoder's final LayerNorm exactly once, so a forward hook there counts steps without touching decoding.py."""

    def __init__(self, model: Whisper):
        self.count = 0
        self._handle = model.decoder.ln.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.count += 1

    def close(self):
        self._handle.remove()


# ----------------------------------------------------------------------------- end to end

def transcriber(contender: Contender, decoder: str, teacher_steps: dict, records_steps: bool):
    """call(index, batch) -> (results, decoder steps) for time_in_turns. The teacher records its steps per
    batch in teacher_steps; a forced-length student, which runs after it on every batch, takes them."""
    model, options, counter = contender.model, decoding_options(decoder), StepCounter(contender.model)

    def call(index, batch):
        batch_options = options
        if contender.forced_length:
            batch_options = forced_options(options, model, teacher_steps[index])
        counter.count = 0
        results = transcribe_clips(model, [c.audio for c in batch], batch_options, NO_FALLBACK, len(batch))
        if records_steps:
            teacher_steps[index] = counter.count
        return results, counter.count
    return call, counter


def run_row(contender: Contender, clips: List[Clip], batches: List[List[Clip]], timed) -> dict:
    """Times, steps, tokens and WER of one model's pass over the clips."""
    if timed.error:
        raise SystemExit(f"{contender.name} failed: {timed.error}")
    outputs = timed.outputs
    hypotheses = {c.id: r.text for batch, (results, _) in zip(batches, outputs) for c, r in zip(batch, results)}
    row = dict.fromkeys(RUN_FIELDS)
    row.update(run_summary(timed.seconds, [sum(c.seconds for c in batch) for batch in batches],
                           tokens=sum(len(r.tokens) for results, _ in outputs for r in results)))
    row.update(forced_length=contender.forced_length, n_items=len(clips), steps=[steps for _, steps in outputs],
               peak_mib=timed.peak_mib)
    if not contender.forced_length:
        row["wer"] = word_error_rate([c.text for c in clips], [hypotheses[c.id] for c in clips])["wer"]
    return row


def end_to_end(contenders: List[Contender], utterances, windows, args, device) -> List[dict]:
    """Every decoder and set, utterances at each batch size and windows at 1, all models taking turns pass by
    pass, the teacher first (a forced-length student takes its step counts)."""
    runs, sets = [], (("utterances", utterances, args.batch_sizes), ("windows", windows, [1]))
    for decoder in args.decoders:
        for set_name, clips, batch_sizes in sets:
            for batch_size in batch_sizes if clips else []:
                print(f"end to end: {set_name}, {decoder}, batch {batch_size}: every model, in turns", flush=True)
                batches, teacher_steps = full_batches(clips, batch_size), {}
                calls, counters = {}, []
                for contender in contenders:
                    call, counter = transcriber(contender, decoder, teacher_steps, contender is contenders[0])
                    calls[contender.name] = call
                    counters.append(counter)
                try:
                    timed = time_in_turns(calls, batches, args.passes, device)
                finally:
                    for counter in counters:
                        counter.close()
                runs += [{**run_row(c, clips, batches, timed[c.name]), "model": c.name, "set": set_name,
                          "decoder": decoder, "batch_size": batch_size} for c in contenders]
    for row in runs:
        row["speedup_vs_teacher"] = find(runs, contenders[0].name, row["decoder"], row["batch_size"],
                                         row["set"])[0]["total_s"] / row["total_s"]
    return runs


def find(rows, model, decoder, batch_size, set_name=None):
    return [r for r in rows if (r["model"], r["decoder"], r["batch_size"]) == (model, decoder, batch_size)
            and set_name in (None, r.get("set"))]


# ----------------------------------------------------------------------------- the split

@torch.no_grad()
def measure_split(model: Whisper, mel: torch.Tensor, beams: int, args, device) -> dict:
    """Encoder, first step and per-token cost of the model on a fixed batch: mel (B, n_mels, 3000), B x beams rows."""
    tokenizer = tokenizer_for(model, language="en")
    # <|startoftranscript|> [<|en|> <|transcribe|>] <|notimestamps|>, as decode() starts
    prompt = initial_tokens(tokenizer, decoding_options("greedy"), model.dims.n_text_ctx)
    features = model.embed_audio(mel).repeat_interleave(beams, dim=0)  # beams share their utterance's audio
    rows = features.shape[0]
    tokens = torch.tensor([prompt] * rows, device=device)
    next_token = tokens[:, -1:]  # which token is fed does not change the cost
    keep_rows = torch.arange(rows, device=device)

    def first_step(cache):
        cache.reset()  # the cross-attention keys/values are computed again, as for new audio
        return model.logits(tokens, features, cache)

    def further_steps(cache):
        cache.length = len(prompt)  # the same positions every call
        for _ in range(STEPS_TIMED):
            logits = model.logits(next_token, features, cache)
            if beams > 1:
                cache.reorder_beams(keep_rows)  # beam search moves the self-attention cache every step
        return logits

    cache = model.new_cache(rows, len(prompt) + STEPS_TIMED)
    encoder_ms, encoder_times, encoder_peak = median_ms(lambda: model.embed_audio(mel), device, args.warmup,
                                                        args.repeats)
    first_ms, first_times, first_peak = median_ms(lambda: first_step(cache), device, args.warmup, args.repeats)
    steps_ms, steps_times, steps_peak = median_ms(lambda: further_steps(cache), device, args.warmup, args.repeats)
    peaks = [p for p in (first_peak, steps_peak) if p is not None]
    return {"rows": rows, "encoder_ms": encoder_ms, "first_step_ms": first_ms, "per_token_ms": steps_ms / STEPS_TIMED,
            "encoder_times_ms": encoder_times, "first_step_times_ms": first_times,
            "per_token_times_ms": [t / STEPS_TIMED for t in steps_times], "encoder_peak_mib": encoder_peak,
            "decoder_peak_mib": max(peaks) if peaks else None}


def network_ms(split: dict, steps: int) -> float:
    """The network's time for one batch that took `steps` decoder steps (the first one with the prompt)."""
    return split["encoder_ms"] + split["first_step_ms"] + (steps - 1) * split["per_token_ms"]


def overhead_ms_per_step(runs: List[dict], split: dict) -> Optional[float]:
    """What the end-to-end runs spent beyond log-Mel and the network, per decoding step."""
    batches = [(ms, steps) for run in runs for ms, steps in zip(run["batch_ms"], run["steps"])]
    extra = sum(ms - split["mel_ms"] - network_ms(split, steps) for ms, steps in batches)
    return extra / sum(steps for _, steps in batches) if batches else None


def the_split(contenders: List[Contender], utterances, runs, args, device) -> List[dict]:
    """Log-Mel, encoder, first step and per-token cost of every model at every decoder and batch size of the
    runs, on the first clips; the overhead per step from the model's own end-to-end runs."""
    split = []
    for batch_size in sorted(set(args.batch_sizes) | {1}):
        batch = [c.audio for c in full_batches(utterances, batch_size)[0]]
        n_mels = contenders[0].model.dims.n_mels
        mel_ms = median_ms(functools.partial(clip_mels, batch, n_mels, device), device, args.warmup, args.repeats)[0]
        for decoder in args.decoders:
            for contender in contenders:
                print(f"split: {contender.name}, {decoder}, batch {batch_size}", flush=True)
                mel = clip_mels(batch, contender.model.dims.n_mels, device).to(contender.model.dtype)
                row = dict.fromkeys(SPLIT_FIELDS)
                row.update(measure_split(contender.model, mel, DECODERS[decoder].get("beam_size", 1), args, device),
                           model=contender.name, decoder=decoder, batch_size=batch_size, mel_ms=mel_ms)
                own_runs = find(runs, contender.name, decoder, batch_size)
                row["overhead_ms_per_step"] = overhead_ms_per_step(own_runs, row)
                split.append(row)
    return split


# ----------------------------------------------------------------------------- the report

def length_label(forced_length: bool) -> str:
    return "forced length" if forced_length else "free"


def print_tables(models, runs, split):
    print(f"\n{'model':22s} {'enc/dec':>7s} {'params M':>9s} {'MiB':>7s}  decoding")
    for m in models:
        print(f"{m['name']:22s} {m['encoder_layers']:>3d}/{m['decoder_layers']:<3d} {m['parameters'] / 1e6:9.2f} "
              f"{m['size_mib']:7.1f}  {length_label(m['forced_length'])}")
    header = (f"{'model':22s} {'set':10s} {'decoder':7s} {'batch':>5s} {'RTF':>7s} {'audio s/s':>9s} "
              f"{'median ms':>10s} {'p90 ms':>9s} {'tokens/s':>8s} {'peak MiB':>8s} {'WER %':>6s} {'x teacher':>9s}")
    print_heading(header, "end to end (RTF = seconds / audio seconds; latency per batch, i.e. per utterance at batch 1)")
    for r in runs:
        wer = None if r["wer"] is None else 100 * r["wer"]
        print(f"{r['model']:22s} {r['set']:10s} {r['decoder']:7s} {r['batch_size']:5d} {r['rtf']:7.4f} "
              f"{r['audio_s_per_s']:9.2f} {r['latency_ms_median']:10.1f} {r['latency_ms_p90']:9.1f} "
              f"{r['tokens_per_s']:8.1f} {number(r['peak_mib'], '8.0f')} {number(wer, '6.2f')} "
              f"{r['speedup_vs_teacher']:8.2f}x")
    header = (f"{'model':22s} {'decoder':7s} {'batch':>5s} {'rows':>4s} {'log-Mel ms':>10s} {'encoder ms':>10s} "
              f"{'1st step ms':>11s} {'ms/token':>8s} {'overhead ms/step':>16s}")
    print_heading(header, "the split (per batch; 1st step = prompt + cross-attention keys/values; overhead from end to end)")
    for s in split:
        print(f"{s['model']:22s} {s['decoder']:7s} {s['batch_size']:5d} {s['rows']:4d} {s['mel_ms']:10.1f} "
              f"{s['encoder_ms']:10.1f} {s['first_step_ms']:11.1f} {s['per_token_ms']:8.2f} "
              f"{number(s['overhead_ms_per_step'], '16.2f')}")


def print_summary(runs, teacher_name):
    """Speed-up of each student over the teacher, and the RTF goal, at greedy batch 1 on the utterances."""
    headline = [r for r in runs if (r["set"], r["decoder"], r["batch_size"]) == ("utterances", "greedy", 1)]
    if not headline:
        return
    print("\ngreedy, batch 1, utterances:")
    for r in headline:
        speedup = "" if r["model"] == teacher_name else f", {r['speedup_vs_teacher']:.2f}x the teacher's speed"
        print(f"  {r['model']}: RTF {r['rtf']:.4f}{speedup} ({length_label(r['forced_length'])})")
    students = [r for r in headline if r["model"] != teacher_name]
    if students:
        best = min(students, key=lambda r: r["rtf"])
        verdict = "met" if best["rtf"] <= STUDENT_RTF_GOAL else "not met"
        print(f"  goal RTF <= {STUDENT_RTF_GOAL} for a student (issue; 2 CPU threads): fastest {best['model']} "
              f"RTF {best['rtf']:.4f}: {verdict} on this device")


def report_notes(device):
    return [
        "runs: transcribe_clips(), temperature 0 only, no timestamps, language en; rtf = seconds / audio seconds; "
        "latency_ms_*: per batch (at batch 1: per utterance); the last batch is filled by cycling the list; "
        "steps: decoder passes per batch (the first with the prompt)",
        "forced_length: an untrained student decoded for exactly the teacher's steps on each batch (sample_len = "
        "the teacher's steps, <|endoftext|> suppressed): real timing, meaningless text, so no WER; tokens counts "
        "what it generated",
        f"split: median of repeats on a fixed batch (the first clips); per_token_ms = mean of {STEPS_TIMED} "
        "one-token steps on the KV cache (beam: with the cache reordered each step); overhead_ms_per_step = "
        "(end to end - log-Mel - encoder - first step - (steps - 1) x per token) / steps over the model's runs",
        ("peak_mib: torch.cuda.max_memory_allocated minus memory_allocated before the call" if device.type == "cuda"
         else "peak_mib: growth of the process's peak RSS (VmHWM) during the call, page-granular; null off Linux"),
        "speedup_vs_teacher: teacher total_s / this total_s on the same set, decoder and batch size",
    ]


# ----------------------------------------------------------------------------- the mode

def settle_defaults(args, device):
    """Unset flags take the quick values under --quick, else the full run's (CPU: fewer batch sizes and passes)."""
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    args.teacher = args.teacher or "base"
    args.utterances = args.utterances or 30
    args.windows = 4 if args.windows is None else args.windows
    args.batch_sizes = args.batch_sizes or ([1, 8, 16, 32] if device.type == "cuda" else [1, 8])
    args.decoders = args.decoders or list(DECODERS)
    args.repeats = args.repeats or 3
    args.passes = args.passes or (3 if device.type == "cuda" else 1)


def describe_sets(description, utterances, windows):
    sets = {"utterances": (description, utterances),
            "windows": (f"up to {WINDOW_SECONDS:.0f} s of consecutive utterances of one chapter joined whole, "
                        "the longest such runs", windows)}
    return {name: {"description": text, "n": len(clips), "audio_seconds": sum(c.seconds for c in clips),
                   "ids": [c.id for c in clips]} for name, (text, clips) in sets.items()}


def run(args):
    device = pick_device(args.device)
    settle_defaults(args, device)
    utterances, windows, description = load_clips(args.data, args.speakers, args.utterances, args.windows)
    contenders = load_contenders(args, device, DTYPES[args.dtype] if args.dtype else None)
    teacher = contenders[0]
    header = report_header("models", device)
    print(f"device: {header['device_name']}; torch {torch.__version__}; dtype {teacher.model.dtype}")
    print(f"utterances: {description}: {sum(c.seconds for c in utterances):.1f} s")
    print(f"windows: {len(windows)} of up to {WINDOW_SECONDS:.0f} s (consecutive utterances joined)"
          + (f": {', '.join(f'{c.seconds:.1f}' for c in windows)} s" if windows else ""))
    print(f"batch sizes {args.batch_sizes} (windows: 1); decoders {args.decoders}; warm-up {args.warmup}, "
          f"median of {args.repeats} (split), {args.passes} timed pass(es) (end to end)")

    runs = end_to_end(contenders, utterances, windows, args, device)
    split = the_split(contenders, utterances, runs, args, device)
    models = [model_row(c) for c in contenders]
    print_tables(models, runs, split)
    print_summary(runs, teacher.name)
    title = f"{header['device_name']}, {teacher.model.dtype}: teacher {args.teacher} and students"
    plot, plot_note = plot_runs(runs, args.plot, title)
    print(f"plot: {plot}" if plot else f"plot: {plot_note}")

    report = header
    report.update(
        teacher=args.teacher, student_checkpoint=args.student, dtype=str(teacher.model.dtype), quick=args.quick,
        sets=describe_sets(description, utterances, windows), batch_sizes=args.batch_sizes, decoders=args.decoders,
        warmup=args.warmup, repeats=args.repeats, passes=args.passes, steps_timed=STEPS_TIMED,
        student_rtf_goal=STUDENT_RTF_GOAL, models=models, runs=runs, split=split, plot=plot, plot_note=plot_note,
        notes=report_notes(device))
    write_json(report, args.json)
