"""Distil a Whisper teacher into a faster student that runs on the real length of the audio.

    python distill.py                                   # tiny.en -> its decoder over the real-length audio, on CPU
    python distill.py --teacher base --decoder-layers 2 --method kd --out runs/base-kd
    torchrun --nproc_per_node 4 distill.py ...          # data-parallel (NCCL on GPU, gloo on CPU)
    python distill.py --out runs/x --resume             # continue exactly where runs/x stopped

Steps (prepare.py, then training.py):
1. label: the teacher transcribes every training example on its 30 s window: the utterances of --data
   (minus the dev speakers and, always, the test split's; unlabeled sources too) and real 30 s windows of
   consecutive utterances. A share of the targets keeps the teacher's timestamp tokens, and a share is
   prompted with the teacher's text of the utterances before it (as transcribe() prompts each window).
   Pseudo-labels far from a reference are dropped. With --speeds, every example is also used played faster
   or slower (speed perturbation), with the recording's label.
2. cache: the teacher's top-k logits and its decoder blocks' outputs on each target, and the frozen encoder's
   output on the real length of the audio plus a few margins; all on disk (--cache), keyed and resumable.
3. train: the student (the teacher's encoder, frozen, and --decoder-layers of its decoder) with the loss of
   --method (plus, with --hidden-weight, each block pulled to the teacher block it stands for), on the
   cached data; the dev WER now and then; the best student kept as OUT/student.pt, which transcribe.py,
   evaluate.py and bench.py load with its audio-context policy (the real length + margin).
4. report: the student's dev WER minus the teacher's with a 95 % paired bootstrap interval (their per-utterance
   reports are OUT/dev-student.json and OUT/dev-teacher.json, as evaluate.py --json writes them), the same on
   the held-out test split (OUT/test-*.json; dev chooses, test decides), the student's speed-up over the
   teacher at batch 1 (float32, and on CPU both with int8 weights, quantize.py), and both models on the
   long recordings of --long-form.
OUT/checkpoint.pt holds the training state; it is written atomically, periodically, on SIGINT/SIGTERM and at
the end, and --resume continues from it with the same results as an unbroken run. --max-minutes ends a run
early as its last step would (dev WER, student kept, closing report).
"""
import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from askd import ASKDConfig
from audio import load_audio
from cache import ArrayCache
from data import DEV_SPEAKERS, TEST_SOURCE, TEST_SPEAKERS, data_root, held_out_test, list_utterances
from decoding import NO_FALLBACK
from evaluate import compare_reports, describe_comparison, evaluate, long_form, paired_bootstrap
from load import atomic_save, atomic_write, default_device, load_model, save_checkpoint
from model import AudioContext
from quantize import DEFAULT_SCOPE, int8_for_decoding
from prepare import (
    TargetSettings, at_speeds, attach_prompts, cache_targets, filter_by_wer, label_examples, labelling_key,
    plan_examples, targets_key, training_utterances, with_human_labels,
)
from student import layers_stood_for, make_student, output_shortlist
from tokenizer import tokenizer_for
from training import GREEDY, DevScorer, NothingLoadable, PreparedDataset, Trainer, TrainSettings
from transcribe import transcribe, transcribe_clips

SHOWCASE_AUDIO = "longform/jfk.flac"  # under the data folder: transcribed by teacher and student at the end
LONG_FORM = "longform"  # under the data folder: recordings of minutes, scored window by window at the end
DEFAULT_DATA = ("train-clean-5", "train-clean-5-opus", "unlabeled/train-clean-100")  # under the data folder
# (the test speakers of train-clean-5-opus are always left out of training: data.TEST_SPEAKERS)
DEV_REPORTS = {"teacher": "dev-teacher.json", "student": "dev-student.json"}  # in OUT: evaluate() reports
TEST_REPORTS = {"teacher": "test-teacher.json", "student": "test-student.json"}  # in OUT: the closing report's


def add_config_arguments(group, config_class) -> None:
    """One flag per field of a config dataclass (--phase-a-end for phase_a_end), with the field's default,
    type, help and choices: the dataclass is the only place they are written."""
    for f in fields(config_class):
        group.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                           help=f.metadata.get("help"), choices=f.metadata.get("choices"))


def config_from_arguments(args: argparse.Namespace, config_class):
    return config_class(**{f.name: getattr(args, f.name) for f in fields(config_class)})


def integers(text: str):
    return tuple(int(x) for x in text.split(","))


def speeds(text: str):
    """--speeds 0.9,1.0,1.1: distinct factors within [0.5, 2]."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.9,1.0,1.1, got {text!r}")
    if len(set(values)) != len(values) or not all(0.5 <= v <= 2.0 for v in values):
        raise argparse.ArgumentTypeError(f"speeds must be distinct and within [0.5, 2], got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Distil Whisper into a faster student (ASKD, kd or ce).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default="tiny.en", help="teacher model name or checkpoint path (base: ~2.5x the "
                                                        "preparation time of tiny.en)")
    p.add_argument("--data", nargs="+", default=[str(data_root() / d) for d in DEFAULT_DATA],
                   help="training folder(s) or JSONL manifest(s); sources without transcripts give pseudo-labels only")
    p.add_argument("--exclude-speakers", default=",".join(DEV_SPEAKERS), help="speakers kept out of training (the dev set)")
    p.add_argument("--eval-data", nargs="*", default=None, help="dev folder(s)/manifest(s); default: the excluded "
                                                               "speakers of the first --data source")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N dev utterances only")
    p.add_argument("--test-data", nargs="*", default=None,
                   help="folder(s)/manifest(s) the closing report scores teacher and student on, to compare them; "
                        f"default: the held-out test split (speakers {', '.join(TEST_SPEAKERS)} of {TEST_SOURCE}, "
                        "never trained on or used to choose; ~3 min a model with tiny.en); the flag alone: none")
    p.add_argument("--long-form", default=str(data_root() / LONG_FORM), help="recordings (with transcripts) that "
                   "teacher and student transcribe window by window at the end, about a minute each with tiny.en; "
                   "'' skips them")
    p.add_argument("--out", default="runs/distill", help="output folder")
    p.add_argument("--cache", default=None, help="cache folder for labels and targets (default: OUT/cache); runs "
                                                 "with the same teacher and settings can share one")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    student = p.add_argument_group("student")
    student.add_argument("--decoder-layers", type=int, default=4, help="decoder blocks, copied from evenly spaced teacher "
                                                                       "blocks; each one costs decoding time per token")
    student.add_argument("--encoder-layers", type=int, default=None, help="thin the encoder to N blocks (trained, "
                                                                          "from the log-Mel: much slower steps)")
    student.add_argument("--trainable-encoder-layers", type=int, default=0,
                         help="0: decoder only, over the cached frozen encoder (fastest); K: the top K encoder "
                              "blocks train too; -1: the whole student from the log-Mel (slowest)")
    student.add_argument("--margin", type=int, default=16, help="encoder positions (20 ms) past the audio that the "
                                                                "student is given when it transcribes")
    student.add_argument("--margins", type=integers, default=(8, 16, 32),
                         help="margins seen in training (the jitter); one cached encoder output each")
    student.add_argument("--shortlist", type=int, default=0,
                         help="keep only these many most frequent text tokens (plus every token of the targets and "
                              "the special ones) in the student's output layer: less work per decoded token, at the "
                              "risk of words it can no longer spell; 0: the whole vocabulary")
    add_config_arguments(p.add_argument_group("method (askd.py)"), ASKDConfig)
    targets = p.add_argument_group("targets")
    targets.add_argument("--labels", choices=("teacher", "human"), default="teacher",
                         help="the target of an example with a reference: the teacher's transcript, or the "
                              "reference's words in the teacher's style (its casing, punctuation and numerals where "
                              "the two agree; human_labels.py); audio without a reference keeps the teacher's")
    targets.add_argument("--timestamp-share", type=float, default=0.5,
                         help="share of utterances whose target keeps the teacher's timestamps (windows always do)")
    targets.add_argument("--prompt-share", type=float, default=0.5,
                         help="share of examples prompted with the teacher's text of the audio before them, as "
                              "transcribe() prompts each window with the text so far (without: long-form loops)")
    targets.add_argument("--windows", type=int, default=100, help="real 30 s windows of consecutive utterances added")
    targets.add_argument("--wer-filter", type=float, default=0.2, help="drop pseudo-labels whose WER against the "
                                                                       "reference is above this")
    targets.add_argument("--speeds", type=speeds, default=(1.0,),
                         help="speed perturbation: every example also at these speeds (0.9,1.0,1.1 triples the "
                              "examples and the preparation of their targets; the label is the recording's)")
    targets.add_argument("--top-k", type=int, default=64, help="teacher logits kept per token in the cache")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=int, default=16, help="per process")
    opt.add_argument("--grad-accum", type=int, default=1)
    opt.add_argument("--lr", type=float, default=3e-5)
    opt.add_argument("--weight-decay", type=float, default=0.01)
    opt.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    opt.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    opt.add_argument("--spec-augment", action="store_true", help="mask random Mel bands and time spans (only "
                     "where the student trains from the log-Mel: --trainable-encoder-layers -1 or --encoder-layers N)")
    opt.add_argument("--max-steps", type=int, default=None, help="optimiser steps (default: from --epochs)")
    opt.add_argument("--epochs", type=float, default=2, help="passes over the examples; with the defaults one "
                     "epoch is ~62 steps of ~4.5 s for tiny.en on a 2-core CPU")
    opt.add_argument("--max-minutes", type=float, default=0, help="a time budget for training: after 10 timed "
                     "steps the schedules are laid over the steps that fit; the run then ends as its last step "
                     "would (dev WER, student kept, closing report); 0: no limit")
    book = p.add_argument_group("bookkeeping")
    book.add_argument("--eval-every", type=int, default=0, help="steps between dev evaluations (0: only at the end; "
                                                                "each costs about a minute with tiny.en)")
    book.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    book.add_argument("--log-every", type=int, default=10)
    book.add_argument("--workers", type=int, default=0, help="data-loading processes per training process")
    book.add_argument("--seed", type=int, default=0)
    book.add_argument("--device", default=None)
    args = p.parse_args(argv)
    if args.spec_augment and args.trainable_encoder_layers != -1 and args.encoder_layers is None:
        p.error("--spec-augment changes the encoder's input: it needs the student trained from the log-Mel "
                "(--trainable-encoder-layers -1, or a thinned encoder: --encoder-layers N)")
    return args


# ---------------------------------------------------------------------------------------------
# Processes and logging


def setup_distributed(device_arg):
    """(rank, world size, device). Under torchrun, one process per GPU (or CPU process with gloo)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    use_cuda = torch.device(device_arg or default_device()).type == "cuda"
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def make_logger(out: Path, rank: int):
    """log(message, **fields): the message to stderr, the fields (with the time) to OUT/log.jsonl."""
    log_file = out / "log.jsonl"

    def log(message=None, **record):
        if rank != 0:
            return
        if message:
            print(message, file=sys.stderr, flush=True)
        if record:
            with open(log_file, "a") as f:
                f.write(json.dumps(dict(time=round(time.time(), 2), **record)) + "\n")
    return log


def commit_of_this_code() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def frozen_encoder_layers(args, student):
    """How many of the student's encoder blocks are frozen and cached; None: it trains from the log-Mel
    (a thinned encoder, or --trainable-encoder-layers -1)."""
    if args.trainable_encoder_layers < 0 or args.encoder_layers is not None:
        return None
    return student.dims.n_audio_layer - min(args.trainable_encoder_layers, student.dims.n_audio_layer)


def dev_utterances(args):
    if args.eval_data is not None:
        return [u for source in args.eval_data for u in list_utterances(source)][: args.eval_limit]
    if not args.exclude_speakers:
        return []
    try:
        return list_utterances(args.data[0], speakers=args.exclude_speakers.split(","))[: args.eval_limit]
    except ValueError:  # no such speakers in this source
        return []


# ---------------------------------------------------------------------------------------------
# Preparation (rank 0 fills the caches; the others wait, then read them)


def prepare(args, teacher, student, tokenizer, rank, world, log):
    """(labelled examples, targets cache, settings, counts): every example the student trains on."""
    cache_root = Path(args.cache) if args.cache else Path(args.out) / "cache"
    settings = TargetSettings(args.top_k, args.temperature, tuple(args.margins), frozen_encoder_layers(args, student))
    utterances = training_utterances(args.data, args.exclude_speakers.split(",") if args.exclude_speakers else [])
    examples = plan_examples(utterances, args.timestamp_share, args.windows)
    labels = ArrayCache(cache_root / "labels", labelling_key(teacher), log)
    targets = ArrayCache(cache_root / "targets", targets_key(teacher, student, settings), log)
    started = time.time()
    for turn in range(2 if world > 1 else 1):  # under torchrun: rank 0 first, then the others read
        if (rank == 0) == (turn == 0):
            everything, counts = label_examples(teacher, examples, labels, args.batch_size, log)
            labelled, counts["filtered_by_wer"] = filter_by_wer(everything, args.wer_filter)  # the same examples
            if args.labels == "human":  # for either kind of label, so that only the targets differ
                everything = with_human_labels(everything, tokenizer)
                labelled = with_human_labels(labelled, tokenizer)
                counts["human_labels_changed"] = sum(x.human for x in labelled)
            labelled = attach_prompts(labelled, everything, args.prompt_share, teacher.dims.n_text_ctx)
            labelled = at_speeds(labelled, args.speeds, tokenizer.timestamp_begin)
            cached = set(cache_targets(teacher, student, tokenizer, labelled, labels, targets, settings, log))
            labelled = [x for x in labelled if x.target_item in cached]
        if world > 1:
            dist.barrier()
    counts.update(examples_kept=len(labelled), perturbed=sum(x.example.speed != 1.0 for x in labelled),
                  windows=sum(len(x.example.audio) > 1 for x in labelled),
                  timestamped=sum(x.example.timestamps for x in labelled),
                  prompted=sum(bool(x.prompt) for x in labelled), preparation_s=round(time.time() - started, 1))
    return labelled, targets, settings, counts


# ---------------------------------------------------------------------------------------------
# The closing report


@torch.no_grad()
def speed_up(teacher, student, clips, rounds: int = 2, int8: Optional[str] = None) -> float:
    """The student's speed-up over the teacher at batch 1 (greedy, float32 activations, each on its own audio
    context; with `int8`, copies of both with int8 weights in that scope), timed alternately per clip so that
    load on a shared machine falls on both."""
    spent = {"teacher": 0.0, "student": 0.0}
    fast = {"teacher": teacher.optimize_for_decoding(), "student": student.optimize_for_decoding()}
    if int8:
        fast = {name: int8_for_decoding(copy.deepcopy(model), int8) for name, model in fast.items()}
    for name, model in fast.items():  # warm-up
        transcribe_clips(model, clips[:1], GREEDY, NO_FALLBACK, batch_size=1)
    for _ in range(rounds):
        for clip in clips:
            for name, model in fast.items():
                tick = time.perf_counter()
                transcribe_clips(model, [clip], GREEDY, NO_FALLBACK, batch_size=1)
                spent[name] += time.perf_counter() - tick
    return spent["teacher"] / spent["student"]


def closing_report(args, teacher, out: Path, dev, student_wer: Optional[float], log):
    """The kept student against the teacher: dev WER with its interval, speed-up, and both on long
    recordings and a familiar one."""
    if dev:
        compare_on_dev(out, student_wer, log)
    student = load_model(out / "student.pt", device=teacher.device, dtype=torch.float32)
    clips = [load_audio(u.audio) for u in dev[:: max(len(dev) // 8, 1)][:8]]
    if clips:
        log(f"measuring the student's speed-up over the teacher on {len(clips)} dev clips (batch 1, float32)")
        ratio = speed_up(teacher, student, clips)
        log(f"student speed-up over the teacher: {ratio:.2f}x", speed_up=ratio)
        if teacher.device.type == "cpu":  # the faster teacher a CPU user would run (quantize.py)
            ratio = speed_up(teacher, student, clips, int8=DEFAULT_SCOPE)
            log(f"the same, both with int8 weights ({DEFAULT_SCOPE} scope): {ratio:.2f}x", speed_up_int8=ratio)
    if args.test_data != []:
        try:
            test = comparison_utterances(args)
        except (FileNotFoundError, ValueError) as err:
            log(f"warning: no test data ({err}): student and teacher not compared on it")
        else:
            compare_on_test(teacher, student, test, out, args.batch_size, log)
    long_form_report(teacher, student, args.long_form, log)
    path = data_root() / SHOWCASE_AUDIO
    if path.exists():
        audio = load_audio(path)
        for name, model in (("teacher", teacher), ("student", student)):
            log(f"{name} on {SHOWCASE_AUDIO}: {transcribe(model, audio, GREEDY, NO_FALLBACK)['text'].strip()}")


def write_dev_report(report: dict, model: str, path: Path):
    """An evaluate() report (per-utterance hypotheses and error counts) with the model's name, as
    evaluate.py --json writes one: evaluate.py --compare reads it."""
    text = json.dumps({"model": model, **report}, indent=1, ensure_ascii=False)
    atomic_write(path, lambda f: f.write(text.encode()))


def compare_on_dev(out: Path, student_wer: Optional[float], log):
    """The kept student's dev WER minus the teacher's, with a 95 % interval from the paired bootstrap over
    the dev utterances: whether the dev set can tell the two apart at all."""
    paths = [out / DEV_REPORTS[name] for name in ("student", "teacher")]
    missing = [path.name for path in paths if not path.exists()]
    if missing:  # a run resumed from a checkpoint older than these reports
        log(f"note: no {' or '.join(missing)} in {out}: no student - teacher interval")
        return
    try:
        result = compare_reports(*paths)
        reported_wer = json.loads(paths[0].read_text())["wer"]
    except (ValueError, KeyError) as err:  # a damaged report costs the interval, not the run
        log(f"warning: {err}: no student - teacher interval")
        return
    if reported_wer != student_wer:  # killed between writing student.pt and its report
        log(f"warning: {paths[0]} is not the report of the kept student.pt: no student - teacher interval")
        return
    log(f"student - teacher dev WER: {describe_comparison(result, ('the student', 'the teacher'))}",
        student_vs_teacher=result)


def comparison_utterances(args):
    """The utterances of --test-data, by default the held-out test split; an error that says which is
    missing (the closing report then goes without it)."""
    if args.test_data is None:
        return held_out_test()
    return [u for source in args.test_data for u in list_utterances(source)]


def compare_on_test(teacher, student, utterances, out: Path, batch_size: int, log):
    """Teacher and student on the test utterances (greedy, no fallback, as on dev), their reports in OUT,
    and student - teacher with its paired interval: the comparison that decides, since nothing chose on it."""
    reports = {}
    for name, model in (("teacher", teacher), ("student", student)):
        log(f"scoring the {name} on the test set ({len(utterances)} utterances)")
        reports[name] = evaluate(model, utterances, GREEDY, NO_FALLBACK, batch_size, progress=False)
        write_dev_report(reports[name], name, out / TEST_REPORTS[name])
    result = paired_bootstrap(reports["student"]["utterances"], reports["teacher"]["utterances"])
    log(f"test set WER: teacher {100 * reports['teacher']['wer']:.2f}%, student {100 * reports['student']['wer']:.2f}% "
        f"({result['words']} words); student - teacher: {describe_comparison(result, ('the student', 'the teacher'))}",
        teacher_test_wer=reports["teacher"]["wer"], student_test_wer=reports["student"]["wer"],
        student_vs_teacher_test=result)


def long_form_report(teacher, student, folder: str, log):
    """Both models on the long recordings with transcripts, as transcribe.py --no-fallback runs them: a
    student that loops on a window (reaches the token limit) shows here, not on the short dev clips."""
    if not folder:
        return
    folder = Path(folder)
    recordings = [u for u in list_utterances(folder) if u.text is not None] if folder.is_dir() else []
    if not recordings:
        log(f"warning: no long recordings with transcripts in {folder}: long-form not measured")
        return
    for name, model in (("teacher", teacher), ("student", student)):
        report = long_form(model, recordings)
        if report["wer"] is None:
            log(f"warning: no long recording in {folder} could be read: long-form not measured")
            return
        log(f"{name} on {folder.name}/ ({len(recordings)} recordings, no fallback): WER {100 * report['wer']:.2f}%, "
            f"{report['at_limit']} windows at the token limit", **{f"{name}_long_form": report})


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = make_logger(out, rank)
    checkpoint_path = out / "checkpoint.pt"
    if args.resume and not checkpoint_path.exists():
        raise SystemExit(f"error: --resume given but {checkpoint_path} does not exist")

    torch.manual_seed(args.seed)
    teacher = load_model(args.teacher, device=device, dtype=torch.float32).requires_grad_(False)
    student = make_student(teacher, args.decoder_layers, args.encoder_layers)
    student.audio_context = AudioContext("dynamic", args.margin)
    frozen = frozen_encoder_layers(args, student)
    student.encoder.requires_grad_(frozen is None)  # the whole student trains when nothing is cached
    if frozen is not None and frozen < student.dims.n_audio_layer:  # the top blocks train over cached ones
        student.encoder.blocks[frozen:].requires_grad_(True)
        student.encoder.ln_post.requires_grad_(True)
    tokenizer = tokenizer_for(teacher, language="en", task="transcribe")
    try:
        labelled, targets, target_settings, counts = prepare(args, teacher, student, tokenizer, rank, world, log)
    except KeyboardInterrupt:  # what was computed is on disk, item by item
        print("interrupted during preparation; what is done is kept in the cache, and running the same command "
              "again continues from it", file=sys.stderr)
        return 130
    log(f"training data: {json.dumps(counts)}", preparation=counts)
    if not labelled:
        raise SystemExit(f"error: no training examples ({counts})")

    config = config_from_arguments(args, ASKDConfig)
    dataset = PreparedDataset(labelled, targets, tokenizer, target_settings, frozen is not None, args.seed,
                              teacher_hidden=config.hidden_weight > 0)
    steps_per_epoch = max(len(dataset) // (args.batch_size * world * args.grad_accum), 1)
    total_steps = args.max_steps or max(round(args.epochs * steps_per_epoch), 1)
    dev = dev_utterances(args)
    provenance = dict(teacher=str(args.teacher), method=args.method, seed=args.seed, commit=commit_of_this_code(),
                      data=[str(d) for d in args.data])

    # The student trains on the whole vocabulary (the teacher's KL spans it); its shortlist, if any, applies
    # whenever it is scored or saved, so its dev WER is the WER of the student.pt written.
    shortlist = (output_shortlist([x.tokens for x in labelled], tokenizer.eot, student.dims.n_vocab, args.shortlist)
                 if args.shortlist else None)
    if shortlist:
        log(f"student output layer: {len(shortlist)} of {student.dims.n_vocab} tokens", shortlist_size=len(shortlist))
    score = DevScorer(dev, args.batch_size)

    def score_student(model):
        try:
            return score(model.restrict_output(shortlist))
        finally:
            model.restrict_output(None)

    def save_student(wer):
        try:
            save_checkpoint(student.restrict_output(shortlist), out / "student.pt", **provenance, dev_wer=wer)
        finally:
            student.restrict_output(None)
        if wer is not None:  # the report of the student just scored, beside it
            write_dev_report(score.last_report, str(out / "student.pt"), out / DEV_REPORTS["student"])

    settings = TrainSettings(**{f.name: getattr(args, f.name) for f in fields(TrainSettings)})
    trainer = Trainer(student, dataset, config, settings, total_steps, frozen, out, score_student, save_student, log,
                      rank, world, layers_stood_for(teacher.dims.n_text_layer, args.decoder_layers))
    if args.resume:
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        defaults = parse_args([])
        for key in ("teacher", "method", "decoder_layers", "encoder_layers", "trainable_encoder_layers", "batch_size",
                    "seed", "grad_accum", "prompt_share", "exclude_speakers", "eval_data", "eval_limit", "speeds",
                    "labels", "self_teacher", "hidden_weight"):
            if state["args"].get(key, getattr(defaults, key)) != getattr(args, key):  # absent: made before the flag
                raise SystemExit(f"error: --{key.replace('_', '-')} is {getattr(args, key)!r} but the checkpoint "
                                 f"was made with {state['args'].get(key)!r}")
        trainer.restore(state)
        log(f"resumed from {checkpoint_path} at step {trainer.progress.step}/{trainer.progress.total_steps}")
    elif rank == 0:
        for name in (*DEV_REPORTS.values(), *TEST_REPORTS.values()):  # an earlier run's would pass for this one's
            (out / name).unlink(missing_ok=True)
        if dev:
            trainer.progress.teacher_wer = score(teacher)
            write_dev_report(score.last_report, str(args.teacher), out / DEV_REPORTS["teacher"])
            log(f"teacher dev WER {100 * trainer.progress.teacher_wer:.2f}% on {len(dev)} utterances",
                step=0, teacher_dev_wer=trainer.progress.teacher_wer)

    def save_state(state):
        atomic_save(dict(state, args=vars(args), config=asdict(trainer.config)), checkpoint_path)

    # Ctrl-C or a scheduler's SIGTERM: finish the current step, save, exit.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: trainer.request_stop(signal.Signals(signum).name))
    log(f"training {total_steps} steps of {args.batch_size} ({args.method}, {len(dataset)} examples)")
    try:
        finished = trainer.train(save_state)
    except NothingLoadable as err:
        raise SystemExit(f"error: {err}")
    if not finished:
        log(f"stopped at step {trainer.progress.step}/{total_steps} ({trainer.stop_reason}); checkpoint saved: "
            f"continue with --out {out} --resume")
    elif rank == 0:
        p = trainer.progress
        summary = dict(done=True, step=p.step, teacher_dev_wer=p.teacher_wer, student_dev_wer=p.best_wer,
                       skipped=p.skipped)
        log(f"student at {out / 'student.pt'}" + (f"; dev WER teacher {100 * p.teacher_wer:.2f}%, student "
                                                   f"{100 * p.best_wer:.2f}%" if p.best_wer is not None else ""))
        closing_report(args, teacher, out, dev, p.best_wer, log)
        log(None, **summary)
    if world > 1:
        dist.destroy_process_group()
    return 0 if finished else 3


if __name__ == "__main__":
    sys.exit(main())
