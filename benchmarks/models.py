"""`python bench.py` (mode `models`): how fast the teacher and its students transcribe, and where the time goes.

    python bench.py                              # the teacher and its made students on the dev utterances
    python bench.py --threads 2 --student runs/askd/student.pt runs/kd/student.pt
    python bench.py --teacher base --student runs/base-62/student.pt tiny.en   # base's student beside tiny.en
    python bench.py --quick --device cpu --json out.json    # CI-sized (QUICK below)
    python bench.py --audio-ctx dynamic --audio-margin 16   # every model on the real length of its audio
    python bench.py --int8 output all            # and every model again with int8 weights (quantize.py), in turns

Every model is timed on the same fixed audio: real LibriSpeech utterances (evenly spaced over the chosen
speakers' sorted list), plus windows of up to 30 s made of consecutive utterances of one chapter joined whole
(so their references stay exact). Decoding is greedy and beam 5 at temperature 0 only (no fallback), without
timestamps, so every model does the same kind of work. Each model hears its audio under its own audio
context (model.audio_context: 30 s windows for the official models, the real length plus a margin for a
student checkpoint made for it); --audio-ctx/--audio-margin override it for every model.

  end to end  transcribe_clips() batch by batch: latency per utterance at batch 1, throughput at larger
              batches (batches are full: the utterance list is cycled to fill the last); windows at batch 1.
              Each model first decodes batch 0 untimed (its peak memory is recorded); then, --passes times,
              the models take turns (teacher, students), each running all the batches (time_in_turns in
              benchmarks/common.py); per batch the median. Wall time, the GPU drained before and after.
  the split   on a fixed batch: log-Mel (clip_mels), encoder (embed_audio), the first decoder step (the prompt,
              and the cross-attention keys/values of the audio), and each further token (the mean of
              STEPS_TIMED steps on the KV cache); median of --repeats after --warmup calls, CUDA events on GPU.
              overhead = end to end - log-Mel - the network's time for the steps the run took (logit filters,
              softmax, beam bookkeeping, Python), per decoding step.
  memory floor
              per model, what its batch-1 greedy decoding step must read per token (step_bytes: the decoder's
              weights once, the output projection, the cross-attention keys/values of the split's audio, the
              self-attention cache so far) divided by the read bandwidth measured in the same run (one float32
              row times a READ_BYTES weight through the path the models' products take); beside it the split's
              ms per token and how many times the floor that is.
  audio context sweep
              where the time goes vs audio length: clips of exactly --sweep-seconds (5, 10, 20, 30 s), cut
              from the dev speech played end to end, each at batch 1 under a fixed context (3000 Mel frames,
              1500 positions) and a dynamic one (the clip's own positions plus the margin: the model's own
              when its policy is dynamic, else --audio-margin or SWEEP_MARGIN). Per model, clip and context:
              the encoder, the first step and the per-token step as in the split, and the whole greedy
              transcribe_clips() latency, decoded for exactly the teacher's number of steps on that clip
              (forced length, below) so both contexts do the same decoder work; the ratio dynamic / fixed
              of each. Medians of --sweep-repeats; the latencies with the models taking turns. At 30 s the
              two contexts coincide (1500 positions): the ratios there say how much is noise.

A student made by make_student has not been trained: it may stop at once or never emit <|endoftext|>, and the
time either takes says nothing about its speed. So it is decoded with a forced length: for each batch exactly as
many decoder steps as the teacher took on that batch (sample_len = the teacher's steps, <|endoftext|>
suppressed). Everything else is the real pipeline, timed like the teacher; only its text is meaningless, so it
has no WER. A made student hears audio as its teacher does. Trained students (--student PATH...) decode
freely and are scored.
"""
import contextlib
import copy
import functools
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import List, Optional

import torch

from audio import CHUNK_LENGTH
from benchmarks.common import (
    ByDevice, Clip, Column, column, full_batches, load_clips, machine, median_ms, pick_device, plot_runs, print_table,
    report_header, run_summary, settle_defaults, speech_cuts, synchronize, time_calls_ms, time_in_turns, write_json,
)
from decoding import NO_FALLBACK, DecodingOptions, initial_tokens
from evaluate import word_error_rate
from load import DTYPES, load_model
from model import MODEL_DIMS, AudioContext, ModelDimensions, OneDNNWeight, Whisper, linear, onednn_linear_available
from quantize import Int8Weight, int8_for_decoding
from student import make_student
from tokenizer import tokenizer_for
from transcribe import audio_context_override, clip_mels, encoder_input, transcribe_clips

DECODERS = {"greedy": {}, "beam5": {"beam_size": 5}}  # extra DecodingOptions of each
STEPS_TIMED = 32  # one-token decoder steps per timed call of the split: about one utterance's worth
SWEEP_MARGIN = 16  # the sweep's dynamic context for a model whose own is fixed: positions (20 ms) past the audio
# The memory floor's bandwidth: a float32 weight this large (far beyond any CPU cache or GPU L2), one row times
# it, READ_REPEATS timed calls after two untimed ones (the first makes oneDNN's blocked copy).
READ_BYTES = {"cuda": 2**30, "cpu": 2**28}
READ_COLUMNS = 4096  # the weight's inner dimension: (READ_BYTES / 4 / 4096, 4096)
READ_REPEATS = 9
INT8_SCALE_BYTES = 4  # an int8 weight's per-output-row scale (float32), read with its row

# Every default of the mode, read by both the flags' help (bench.py) and settle_defaults; a GPU takes larger
# batches and more passes. --students and --dtype default to what student_shapes and load_model choose;
# sweep_repeats None: --repeats.
DEFAULTS = {"teacher": "base", "utterances": 30, "windows": 4, "batch_sizes": ByDevice([1, 8, 16, 32], [1, 8]),
            "decoders": list(DECODERS), "repeats": 3, "warmup": 1, "passes": ByDevice(3, 1),
            "sweep_seconds": [5, 10, 20, 30], "sweep_repeats": None, "json": "bench.json", "plot": "bench.png"}
# What --quick changes: a CI-sized run.
QUICK = {"teacher": "tiny.en", "utterances": 3, "windows": 1, "batch_sizes": [1, 2], "decoders": ["greedy"],
         "repeats": 2, "passes": 1, "sweep_seconds": [5, 30], "sweep_repeats": 1}

MODEL_FIELDS = ("name", "source", "encoder_layers", "decoder_layers", "parameters", "size_mib", "dtype", "int8",
                "forced_length", "audio_context")
RUN_FIELDS = ("model", "set", "decoder", "batch_size", "forced_length", "n_items", "n_batches", "audio_seconds",
              "total_s", "rtf", "audio_s_per_s", "latency_ms_median", "latency_ms_p90", "tokens", "tokens_per_s",
              "peak_mib", "wer", "speedup_vs_teacher", "batch_ms", "batch_audio_s", "steps")
SPLIT_FIELDS = ("model", "decoder", "batch_size", "rows", "audio_positions", "prompt_tokens", "mel_ms", "encoder_ms",
                "first_step_ms", "per_token_ms", "overhead_ms_per_step", "encoder_times_ms", "first_step_times_ms",
                "per_token_times_ms", "encoder_peak_mib", "decoder_peak_mib")
FLOOR_SECTION_FIELDS = ("bandwidth", "steps_timed", "rows")
BANDWIDTH_FIELDS = ("path", "bytes", "shape", "repeats", "median_ms", "times_ms", "bytes_per_s")
FLOOR_FIELDS = ("model", "audio_positions", "attended_tokens", "bytes", "bytes_per_token", "floor_ms_per_token",
                "per_token_ms", "step_vs_floor")
STEP_BYTES_PARTS = ("decoder_weights", "output_projection", "cross_kv", "self_kv")  # and "total"
SWEEP_FIELDS = ("model", "seconds", "steps", "fixed", "dynamic", "dynamic_vs_fixed")
SWEEP_CONTEXT_FIELDS = ("audio_context", "mel_frames", "positions", "encoder_ms", "first_step_ms", "per_token_ms",
                        "latency_ms", "decoder_steps", "encoder_times_ms", "first_step_times_ms",
                        "per_token_times_ms", "latency_peak_mib")
SWEEP_RATIOS = ("encoder", "first_step", "per_token", "latency")  # dynamic / fixed of each <name>_ms


# ----------------------------------------------------------------------------- the models

@dataclass(eq=False)
class Contender:
    name: str
    model: Whisper
    source: str
    forced_length: bool  # untrained: decoded for the teacher's number of steps
    int8: Optional[str] = None  # the int8 scope (quantize.SCOPES), None: float


def student_shapes(spec: Optional[List[str]], dims: ModelDimensions, quick: bool):
    """(encoder, decoder) layers of each made student. Default: the full encoder with 2 and 1 decoder layers,
    then two thirds and half the encoder with 2 (for base: (6,2) (6,1) (4,2) (3,2)); quick: the first only."""
    n_encoder, n_decoder = dims.n_audio_layer, dims.n_text_layer
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


def students_help() -> str:
    """--students' default for the default teacher, from student_shapes' rule itself."""
    shapes = student_shapes(None, MODEL_DIMS[DEFAULTS["teacher"]], quick=False)
    return f"default for {DEFAULTS['teacher']}: {' '.join(f'{e},{d}' for e, d in shapes)}; quick: the first"


def is_model_name(entry: str) -> bool:
    """An official model's name ("tiny.en"), read by name as load_model would: a path of that name wins."""
    return entry in MODEL_DIMS and not Path(entry).exists()


def trained_names(entries: List[str]) -> List[str]:
    """Table names of the --student entries. An official model: "model NAME". The checkpoints: "student
    (trained)" for one; for several, each path's shortest ending that tells them apart (runs/askd/student.pt
    and runs/kd/student.pt: askd/student.pt, kd/student.pt)."""
    paths = [entry for entry in entries if not is_model_name(entry)]
    if len(set(entries)) < len(entries):
        raise SystemExit(f"--student: a checkpoint or model is given twice: {' '.join(entries)}")
    names = dict.fromkeys(paths, "student (trained)")
    if len(paths) > 1:
        parts = [Path(path).parts for path in paths]
        for n in range(1, max(map(len, parts)) + 1):
            endings = ["/".join(p[-n:]) for p in parts]
            if len(set(endings)) == len(endings):
                names = {path: f"student ({ending})" for path, ending in zip(paths, endings)}
                break
        else:  # two spellings of one file ("./a.pt", "a.pt")
            raise SystemExit(f"--student: a checkpoint is given twice: {' '.join(paths)}")
    return [f"model {entry}" if is_model_name(entry) else names[entry] for entry in entries]


def load_contenders(args, device, dtype) -> List[Contender]:
    """The teacher first (the others are compared with it), then the trained students, then the made ones,
    each under its own audio context or the --audio-ctx/--audio-margin override."""
    teacher = load_model(args.teacher, device, dtype)
    found = [Contender(f"teacher {args.teacher}", teacher, args.teacher, forced_length=False)]
    paths = args.student or []
    for name, path in zip(trained_names(paths), paths):
        found.append(Contender(name, load_model(path, device, dtype), path, forced_length=False))
    for encoder_layers, decoder_layers in student_shapes(args.students, teacher.dims, args.quick):
        student = make_student(teacher, decoder_layers=decoder_layers, encoder_layers=encoder_layers).eval()
        student.audio_context = teacher.audio_context
        source = f"make_student({args.teacher}, decoder_layers={decoder_layers}, encoder_layers={encoder_layers})"
        found.append(Contender(f"student ({encoder_layers},{decoder_layers})", student, source, forced_length=True))
    for contender in found:
        model = contender.model
        if args.audio_ctx is not None or args.audio_margin is not None:  # a margin alone: dynamic models' only
            model.audio_context = audio_context_override(model, args.audio_ctx or model.audio_context.mode,
                                                         args.audio_margin)
        model.optimize_for_decoding()  # on CPU, the layout the inference entry points use
    return found + int8_twins(found, args.int8)


def int8_twins(contenders: List[Contender], scopes: Optional[List[str]]) -> List[Contender]:
    """--int8: every model again per scope, timed in the same turns."""
    if not scopes:
        return []
    try:
        return [replace(c, name=f"{c.name} int8 {scope}", int8=scope,
                        model=int8_for_decoding(copy.deepcopy(c.model), scope))
                for scope in scopes for c in contenders]
    except ValueError as err:
        raise SystemExit(f"error: --int8: {err}")


@contextlib.contextmanager
def heard_as(model: Whisper, context: AudioContext):
    """The model under another audio context for a while."""
    own, model.audio_context = model.audio_context, context
    try:
        yield model
    finally:
        model.audio_context = own


def model_row(contender: Contender) -> dict:
    model = contender.model
    tensors = list(model.parameters()) + list(model.buffers())
    return {"name": contender.name, "source": contender.source, "encoder_layers": model.dims.n_audio_layer,
            "decoder_layers": model.dims.n_text_layer, "parameters": sum(p.numel() for p in model.parameters()),
            "size_mib": sum(t.numel() * t.element_size() for t in tensors) / 2**20, "dtype": str(model.dtype),
            "int8": contender.int8,
            "forced_length": contender.forced_length, "audio_context": asdict(model.audio_context)}


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
def measure_split(model: Whisper, mel: torch.Tensor, beams: int, warmup: int, repeats: int, device,
                  audio_lengths: Optional[torch.Tensor] = None) -> dict:
    """Encoder, first step and per-token cost of the model on a fixed batch: mel (B, n_mels, 2 S) and the rows'
    positions (B,) as encoder_input gives them, B x beams decoder rows."""
    tokenizer = tokenizer_for(model, language="en")
    # <|startoftranscript|> [<|en|> <|transcribe|>] <|notimestamps|>, as decode() starts
    prompt = initial_tokens(tokenizer, decoding_options("greedy"), model.dims.n_text_ctx)
    features = model.embed_audio(mel, audio_lengths).repeat_interleave(beams, dim=0)  # beams share their audio
    lengths = None if audio_lengths is None else audio_lengths.repeat_interleave(beams, dim=0)
    rows = features.shape[0]
    tokens = torch.tensor([prompt] * rows, device=device)
    next_token = tokens[:, -1:]  # which token is fed does not change the cost
    keep_rows = torch.arange(rows, device=device)

    def first_step(cache):
        cache.reset()  # the cross-attention keys/values are computed again, as for new audio
        return model.logits(tokens, features, cache, lengths)

    def further_steps(cache):
        cache.length = len(prompt)  # the same positions every call
        for _ in range(STEPS_TIMED):
            logits = model.logits(next_token, features, cache)
            if beams > 1:
                cache.reorder_beams(keep_rows)  # beam search moves the self-attention cache every step
        return logits

    cache = model.new_cache(rows, len(prompt) + STEPS_TIMED)
    encoder_ms, encoder_times, encoder_peak = median_ms(lambda: model.embed_audio(mel, audio_lengths), device,
                                                        warmup, repeats)
    first_ms, first_times, first_peak = median_ms(lambda: first_step(cache), device, warmup, repeats)
    steps_ms, steps_times, steps_peak = median_ms(lambda: further_steps(cache), device, warmup, repeats)
    peaks = [p for p in (first_peak, steps_peak) if p is not None]
    return {"rows": rows, "audio_positions": features.shape[1], "prompt_tokens": len(prompt),
            "encoder_ms": encoder_ms, "first_step_ms": first_ms, "per_token_ms": steps_ms / STEPS_TIMED,
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
    runs, on the first clips, each model under its own audio context; the overhead per step from the model's
    own end-to-end runs."""
    split = []
    for batch_size in sorted(set(args.batch_sizes) | {1}):
        batch = [c.audio for c in full_batches(utterances, batch_size)[0]]
        n_mels = contenders[0].model.dims.n_mels
        mel_ms = median_ms(functools.partial(clip_mels, batch, n_mels, device), device, args.warmup, args.repeats)[0]
        for decoder in args.decoders:
            for contender in contenders:
                print(f"split: {contender.name}, {decoder}, batch {batch_size}", flush=True)
                mel, lengths = encoder_input(contender.model, batch)
                row = dict.fromkeys(SPLIT_FIELDS)
                row.update(measure_split(contender.model, mel.to(contender.model.dtype),
                                         DECODERS[decoder].get("beam_size", 1), args.warmup, args.repeats, device,
                                         lengths),
                           model=contender.name, decoder=decoder, batch_size=batch_size, mel_ms=mel_ms)
                own_runs = find(runs, contender.name, decoder, batch_size)
                row["overhead_ms_per_step"] = overhead_ms_per_step(own_runs, row)
                split.append(row)
    return split


# ----------------------------------------------------------------------------- the memory floor

def step_bytes(dims: ModelDimensions, audio_positions: int, attended_tokens: float, element_bytes: int = 4,
               output_rows: Optional[int] = None, output_int8: bool = False, blocks_int8: bool = False) -> dict:
    """The bytes one single-token decoding step reads at batch 1, by part, and their "total". At batch 1 a
    step multiplies one row by every matrix it uses, so it reads each of those weights once.

    decoder_weights    every decoder block's self-attention (query, key, value, out), cross-attention query
                       and out, MLP, its three layer norms; the final norm; the rows of the token and position
                       embeddings it adds. Not the cross-attention key and value weights: those run on the
                       audio, once, in the first step. blocks_int8: the blocks' matrices at 1 byte an element
                       plus a float32 scale per output row (quantize.Int8Weight); biases and norms stay float.
    output_projection  the token embedding as output projection, n_vocab x D (output_rows: only a shortlist's
                       rows); output_int8: 1 byte an element plus a float32 scale per row.
    cross_kv           the audio's keys and values in every layer: 2 x layers x audio_positions x D.
    self_kv            the self-attention keys and values of the attended_tokens so far, this one included.

    element_bytes: the model's dtype (4 float32, 2 bfloat16); the caches are in it too. What the step
    writes (its own keys and values, the logits) and the activations are left out: they are a few rows."""
    d, layers = dims.n_text_state, dims.n_text_layer
    matrices = 14 * d * d  # per block: self q, k, v, out (4 D^2), cross q, out (2 D^2), MLP (2 x 4 D^2)
    matrix_rows = 11 * d  # their output rows: 4 D + 2 D + 4 D + D
    vectors = 16 * d  # biases (self q, v, out; cross q, out; MLP 4 D + D: 10 D) and three norms (6 D)
    if blocks_int8:
        per_block = matrices + matrix_rows * INT8_SCALE_BYTES + vectors * 4
    else:
        per_block = (matrices + vectors) * element_bytes
    final_norm_and_embedding_rows = (2 * d + d + d) * element_bytes  # the norm; a token's row, a position's
    rows = dims.n_vocab if output_rows is None else output_rows
    output = rows * (d + INT8_SCALE_BYTES) if output_int8 else rows * d * element_bytes
    parts = {"decoder_weights": layers * per_block + final_norm_and_embedding_rows, "output_projection": output,
             "cross_kv": 2 * layers * audio_positions * d * element_bytes,
             "self_kv": 2 * layers * attended_tokens * d * element_bytes}
    return {**parts, "total": sum(parts.values())}


def model_step_bytes(model: Whisper, audio_positions: int, attended_tokens: float) -> dict:
    """step_bytes for this model as it decodes: its dtype, its shortlist, which of its products read int8."""
    decoder = model.decoder
    return step_bytes(model.dims, audio_positions, attended_tokens, element_bytes=model.dtype.itemsize,
                      output_rows=None if decoder.shortlist is None else len(decoder.shortlist.ids),
                      output_int8=isinstance(decoder.inference_weight, Int8Weight),
                      blocks_int8=isinstance(decoder.blocks[0].mlp[0].inference_weight, Int8Weight))


@torch.no_grad()
def measure_read_bandwidth(device, n_bytes: int, repeats: int = READ_REPEATS) -> dict:
    """Bytes per second a decoding step's kind of product reads: one float32 row times a weight of n_bytes,
    through the path the models' products take on this device (oneDNN's blocked copy on CPU, as after
    optimize_for_decoding; F.linear elsewhere). The median of `repeats` calls; the row and the output are
    a few KB, so the weight's bytes are the bytes read."""
    weight = torch.ones(n_bytes // (4 * READ_COLUMNS), READ_COLUMNS, device=device)  # (N, 4096) float32
    row = torch.ones(1, READ_COLUMNS, device=device)  # (1, 4096)
    inference_weight = OneDNNWeight() if device.type == "cpu" and onednn_linear_available() else None

    def call():
        return linear(row, weight, None, inference_weight)

    for _ in range(2):  # untimed: the first makes the blocked copy, both fault its pages in
        call()
    synchronize(device)
    times = time_calls_ms(call, device, repeats, before_each=lambda: None)
    median = statistics.median(times)
    read = weight.numel() * weight.element_size()
    return {"path": "oneDNN blocked weight" if inference_weight else "F.linear", "bytes": read,
            "shape": list(weight.shape), "repeats": repeats, "median_ms": median, "times_ms": times,
            "bytes_per_s": read / (median / 1e3)}


def floor_rows(contenders: List[Contender], split: List[dict], bytes_per_s: float) -> List[dict]:
    """Per model with a greedy batch-1 split row: its bytes per token at that row's audio positions, with the
    self-attention cache at its mean over the split's timed steps (step i of STEPS_TIMED attends to the
    prompt and i + 1 tokens); the floor in ms; the split's ms per token; step / floor."""
    rows = []
    for contender in contenders:
        measured = find(split, contender.name, "greedy", 1)
        if not measured:
            continue
        measured = measured[0]
        attended = measured["prompt_tokens"] + (STEPS_TIMED + 1) / 2
        parts = model_step_bytes(contender.model, measured["audio_positions"], attended)
        floor_ms = parts["total"] / bytes_per_s * 1e3
        rows.append({"model": contender.name, "audio_positions": measured["audio_positions"],
                     "attended_tokens": attended, "bytes": parts, "bytes_per_token": parts["total"],
                     "floor_ms_per_token": floor_ms, "per_token_ms": measured["per_token_ms"],
                     "step_vs_floor": measured["per_token_ms"] / floor_ms})
    return rows


def memory_floor(contenders: List[Contender], split: List[dict], device) -> dict:
    print(f"memory floor: read bandwidth, one row times a {READ_BYTES[device.type] // 2**20} MiB float32 weight",
          flush=True)
    bandwidth = measure_read_bandwidth(device, READ_BYTES[device.type])
    print(f"read bandwidth: {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s ({bandwidth['path']})")
    return {"bandwidth": bandwidth, "steps_timed": STEPS_TIMED,
            "rows": floor_rows(contenders, split, bandwidth["bytes_per_s"])}


# ----------------------------------------------------------------------------- the audio context sweep

def sweep_contexts(model: Whisper, margin: int) -> dict:
    """The two contexts a model is swept under: 30 s windows, and the real length plus a margin (the model's
    own dynamic context, or one with `margin` when its own is fixed)."""
    own = model.audio_context
    return {"fixed": AudioContext("fixed"),
            "dynamic": own if own.mode == "dynamic" else AudioContext("dynamic", margin)}


def free_steps(teacher: Contender, clips: List[Clip]) -> List[int]:
    """Decoder steps the teacher takes on each clip, greedy and free under its own context (untimed)."""
    counter, steps = StepCounter(teacher.model), []
    try:
        for clip in clips:
            counter.count = 0
            transcribe_clips(teacher.model, [clip.audio], decoding_options("greedy"), NO_FALLBACK, 1)
            steps.append(counter.count)
    finally:
        counter.close()
    return steps


def latency_call(model: Whisper, context: AudioContext, options: DecodingOptions, counter: StepCounter):
    """call(index, batch) -> decoder steps, for time_in_turns: transcribe_clips under `context`."""
    def call(index, batch):
        counter.count = 0
        with heard_as(model, context):
            transcribe_clips(model, [c.audio for c in batch], options, NO_FALLBACK, len(batch))
        return counter.count
    return call


def context_sweep(contenders: List[Contender], clips: List[Clip], margin: int, args, device) -> List[dict]:
    """Per model and clip (batch 1), fixed vs dynamic context: the split's encoder, first step and per-token
    times, then the whole latency of transcribe_clips() with every model and context taking turns, all
    decoding the teacher's number of steps on the clip; the ratios dynamic / fixed. An input is measured once:
    the split's times hang on the Mel's width, not on what it holds (every fixed context is 3000 frames), and
    at 30 s the dynamic context gives the encoder those same 3000 frames."""
    steps = free_steps(contenders[0], clips)
    counters = {c.name: StepCounter(c.model) for c in contenders}
    splits, rows = {}, []  # splits: (model, Mel frames) -> measure_split's times
    try:
        for clip, n_steps in zip(clips, steps):
            inputs, calls = {}, {}  # inputs: (model, context) -> (model, Mel frames); calls: one per input
            for contender in contenders:
                model = contender.model
                options = forced_options(decoding_options("greedy"), model, n_steps)
                for mode, context in sweep_contexts(model, margin).items():
                    with heard_as(model, context):
                        mel, lengths = encoder_input(model, [clip.audio])
                    key = inputs[contender.name, mode] = (contender.name, mel.shape[-1])
                    if key not in splits:
                        print(f"audio context sweep: {contender.name}, {mel.shape[-1]} Mel frames", flush=True)
                        splits[key] = measure_split(model, mel.to(model.dtype), 1, args.warmup, args.sweep_repeats,
                                                    device, lengths)
                    if key not in calls:
                        calls[key] = latency_call(model, context, options, counters[contender.name])
            print(f"audio context sweep: {clip.seconds:g} s, whole latency: every model and context, in turns",
                  flush=True)
            timed = time_in_turns(calls, [[clip]], args.sweep_repeats, device)
            for contender in contenders:
                row = {"model": contender.name, "seconds": clip.seconds, "steps": n_steps}
                for mode, context in sweep_contexts(contender.model, margin).items():
                    key = inputs[contender.name, mode]
                    result = timed[key]
                    if result.error:
                        raise SystemExit(f"{contender.name} ({mode} context) failed: {result.error}")
                    row[mode] = {**{k: splits[key].get(k) for k in SWEEP_CONTEXT_FIELDS},
                                 "audio_context": asdict(context), "mel_frames": key[1], "positions": key[1] // 2,
                                 "latency_ms": 1e3 * result.seconds[0], "decoder_steps": result.outputs[0],
                                 "latency_peak_mib": result.peak_mib}
                row["dynamic_vs_fixed"] = {name: row["dynamic"][f"{name}_ms"] / row["fixed"][f"{name}_ms"]
                                           for name in SWEEP_RATIOS}
                rows.append(row)
    finally:
        for counter in counters.values():
            counter.close()
    order = [c.name for c in contenders]
    return sorted(rows, key=lambda r: (order.index(r["model"]), r["seconds"]))


# ----------------------------------------------------------------------------- the report

def length_label(forced_length: bool) -> str:
    return "forced length" if forced_length else "free"


def context_label(context: dict) -> str:
    return "fixed" if context["mode"] == "fixed" else f"dynamic +{context['margin']}"


MODEL_COLUMNS = (column("model", "name"), Column("enc/dec", lambda m: f"{m['encoder_layers']}/{m['decoder_layers']}"),
                 column("params M", "parameters", lambda n: f"{n / 1e6:.2f}"), column("MiB", "size_mib", ".1f"),
                 Column("decoding", lambda m: length_label(m["forced_length"])),
                 Column("audio context", lambda m: context_label(m["audio_context"])))
RUN_COLUMNS = (column("model", "model"), column("set", "set"), column("decoder", "decoder"),
               column("batch", "batch_size", "d"), column("RTF", "rtf", ".4f"),
               column("audio s/s", "audio_s_per_s", ".2f"),
               column("median ms", "latency_ms_median", ".1f"), column("p90 ms", "latency_ms_p90", ".1f"),
               column("tokens/s", "tokens_per_s", ".1f"), column("peak MiB", "peak_mib", ".0f"),
               Column("WER %", lambda r: None if r["wer"] is None else 100 * r["wer"], ".2f"),
               column("x teacher", "speedup_vs_teacher", lambda v: f"{v:.2f}x"))
SPLIT_COLUMNS = (column("model", "model"), column("decoder", "decoder"), column("batch", "batch_size", "d"),
                 column("rows", "rows", "d"), column("log-Mel ms", "mel_ms", ".1f"),
                 column("encoder ms", "encoder_ms", ".1f"), column("1st step ms", "first_step_ms", ".1f"),
                 column("ms/token", "per_token_ms", ".2f"), column("overhead ms/step", "overhead_ms_per_step", ".2f"))


FLOOR_COLUMNS = (column("model", "model"), column("positions", "audio_positions", "d"),
                 column("MB/token", "bytes_per_token", lambda b: f"{b / 1e6:.1f}"),
                 *(Column(f"{header} MB", lambda r, part=part: r["bytes"][part] / 1e6, ".1f") for part, header in
                   zip(STEP_BYTES_PARTS, ("weights", "output", "cross K/V", "self K/V"))),
                 column("floor ms/token", "floor_ms_per_token", ".2f"), column("ms/token", "per_token_ms", ".2f"),
                 column("x floor", "step_vs_floor", lambda v: f"{v:.2f}x"))


def sweep_columns(name: str, header: str, spec: str):
    """fixed, dynamic and their ratio of one time."""
    return (Column(f"{header} fixed", lambda r: r["fixed"][f"{name}_ms"], spec),
            Column("dynamic", lambda r: r["dynamic"][f"{name}_ms"], spec),
            Column("ratio", lambda r: r["dynamic_vs_fixed"][name], ".2f"))


SWEEP_COLUMNS = (column("model", "model"), column("audio s", "seconds", "g"), column("steps", "steps", "d"),
                 Column("positions", lambda r: f"{r['fixed']['positions']}/{r['dynamic']['positions']}", ">"),
                 *sweep_columns("encoder", "encoder ms", ".1f"), *sweep_columns("per_token", "ms/token", ".2f"),
                 *sweep_columns("latency", "latency ms", ".1f"))


def print_tables(models, runs, split, floor, sweep, machine_line):
    print_table(MODEL_COLUMNS, models, f"models, timed on {machine_line}")
    print_table(RUN_COLUMNS, runs, "end to end (RTF = seconds / audio seconds; latency per batch, i.e. per "
                                   "utterance at batch 1)")
    print_table(SPLIT_COLUMNS, split, "the split (per batch; 1st step = prompt + cross-attention keys/values; "
                                      "overhead from end to end)")
    bandwidth = floor["bandwidth"]
    print_table(FLOOR_COLUMNS, floor["rows"], f"memory floor (batch 1, greedy: the bytes a step reads / "
                f"{bandwidth['bytes_per_s'] / 1e9:.1f} GB/s read bandwidth, {bandwidth['path']}; ms/token from "
                "the split; x floor = ms/token / floor)")
    if sweep:
        print_table(SWEEP_COLUMNS, sweep["rows"], "audio context sweep (batch 1, greedy, the teacher's steps on each "
                                                  "clip; positions fixed/dynamic; ratio = dynamic / fixed)")


def print_summary(runs, teacher_name):
    """Each student's speed-up over the teacher at greedy, batch 1, on the utterances."""
    headline = [r for r in runs if (r["set"], r["decoder"], r["batch_size"]) == ("utterances", "greedy", 1)]
    if not headline:
        return
    print("\ngreedy, batch 1, utterances:")
    for r in headline:
        speedup = "" if r["model"] == teacher_name else f", {r['speedup_vs_teacher']:.2f}x the teacher's speed"
        print(f"  {r['model']}: RTF {r['rtf']:.4f}{speedup} ({length_label(r['forced_length'])})")


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
        "(end to end - log-Mel - encoder - first step - (steps - 1) x per token) / steps over the model's runs "
        "(for a model under a dynamic context the encoder's time is the first batch's, whose width others differ "
        "from: its overhead is rougher)",
        ("peak_mib: torch.cuda.max_memory_allocated minus memory_allocated before the call" if device.type == "cuda"
         else "peak_mib: growth of the process's peak RSS (VmHWM) during the call, page-granular; null off Linux"),
        "speedup_vs_teacher: teacher total_s / this total_s on the same set, decoder and batch size",
        "memory_floor: bandwidth = one float32 row times a weight of bandwidth.bytes through the models' product path "
        "(oneDNN's blocked copy on CPU), median of its repeats; rows: per model with a greedy batch-1 split row, "
        "bytes = what a decoding step reads per token (benchmarks.models.step_bytes: decoder weights once without "
        "the cross-attention key/value weights, the output projection (int8: 1 byte an element + a float32 scale "
        "per row; a shortlist: its rows), the cross-attention keys/values of audio_positions, the self-attention "
        "cache at attended_tokens, the mean over the split's timed steps); floor_ms_per_token = bytes_per_token / "
        "bandwidth.bytes_per_s; per_token_ms: the split's; step_vs_floor = per_token_ms / floor_ms_per_token",
        "audio_context (models): what each model heard in runs and split: {mode: fixed (30 s windows) or dynamic "
        "(the real length plus margin positions of 20 ms)}, its own or --audio-ctx/--audio-margin "
        "(audio_context_override); student_checkpoints: the --student entries (checkpoints, or official models "
        "by name); student_checkpoint: the first checkpoint among them, for older readers",
        f"audio_context_sweep: batch 1, greedy; each clip the first N seconds of the dev speech end to end; per model "
        f"and clip, fixed (3000 Mel frames, 1500 positions) vs dynamic (the clip's positions + the model's margin, "
        f"or default_margin for a fixed model); encoder/first_step/per_token_ms as in split (per_token: mean of "
        f"{STEPS_TIMED} steps), median of its repeats; latency_ms: transcribe_clips() incl. log-Mel, forced to the "
        "teacher's free steps on the clip (decoder_steps: what it took), the models and contexts taking turns; "
        "dynamic_vs_fixed: dynamic ms / fixed ms of each",
    ]


# ----------------------------------------------------------------------------- the mode

def describe_sets(description, utterances, windows):
    sets = {"utterances": (description, utterances),
            "windows": (f"up to {CHUNK_LENGTH} s of consecutive utterances of one chapter joined whole, "
                        "the longest such runs", windows)}
    return {name: {"description": text, "n": len(clips), "audio_seconds": sum(c.seconds for c in clips),
                   "ids": [c.id for c in clips]} for name, (text, clips) in sets.items()}


def run(args):
    device = pick_device(args.device)
    settle_defaults(args, device, DEFAULTS, QUICK)
    args.sweep_repeats = args.sweep_repeats or args.repeats
    if max(args.sweep_seconds) > CHUNK_LENGTH:
        raise SystemExit(f"--sweep-seconds: clips of at most {CHUNK_LENGTH} s, got {max(args.sweep_seconds)}")
    utterances, windows, description = load_clips(args.data, args.speakers, args.utterances, args.windows)
    contenders = load_contenders(args, device, DTYPES[args.dtype] if args.dtype else None)
    teacher = contenders[0]
    header = report_header("models", device)
    print(f"{machine(header)}; dtype {teacher.model.dtype}")
    print(f"utterances: {description}: {sum(c.seconds for c in utterances):.1f} s")
    print(f"windows: {len(windows)} of up to {CHUNK_LENGTH} s (consecutive utterances joined)"
          + (f": {', '.join(f'{c.seconds:.1f}' for c in windows)} s" if windows else ""))
    print(f"batch sizes {args.batch_sizes} (windows: 1); decoders {args.decoders}; warm-up {args.warmup}, "
          f"median of {args.repeats} (split), {args.passes} timed pass(es) (end to end)")

    runs = end_to_end(contenders, utterances, windows, args, device)
    split = the_split(contenders, utterances, runs, args, device)
    floor = memory_floor(contenders, split, device)
    sweep = None
    if not args.no_context_sweep:
        margin = SWEEP_MARGIN if args.audio_margin is None else args.audio_margin
        clips = speech_cuts(windows + utterances, args.sweep_seconds)
        sweep = {"seconds": args.sweep_seconds, "repeats": args.sweep_repeats, "warmup": args.warmup,
                 "default_margin": margin, "steps_timed": STEPS_TIMED,
                 "speech": "the first N s of the windows, then the utterances (sets), played end to end",
                 "rows": context_sweep(contenders, clips, margin, args, device)}
    models = [model_row(c) for c in contenders]
    print_tables(models, runs, split, floor, sweep, machine(header))
    print_summary(runs, teacher.name)
    title = f"{header['device_name']}, {teacher.model.dtype}: teacher {args.teacher} and students"
    plot, plot_note = plot_runs(runs, args.plot, title)
    print(f"plot: {plot}" if plot else f"plot: {plot_note}")

    report = header
    report.update(
        teacher=args.teacher, student_checkpoints=args.student or [],
        student_checkpoint=next((s for s in args.student or [] if not is_model_name(s)), None),
        audio_context_override=(None if args.audio_ctx is None and args.audio_margin is None
                                else {"mode": args.audio_ctx, "margin": args.audio_margin}),
        dtype=str(teacher.model.dtype), quick=args.quick,
        sets=describe_sets(description, utterances, windows), batch_sizes=args.batch_sizes, decoders=args.decoders,
        warmup=args.warmup, repeats=args.repeats, passes=args.passes, steps_timed=STEPS_TIMED,
        models=models, runs=runs, split=split, memory_floor=floor, audio_context_sweep=sweep, plot=plot,
        plot_note=plot_note, notes=report_notes(device))
    write_json(report, args.json)
