"""`python bench.py peers`: the same utterances and the same weights through other Whisper engines.

    python bench.py peers                            # every engine that is installed
    python bench.py peers --quick --peers openai     # CI-sized (QUICK below), openai-whisper only

Engines; every peer is optional, and one that is not installed is a row saying so, never a crash:
  ours                         transcribe_clips(), the teacher decoded as in `python bench.py`
  ours int8 SCOPE              the same with int8 weights (quantize.py; CPU only): the default scope, and all
  openai-whisper decode        whisper.decode() on whisper.log_mel_spectrogram(pad_or_trim(audio)), batched
  openai-whisper transcribe    whisper.transcribe() on the array, one utterance per call (its usual entry point)
  transformers generate        WhisperFeatureExtractor + WhisperForConditionalGeneration.generate(), batched; built
                               offline from our dims and state dict (nothing is downloaded), its tokens decoded
                               by our tokenizer
  faster-whisper TYPE          CTranslate2's WhisperModel.transcribe(), one utterance per call, no VAD; our CT2
                               model.bin is its native format (TYPE: float32 and int8 on CPU, float16 on CUDA)
Every engine goes from the waveform to text with its own front end, greedy, temperature 0 only (no fallback), no
timestamps, English. Engines that take one utterance per call run at batch 1 only (batch 1 always runs). All
engines run one after the other, each in a fresh process of its own (see measure_engines for why); per batch size,
each decodes batch 0 untimed (its peak memory is recorded), then --passes timed passes; per batch the median.
WER is against the references and against our transcripts ("vs ours"): on the same weights they should agree.
"""
import concurrent.futures
import functools
import importlib.metadata
import importlib.util
import multiprocessing
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List

import torch

from audio import SAMPLE_RATE
from benchmarks.common import (
    ByDevice, Column, column, full_batches, load_clips, machine, one_line, pick_device, plot_runs, print_table,
    report_header, run_summary, settle_defaults, time_in_turns, write_json,
)
from decoding import NO_FALLBACK, DecodingOptions, suppressed_tokens
from evaluate import word_error_rate
from load import DTYPES, default_dtype, load_model
from model import Whisper
from quantize import DEFAULT_SCOPE, int8_for_decoding
from tokenizer import tokenizer_for
from transcribe import transcribe_clips
from weights import HF_BLOCK_NAMES, HF_TOP_NAMES, find_model_files

PEERS = ("openai", "transformers", "faster")  # --peers choices; ours always runs
INT8_SCOPES = sorted({DEFAULT_SCOPE, "all"})  # ours with int8 weights (CPU): the default, and faster-whisper's
# Every default of the mode, read by both the flags' help (bench.py) and settle_defaults; --dtype defaults to
# load.default_dtype. Batch 1 always runs.
DEFAULTS = {"model": "base", "utterances": 30, "batch_sizes": ByDevice([1, 16], [1]), "passes": ByDevice(3, 1),
            "peers": list(PEERS), "json": "bench-peers.json", "plot": "bench-peers.png"}
# What --quick changes: a CI-sized run.
QUICK = {"model": "tiny.en", "utterances": 3, "batch_sizes": [1, 2], "passes": 1}
MAX_NEW_TOKENS = 224  # ours and openai-whisper stop at half the text context

ROW_FIELDS = ("model", "package", "version", "status", "set", "decoder", "batch_size", "n_items",
              "n_batches", "audio_seconds", "total_s", "rtf", "audio_s_per_s", "latency_ms_median", "latency_ms_p90",
              "tokens", "tokens_per_s", "peak_mib", "wer", "wer_vs_ours", "time_vs_ours", "batch_ms",
              "batch_audio_s", "hypotheses", "note")


class Unavailable(Exception):
    """The engine is installed but cannot run these weights here; the row says why."""


@dataclass
class Engine:
    name: str
    peer: str  # the --peers group it belongs to ("ours" for ours)
    module: str  # what must be importable
    package: str  # whose version is reported
    batched: bool  # one call takes a whole batch; else one utterance per call, so batch 1 only
    build: Callable  # (our model, model name or path, device) -> transcribe(list of arrays) -> list of texts
    torch_memory: bool = True  # on CUDA, torch's allocator sees its memory


# ----------------------------------------------------------------------------- the engines

def build_ours(model: Whisper, source, device):
    options = DecodingOptions(language="en", without_timestamps=True)
    return lambda clips: [r.text for r in transcribe_clips(model, clips, options, NO_FALLBACK, len(clips))]


def build_ours_int8(scope):
    """Ours with int8 weights in `scope` (quantize.py); "all" is the counterpart of faster-whisper int8."""
    def build(model: Whisper, source, device):
        try:
            return build_ours(int8_for_decoding(model, scope), source, device)
        except ValueError as why:  # not float32 (e.g. --dtype bfloat16), or no int8 engine in this build
            raise Unavailable(str(why)) from None
    return build


@functools.lru_cache(maxsize=1)  # decode and transcribe share one copy
def openai_copy(model: Whisper):
    """openai-whisper's own Whisper class holding our state dict: the same weights, their code."""
    import whisper

    theirs = whisper.model.Whisper(whisper.model.ModelDimensions(**asdict(model.dims)))
    theirs.load_state_dict(model.state_dict())
    return theirs.to(model.device, model.dtype).eval()


def build_openai_decode(model: Whisper, source, device):
    import whisper

    theirs = openai_copy(model)
    options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=model.dtype == torch.float16)

    def transcribe(clips):
        mel = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(c).to(device)),
                                                       theirs.dims.n_mels) for c in clips])
        return [r.text for r in whisper.decode(theirs, mel, options)]
    return transcribe


def build_openai_transcribe(model: Whisper, source, device):
    import whisper

    theirs = openai_copy(model)
    fp16 = model.dtype == torch.float16
    return lambda clips: [whisper.transcribe(theirs, c, language="en", temperature=0.0, without_timestamps=True,
                                             condition_on_previous_text=False, fp16=fp16, verbose=None)["text"]
                          for c in clips]


# Our (OpenAI) parameter names -> Hugging Face's: the inverse of weights.py's mapping.
OPENAI_TO_HF_BLOCK = {ours: hf for hf, ours in HF_BLOCK_NAMES.items()}
OPENAI_TO_HF_TOP = {ours: hf for hf, ours in HF_TOP_NAMES.items()}


def huggingface_name(name: str) -> str:
    block = re.match(r"(encoder|decoder)\.blocks\.(\d+)\.(.+)\.(weight|bias)$", name)
    if block:
        side, index, module, kind = block.groups()
        return f"model.{side}.layers.{index}.{OPENAI_TO_HF_BLOCK[module]}.{kind}"
    if name.endswith("positional_embedding"):  # a bare tensor for OpenAI, an embedding's .weight for HF
        return f"model.{OPENAI_TO_HF_TOP[name]}.weight"
    module, _, kind = name.rpartition(".")
    return f"model.{OPENAI_TO_HF_TOP[module]}.{kind}"


def huggingface_state(model: Whisper) -> dict:
    state = {huggingface_name(name): tensor for name, tensor in model.state_dict().items()}
    state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]  # the tied output projection
    return state


def build_transformers(model: Whisper, source, device):
    os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: everything below is built locally
    import transformers
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    transformers.logging.set_verbosity_error()  # its per-call advice about attention masks is not ours to fix
    dims = model.dims
    tokenizer = tokenizer_for(model, language="en")
    config = WhisperConfig(
        vocab_size=dims.n_vocab, num_mel_bins=dims.n_mels, d_model=dims.n_audio_state,
        encoder_layers=dims.n_audio_layer, encoder_attention_heads=dims.n_audio_head,
        decoder_layers=dims.n_text_layer, decoder_attention_heads=dims.n_text_head,
        encoder_ffn_dim=4 * dims.n_audio_state, decoder_ffn_dim=4 * dims.n_text_state,
        max_source_positions=dims.n_audio_ctx, max_target_positions=dims.n_text_ctx,
        decoder_start_token_id=tokenizer.sot, eos_token_id=tokenizer.eot, pad_token_id=tokenizer.eot,
        bos_token_id=tokenizer.eot)
    theirs = WhisperForConditionalGeneration(config)
    theirs.load_state_dict(huggingface_state(model), strict=True)
    # What a hub checkpoint's generation_config.json would hold, from our tokenizer: the same suppressed tokens.
    generation = dict(
        decoder_start_token_id=tokenizer.sot, eos_token_id=tokenizer.eot, pad_token_id=tokenizer.eot,
        bos_token_id=tokenizer.eot, max_length=dims.n_text_ctx, no_timestamps_token_id=tokenizer.no_timestamps,
        suppress_tokens=suppressed_tokens(tokenizer, "-1"),
        begin_suppress_tokens=tokenizer.encode(" ") + [tokenizer.eot],
        is_multilingual=model.is_multilingual, return_timestamps=False)
    language = {}
    if model.is_multilingual:
        generation.update(lang_to_id={f"<|{code}|>": token for code, token in
                                      zip(tokenizer.all_language_codes, tokenizer.all_language_tokens)},
                          task_to_id={"transcribe": tokenizer.transcribe, "translate": tokenizer.translate})
        language = {"language": "en", "task": "transcribe"}  # English-only models refuse these arguments
    theirs.generation_config = GenerationConfig(**generation)
    theirs = theirs.to(device, model.dtype).eval()
    features = WhisperFeatureExtractor(feature_size=dims.n_mels)

    @torch.no_grad()
    def transcribe(clips):
        mel = features(clips, sampling_rate=SAMPLE_RATE, return_tensors="pt", device=device.type).input_features
        out = theirs.generate(mel.to(device, model.dtype), do_sample=False, num_beams=1,
                              max_new_tokens=MAX_NEW_TOKENS, **language)
        return [tokenizer.decode([t for t in row.tolist() if t < tokenizer.eot]).strip() for row in out]
    return transcribe


def ct2_model(source, compute_type, device):
    """faster-whisper's WhisperModel on our CT2 files; a model shipped in parts is joined in a temporary folder."""
    from faster_whisper import WhisperModel

    files = find_model_files(source)
    if not files[0].name.startswith("model.bin"):
        raise Unavailable(f"{source} is not a CTranslate2 model (faster-whisper's format)")
    if not (files[0].parent / "tokenizer.json").exists():  # faster-whisper would download one
        raise Unavailable(f"no tokenizer.json beside {files[0]}")
    threads = torch.get_num_threads()
    if len(files) == 1:
        return WhisperModel(str(files[0].parent), device=device.type, compute_type=compute_type, cpu_threads=threads)
    with tempfile.TemporaryDirectory() as folder:  # WhisperModel reads everything when built
        with open(Path(folder) / "model.bin", "wb") as joined:
            for part in files:
                with open(part, "rb") as piece:
                    shutil.copyfileobj(piece, joined)
        for extra in ("config.json", "vocabulary.txt", "tokenizer.json", "preprocessor_config.json"):
            if (files[0].parent / extra).exists():
                shutil.copy(files[0].parent / extra, folder)
        return WhisperModel(folder, device=device.type, compute_type=compute_type, cpu_threads=threads)


def build_faster(compute_type):
    def build(model: Whisper, source, device):
        theirs = ct2_model(source, compute_type, device)

        def transcribe(clips):
            texts = []
            for clip in clips:
                segments, _ = theirs.transcribe(clip, language="en", beam_size=1, best_of=1, temperature=0.0,
                                                without_timestamps=True, condition_on_previous_text=False,
                                                vad_filter=False)
                texts.append("".join(s.text for s in segments).strip())  # segments is lazy: this decodes
            return texts
        return transcribe
    return build


def engines(device) -> List[Engine]:
    faster_types = ("float16",) if device.type == "cuda" else ("float32", "int8")
    ours_int8 = [] if device.type == "cuda" else [
        Engine(f"ours int8 {scope}", "ours", "model", "fastwhisper", True, build_ours_int8(scope))
        for scope in INT8_SCOPES]
    return [
        Engine("ours", "ours", "model", "fastwhisper", True, build_ours),
    ] + ours_int8 + [
        Engine("openai-whisper decode", "openai", "whisper", "openai-whisper", True, build_openai_decode),
        Engine("openai-whisper transcribe", "openai", "whisper", "openai-whisper", False, build_openai_transcribe),
        Engine("transformers generate", "transformers", "transformers", "transformers", True, build_transformers),
    ] + [Engine(f"faster-whisper {t}", "faster", "faster_whisper", "faster-whisper", False, build_faster(t),
                torch_memory=False) for t in faster_types]


# ----------------------------------------------------------------------------- running them

def version_of(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def prepare(engine: Engine, model: Whisper, source, device):
    """(transcribe or None, status): the engine built, or why it cannot run here."""
    if importlib.util.find_spec(engine.module) is None:
        return None, "not installed"
    print(f"loading {engine.name}", flush=True)
    try:
        return engine.build(model, source, device), "ok"
    except Unavailable as why:
        return None, f"unavailable: {why}"
    except Exception as error:  # noqa: BLE001  a peer that fails to load costs its rows, not the table
        return None, f"error: {one_line(error)}"


def engine_row(engine: Engine, batch_size, status, utterances, batches=None, timed=None, device=None) -> dict:
    """One engine at one batch size: measured, or a status saying why not."""
    row = dict.fromkeys(ROW_FIELDS)
    row.update(model=engine.name, package=engine.package, set="utterances", decoder="greedy", batch_size=batch_size,
               n_items=len(utterances), status=status,
               version=version_of(engine.package) if engine.peer != "ours" else None)
    if timed is None:
        return row
    if timed.error:
        return {**row, "status": f"error: {timed.error}"}
    hypotheses = {c.id: text for batch, texts in zip(batches, timed.outputs) for c, text in zip(batch, texts)}
    row.update(run_summary(timed.seconds, [sum(c.seconds for c in batch) for batch in batches]))
    row.update(wer=word_error_rate([c.text for c in utterances], [hypotheses[c.id] for c in utterances])["wer"],
               hypotheses=[hypotheses[c.id] for c in utterances], peak_mib=timed.peak_mib)
    if device.type == "cuda" and not engine.torch_memory:
        row.update(peak_mib=None, note="peak memory not measured: CTranslate2 allocates GPU memory outside torch")
    return row


def measure_engines(chosen: List[Engine], source, dtype, utterances, batch_sizes, passes, device) -> List[dict]:
    """Every chosen engine at every batch size it takes, each engine in a process of its own, one after the
    other. Why a process each: engines in one process change each other's speed. After one call to
    faster-whisper, our encoder ran ~35 % slower for the rest of the process (glibc's malloc adapts its
    thresholds to what was freed before, and CTranslate2 brings its own OpenMP runtime), so a shared
    process measured ours at 0.131 RTF where ours alone takes 0.099. A fresh process per engine is how
    people run them."""
    rows = []
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing inherited from this one
    for engine in chosen:
        sizes = [b for b in batch_sizes if engine.batched or b == 1]
        if importlib.util.find_spec(engine.module) is None:
            rows += [engine_row(engine, b, "not installed", utterances) for b in sizes]
            continue
        print(f"{engine.name}: batch sizes {sizes}, in a process of its own", flush=True)
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            try:
                status, timed = pool.submit(measure_engine_alone, engine.name, source, dtype, device.type,
                                            torch.get_num_threads(), utterances, sizes, passes).result()
            except Exception as error:  # noqa: BLE001  the child died or raised: its rows, not the table
                status, timed = f"error: {one_line(error)}", {}
        for b in sizes:
            rows.append(engine_row(engine, b, status, utterances, full_batches(utterances, b), timed[b], device)
                        if b in timed else engine_row(engine, b, status, utterances))
    return rows


def measure_engine_alone(name, source, dtype, device_type, threads, utterances, batch_sizes, passes):
    """In the engine's own process: (status, {batch size: Timed}). The engine is built (ours and the torch
    peers from our model loaded here, faster-whisper from the files alone), then timed batch size by
    batch size."""
    torch.set_num_threads(threads)
    device = torch.device(device_type)
    engine = next(e for e in engines(device) if e.name == name)
    model = None if engine.peer == "faster" else load_model(source, device, dtype).optimize_for_decoding()
    transcribe, status = prepare(engine, model, source, device)
    if transcribe is None:
        return status, {}
    call = functools.partial(transcribe_texts, transcribe)
    return status, {b: time_in_turns({name: call}, full_batches(utterances, b), passes, device)[name]
                    for b in batch_sizes}


def transcribe_texts(transcribe, index, batch):
    return transcribe([c.audio for c in batch])


def compare_with_ours(rows):
    """wer_vs_ours (our transcripts as the reference) and time_vs_ours (their time / ours) at each batch size."""
    ours = {r["batch_size"]: r for r in rows if r["model"] == "ours" and r["status"] == "ok"}
    for row in rows:
        mine = ours.get(row["batch_size"])
        if row["status"] == "ok" and mine is not None:
            row["wer_vs_ours"] = word_error_rate(mine["hypotheses"], row["hypotheses"])["wer"]
            row["time_vs_ours"] = row["total_s"] / mine["total_s"]


COLUMNS = (column("engine", "model"), Column("version", lambda r: r["version"] or "-"),
           column("batch", "batch_size", "d"), column("RTF", "rtf", ".4f"), column("audio s/s", "audio_s_per_s", ".2f"),
           column("median ms", "latency_ms_median", ".1f"), column("p90 ms", "latency_ms_p90", ".1f"),
           column("peak MiB", "peak_mib", ".0f"), Column("WER %", lambda r: percent(r["wer"]), ".2f"),
           Column("vs ours %", lambda r: percent(r["wer_vs_ours"]), ".2f"),
           column("time/ours", "time_vs_ours", lambda v: f"{v:.2f}x"))


def percent(fraction):
    return None if fraction is None else 100 * fraction


def print_summary(rows):
    """Our RTF beside faster-whisper's at batch 1, greedy: the engine people pick for speed on CPU."""
    at_1 = {r["model"]: r for r in rows if r["batch_size"] == 1 and r["status"] == "ok"}
    if "ours" not in at_1:
        return
    print(f"\nbatch 1: ours RTF {at_1['ours']['rtf']:.4f}")
    for name in [f"ours int8 {scope}" for scope in INT8_SCOPES] + ["faster-whisper float32", "faster-whisper float16",
                                                                   "faster-whisper int8"]:
        if name in at_1:
            print(f"  {name}: RTF {at_1[name]['rtf']:.4f}, {at_1[name]['time_vs_ours']:.2f}x our time")


def run(args):
    device = pick_device(args.device)
    settle_defaults(args, device, DEFAULTS, QUICK)
    args.batch_sizes = sorted(set(args.batch_sizes) | {1})
    utterances, _, description = load_clips(args.data, args.speakers, args.utterances, 0)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    header = report_header("peers", device)
    print(f"{machine(header)}; dtype {dtype}; model {args.model}")
    print(f"utterances: {description}: {sum(c.seconds for c in utterances):.1f} s")
    print(f"batch sizes {args.batch_sizes} (engines that take one utterance per call: 1); peers {args.peers}; "
          f"{args.passes} timed pass(es) after a warm-up batch")

    chosen = [e for e in engines(device) if e.peer == "ours" or e.peer in args.peers]
    rows = measure_engines(chosen, args.model, dtype, utterances, args.batch_sizes, args.passes, device)
    compare_with_ours(rows)
    print_table(COLUMNS, rows, f"engines on {machine(header)}", lead=3,
                why_not=lambda r: r["status"] if r["status"] != "ok" else None)
    print_summary(rows)
    title = f"{header['device_name']}, {dtype}: {args.model}, same weights in every engine"
    plot, plot_note = plot_runs([r for r in rows if r["status"] == "ok"], args.plot, title)
    print(f"plot: {plot}" if plot else f"plot: {plot_note}")

    report = header
    report.update(
        model=args.model, dtype=str(dtype), quick=args.quick, peers=args.peers,
        utterances={"description": description, "n": len(utterances),
                    "audio_seconds": sum(c.seconds for c in utterances), "ids": [c.id for c in utterances]},
        batch_sizes=args.batch_sizes, passes=args.passes, rows=rows, plot=plot, plot_note=plot_note,
        notes=["every engine: waveform to text with its own front end, greedy, temperature 0, no timestamps, "
               "English; one warm-up batch, then the median of the timed passes per batch",
               "wer: against the references; wer_vs_ours: against our transcripts; time_vs_ours: total_s / ours",
               "engines that take one utterance per call (openai-whisper transcribe, faster-whisper) run at batch 1",
               "peak_mib: on CUDA torch's allocator (null for CTranslate2); on CPU the peak-RSS growth of the "
               "warm-up call"])
    write_json(report, args.json)
