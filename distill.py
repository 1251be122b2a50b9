"""Distil a Whisper teacher into a faster student with ASKD (see askd.py for the method).

    python distill.py                                   # tiny.en -> 2-layer-decoder student, <= 20 min of training on CPU
    python distill.py --teacher base --max-minutes 0    # base teacher, the whole --epochs budget (hours on CPU)
    python distill.py --teacher tiny.en --data DIR --method kd --max-steps 500 --out runs/kd
    torchrun --nproc_per_node 4 distill.py ...          # data-parallel (NCCL on GPU, gloo on CPU)
    python distill.py --out runs/x --resume             # continue exactly where runs/x stopped

Steps: pseudo-label the training audio with the teacher (once, cached on disk, filtered by WER against the
transcript), build the student from the teacher, train with the loss of the chosen method, evaluate on the
dev set now and then, keep the best student as OUT/student.pt (loadable by load_model, transcribe.py and
evaluate.py). OUT/checkpoint.pt holds the full training state; it is written atomically, periodically, on
SIGINT/SIGTERM and at --max-minutes, and --resume continues from it with the same results as an unbroken run.
"""
import argparse
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from askd import ASKDConfig, ASKDSchedule, distillation_loss, label_loss
from data import (
    DEV_SPEAKERS, PseudoLabelCache, SpeechDataset, collate, data_root, length_bucketed_batches,
    list_utterances, spec_augment,
)
from decoding import NO_FALLBACK, DecodingOptions, FallbackRules
from evaluate import evaluate, word_error_rate
from kernels import log_mel_spectrogram
from audio import SAMPLE_RATE, AudioError, HOP_LENGTH, N_SAMPLES, load_audio
from load import atomic_save, default_device, load_model, save_checkpoint
from model import Whisper
from student import frozen_copy, make_student, shares_teacher_encoder
from tokenizer import tokenizer_for
from transcribe import transcribe, transcribe_clips

GREEDY = DecodingOptions(language="en", without_timestamps=True)
SHOWCASE_AUDIO = "longform/jfk.flac"  # under the data folder: transcribed by teacher and student at the end


def parse_args(argv=None) -> argparse.Namespace:
    default_data = data_root() / "train-clean-5"
    p = argparse.ArgumentParser(description="ASKD distillation of Whisper.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default="tiny.en", help="teacher model name or checkpoint path")
    p.add_argument("--data", nargs="+", default=[str(default_data)], help="training folder(s) or JSONL manifest(s)")
    p.add_argument("--exclude-speakers", default=",".join(DEV_SPEAKERS), help="speakers kept out of training (the dev set)")
    p.add_argument("--eval-data", nargs="*", default=None, help="dev folder(s)/manifest(s); default: the excluded speakers of --data")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N dev utterances only")
    p.add_argument("--out", default="runs/distill", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    # student
    p.add_argument("--decoder-layers", type=int, default=2)
    p.add_argument("--encoder-layers", type=int, default=None, help="default: all of the teacher's (frozen)")
    add_config_arguments(p.add_argument_group("method (askd.py)"), ASKDConfig)
    # labels
    p.add_argument("--labels", default="pseudo", choices=["pseudo", "transcript"], help="train on teacher transcripts or the references")
    p.add_argument("--wer-filter", type=float, default=0.2, help="drop pseudo-labels whose WER vs the reference is above this")
    # optimisation
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--spec-augment", action="store_true", help="mask random Mel bands and time spans")
    p.add_argument("--max-steps", type=int, default=None, help="optimiser steps (default: from --epochs)")
    p.add_argument("--epochs", type=float, default=10)
    p.add_argument("--max-minutes", type=float, default=20, help="stop (and save) after this many minutes of training; 0: no limit")
    # bookkeeping
    p.add_argument("--eval-every", type=int, default=200, help="steps between dev evaluations (0: only at the end)")
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--workers", type=int, default=2, help="audio-loading processes per training process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    return p.parse_args(argv)


def add_config_arguments(group, config_class) -> None:
    """One flag per field of a config dataclass (--phase-a-end for phase_a_end), with the field's default,
    type, help and choices: the dataclass is the only place they are written."""
    for f in fields(config_class):
        group.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                           help=f.metadata.get("help"), choices=f.metadata.get("choices"))


def config_from_arguments(args: argparse.Namespace, config_class):
    return config_class(**{f.name: getattr(args, f.name) for f in fields(config_class)})


# ---------------------------------------------------------------------------------------------
# Processes, randomness, checkpoints


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


def rng_state() -> dict:
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Data


def training_examples(args, teacher: Whisper, rank: int, world: int, out: Path, log):
    """(utterance, target text) pairs: references, or teacher pseudo-labels filtered by WER against them."""
    exclude = args.exclude_speakers.split(",") if args.exclude_speakers else None
    utterances = [u for source in args.data for u in list_utterances(source, exclude_speakers=exclude)]
    if args.labels == "transcript":
        return [(u, u.text) for u in utterances if u.text], {"utterances": len(utterances)}
    cache = PseudoLabelCache(out / "pseudo_labels.json")
    if rank == 0:
        pseudo_label(teacher, args.teacher, utterances, cache, args.batch_size, log)
    if world > 1:
        dist.barrier()
        cache = PseudoLabelCache(out / "pseudo_labels.json")
    examples, unreadable, filtered = [], 0, 0
    for u in utterances:
        entry = cache.get(args.teacher, u.audio)
        if entry is None or "error" in entry:
            unreadable += 1
        elif u.text is not None and word_error_rate([u.text], [entry["text"]])["wer"] > args.wer_filter:
            filtered += 1  # the teacher got this one wrong: a bad target
        elif entry["text"].strip():
            examples.append((u, entry["text"]))
    stats = dict(utterances=len(utterances), unreadable=unreadable, filtered_by_wer=filtered, examples=len(examples))
    return examples, stats


@torch.no_grad()
def pseudo_label(teacher: Whisper, teacher_name: str, utterances, cache: PseudoLabelCache, batch_size: int, log):
    """Transcribe with the teacher whatever the cache does not hold yet; unreadable files are recorded."""
    missing = [u for u in utterances if cache.get(teacher_name, u.audio) is None]
    if not missing:
        return
    log(f"pseudo-labelling {len(missing)} utterances with the teacher (cached in {cache.path})")
    for start in tqdm(range(0, len(missing), batch_size), desc="pseudo-labels", file=sys.stderr):
        batch, clips = [], []
        for u in missing[start : start + batch_size]:
            try:
                audio = load_audio(u.audio)
                if len(audio) > N_SAMPLES:
                    raise AudioError("longer than 30 s")
            except (OSError, AudioError) as err:
                print(f"warning: skipping {u.audio}: {err}", file=sys.stderr)
                cache.put(teacher_name, u.audio, {"error": str(err)})
                continue
            batch.append(u)
            clips.append(audio)
        if clips:
            for u, result in zip(batch, transcribe_clips(teacher, clips, GREEDY, FallbackRules(), batch_size)):
                cache.put(teacher_name, u.audio, {"text": result.text})
        cache.save()


def dev_utterances(args):
    if args.eval_data is not None:
        return [u for source in args.eval_data for u in list_utterances(source)][: args.eval_limit]
    if not args.exclude_speakers:
        return []
    speakers = args.exclude_speakers.split(",")
    found = []
    for source in args.data:
        try:
            found += list_utterances(source, speakers=speakers)
        except ValueError:  # no such speakers in this source
            pass
    return found[: args.eval_limit]


# ---------------------------------------------------------------------------------------------
# Training


class Trainer:
    def __init__(self, args, rank, world, device):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_file = self.out / "log.jsonl"
        self.stop_reason = None

        torch.manual_seed(args.seed)
        self.teacher = load_model(args.teacher, device=device, dtype=torch.float32).requires_grad_(False)
        self.student = make_student(self.teacher, args.decoder_layers, args.encoder_layers)
        self.share_encoder = shares_teacher_encoder(self.student, self.teacher)
        self.tokenizer = tokenizer_for(self.teacher, language="en", task="transcribe")
        self.config = config_from_arguments(args, ASKDConfig)
        self.schedule = ASKDSchedule(self.config)
        self.self_teacher = None
        self.self_teacher_step = None

        examples, stats = training_examples(args, self.teacher, rank, world, self.out, self.log)
        if not examples:
            raise SystemExit(f"error: no training examples ({stats})")
        self.log(f"training data: {json.dumps(stats)}")
        self.dataset = SpeechDataset(examples, self.tokenizer)
        self.dev = dev_utterances(args)
        self.batches_per_epoch = len(length_bucketed_batches(self.dataset.token_lengths, args.batch_size, args.seed, 0, rank, world))
        steps_per_epoch = max(self.batches_per_epoch // args.grad_accum, 1)
        self.total_steps = args.max_steps or max(int(math.ceil(args.epochs * steps_per_epoch)), 1)

        trainable = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
        self.model = DistributedDataParallel(self.student) if world > 1 else self.student
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best_wer, self.teacher_wer = None, None
        self.skipped = 0

    # -- bookkeeping ------------------------------------------------------------------------

    def log(self, message: str):
        if self.rank == 0:
            print(message, file=sys.stderr, flush=True)

    def record(self, **fields):
        if self.rank == 0:
            with open(self.log_file, "a") as f:
                f.write(json.dumps(fields) + "\n")

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 10 % (a pure function of the step: nothing to checkpoint)."""
        warmup = min(self.args.warmup, max(self.total_steps // 10, 1))
        if step < warmup:
            return self.args.lr * (step + 1) / warmup
        x = (step - warmup) / max(self.total_steps - warmup, 1)
        return self.args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(x, 1.0))))

    def checkpoint(self) -> dict:
        return dict(
            dims=asdict(self.student.dims), model_state_dict=self.student.state_dict(),  # as save_checkpoint: load_model reads it
            optimizer=self.optimizer.state_dict(), step=self.step, epoch=self.epoch,
            batch_in_epoch=self.batch_in_epoch, total_steps=self.total_steps, schedule=self.schedule.state_dict(),
            self_teacher=None if self.self_teacher is None else self.self_teacher.state_dict(),
            self_teacher_step=self.self_teacher_step, best_wer=self.best_wer, teacher_wer=self.teacher_wer,
            skipped=self.skipped, rng=rng_state(), args=vars(self.args), config=asdict(self.config),
        )

    def save(self):
        if self.rank == 0:
            atomic_save(self.checkpoint(), self.out / "checkpoint.pt")

    def resume(self):
        path = self.out / "checkpoint.pt"
        if not path.exists():
            raise SystemExit(f"error: --resume given but {path} does not exist")
        state = torch.load(path, map_location=self.device, weights_only=False)
        for key in ("teacher", "method", "decoder_layers", "encoder_layers", "batch_size", "seed", "grad_accum"):
            if state["args"].get(key) != getattr(self.args, key):
                raise SystemExit(f"error: --{key.replace('_', '-')} is {getattr(self.args, key)!r} but the checkpoint was made with {state['args'].get(key)!r}")
        self.student.load_state_dict(state["model_state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.total_steps = state["total_steps"]
        self.best_wer, self.teacher_wer, self.skipped = state["best_wer"], state["teacher_wer"], state["skipped"]
        if state["self_teacher"] is not None:
            self.self_teacher = frozen_copy(self.student)
            self.self_teacher.load_state_dict(state["self_teacher"])
            self.self_teacher_step = state["self_teacher_step"]
        set_rng_state(state["rng"])
        self.log(f"resumed from {path} at step {self.step}/{self.total_steps}")

    def request_stop(self, reason: str):
        self.stop_reason = reason

    def should_stop(self) -> bool:
        """All processes stop at the same step if any one was asked to."""
        stop = torch.tensor(float(self.stop_reason is not None), device=self.device)
        if self.world > 1:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        return bool(stop.item())

    # -- the step ---------------------------------------------------------------------------

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def mel(self, batch) -> torch.Tensor:
        audio, lengths = batch["audio"].to(self.device), batch["lengths"].to(self.device)
        mel = log_mel_spectrogram(audio, n_mels=self.student.dims.n_mels, lengths=lengths)  # (B, n_mels, 3000)
        if self.args.spec_augment:
            generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.step * self.world + self.rank)
            spec_augment(mel, (lengths // HOP_LENGTH).tolist(), generator)
        return mel

    def soft_targets(self, phase, mel, tokens, features):
        """Logits of whoever teaches in this phase (no gradient), or None."""
        if phase == "teacher":
            return self.teacher(mel, tokens, audio_features=features)
        if phase == "self":
            return self.self_teacher(mel, tokens, audio_features=features if self.share_encoder else None)
        return None

    def micro_step(self, batch, progress: float, scale: float) -> dict:
        tokens, labels = batch["tokens"].to(self.device), batch["labels"].to(self.device)
        phase = self.schedule.phase(progress)
        with self.autocast():
            mel = self.mel(batch)
            with torch.no_grad():
                features = self.teacher.embed_audio(mel) if self.share_encoder else None
                soft = self.soft_targets(phase, mel, tokens, features)
            logits = self.model(mel, tokens, audio_features=features)
            losses = distillation_loss(
                logits, labels, soft, self.schedule.soft_weight(progress), self.schedule.ce_weight(), self.config.temperature
            )
        (losses["loss"] * scale).backward()
        teacher_ce = label_loss(soft, labels).item() if phase == "teacher" else None
        return dict(
            loss=losses["loss"].item(), ce=losses["ce"].item(), kl=losses["kl"].item(),
            teacher_ce=teacher_ce, tokens=int((labels != -100).sum()), audio_s=float(batch["lengths"].sum()) / SAMPLE_RATE,
        )

    def update_self_teacher(self, progress: float):
        """Phase B: snapshot the student on entry, then every self_refresh steps (progressive self-KD)."""
        if self.schedule.phase(progress) != "self":
            return
        if self.self_teacher is None or self.step - self.self_teacher_step >= self.config.self_refresh:
            self.self_teacher = frozen_copy(self.student)
            self.self_teacher_step = self.step

    def optimizer_step(self, batches) -> dict:
        progress = self.step / self.total_steps
        self.update_self_teacher(progress)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.student.train()
        stats = []
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            sync = nullcontext() if last or self.world == 1 else self.model.no_sync()
            with sync:
                stats.append(self.micro_step(batch, progress, 1.0 / len(batches)))
        trainable = [p for p in self.student.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, self.args.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        mean = lambda k: sum(s[k] for s in stats) / len(stats)  # noqa: E731
        teacher_ce = [s["teacher_ce"] for s in stats if s["teacher_ce"] is not None]
        self.schedule.observe(mean("ce"), sum(teacher_ce) / len(teacher_ce) if teacher_ce else None)
        return dict(
            step=self.step, progress=round(progress, 4), phase=self.schedule.phase(progress),
            loss=mean("loss"), ce=mean("ce"), kl=mean("kl"), soft_weight=self.schedule.soft_weight(progress),
            lr=self.lr_at(self.step - 1), grad_norm=float(grad_norm),
            tokens=sum(s["tokens"] for s in stats), audio_s=sum(s["audio_s"] for s in stats),
        )

    # -- evaluation ---------------------------------------------------------------------------

    def dev_wer(self, model: Whisper) -> float:
        model.eval()
        report = evaluate(model, self.dev, GREEDY, NO_FALLBACK, self.args.batch_size, progress=False)
        return report["wer"]

    def evaluate_and_keep_best(self):
        """Rank 0 scores the student on the dev set and keeps the best one as OUT/student.pt."""
        if self.rank == 0 and self.dev:
            wer = self.dev_wer(self.student)
            improved = self.best_wer is None or wer < self.best_wer
            self.log(f"step {self.step}: dev WER {100 * wer:.2f}%" + (" (best so far)" if improved else ""))
            self.record(step=self.step, dev_wer=wer)
            if improved:
                self.best_wer = wer
                save_checkpoint(self.student, self.out / "student.pt")
        if self.world > 1:
            dist.barrier()

    # -- the loop -----------------------------------------------------------------------------

    def batches(self):
        """(epoch, index, batch) from the current position on, epoch after epoch, same order on every run."""
        while True:
            plan = length_bucketed_batches(self.dataset.token_lengths, self.args.batch_size, self.args.seed, self.epoch, self.rank, self.world)
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=plan[self.batch_in_epoch :], collate_fn=collate,
                num_workers=self.args.workers, persistent_workers=False,
            )
            for batch in loader:
                self.batch_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0

    def train(self):
        args = self.args
        if self.rank == 0 and self.dev and self.teacher_wer is None:
            self.teacher_wer = self.dev_wer(self.teacher)
            self.log(f"teacher dev WER {100 * self.teacher_wer:.2f}% on {len(self.dev)} utterances")
            self.record(step=self.step, teacher_dev_wer=self.teacher_wer)
        start, started_at_step = time.time(), self.step
        window_start, window_tokens, window_audio = time.time(), 0, 0.0
        stream = self.batches()
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"{args.method}", disable=self.rank != 0, file=sys.stderr)
        while self.step < self.total_steps:
            group = []
            while len(group) < args.grad_accum:
                batch = next(stream)
                self.skipped += batch["skipped"]
                if batch["ids"]:
                    group.append(batch)
            stats = self.optimizer_step(group)
            window_tokens += stats["tokens"]
            window_audio += stats["audio_s"]
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", ce=f"{stats['ce']:.3f}", w=f"{stats['soft_weight']:.2f}")
            if self.step % args.log_every == 0 or self.step == self.total_steps:
                elapsed = time.time() - window_start
                self.record(**stats, tokens_per_s=window_tokens * self.world / elapsed,
                            audio_s_per_s=window_audio * self.world / elapsed, skipped=self.skipped)
                window_start, window_tokens, window_audio = time.time(), 0, 0.0
            if args.eval_every and self.step % args.eval_every == 0 and self.step < self.total_steps:
                self.evaluate_and_keep_best()
            if args.max_minutes and time.time() - start > 60 * args.max_minutes:
                self.request_stop(f"--max-minutes {args.max_minutes}")
            stop = self.should_stop()
            if self.step % args.save_every == 0 or stop:
                self.save()
            if stop:
                bar.close()
                self.log(f"stopped at step {self.step}/{self.total_steps} ({self.stop_reason}); checkpoint saved: "
                         f"continue with --out {self.out} --resume")
                return False
        bar.close()
        self.save()
        self.evaluate_and_keep_best()
        if self.rank == 0 and not self.dev:  # no dev set: the final student is the one we keep
            save_checkpoint(self.student, self.out / "student.pt")
        seconds = time.time() - start
        self.log(f"done: {self.step - started_at_step} steps in {seconds:.0f} s; student at {self.out / 'student.pt'}"
                 + (f"; dev WER teacher {100 * self.teacher_wer:.2f}%, student {100 * self.best_wer:.2f}%" if self.dev else ""))
        self.record(done=True, step=self.step, teacher_dev_wer=self.teacher_wer, student_dev_wer=self.best_wer,
                    skipped=self.skipped, seconds=seconds)
        if self.rank == 0:
            self.show_transcripts(SHOWCASE_AUDIO)
        return True

    @torch.no_grad()
    def show_transcripts(self, relative_path: str):
        """The teacher's and the kept student's transcript of one familiar recording, side by side."""
        path = data_root() / relative_path
        if not path.exists():
            return
        audio = load_audio(path)
        student = load_model(self.out / "student.pt", device=self.device, dtype=torch.float32)
        for name, model in (("teacher", self.teacher), ("student", student)):
            text = transcribe(model, audio, GREEDY, NO_FALLBACK)["text"].strip()
            self.log(f"{name} on {relative_path}: {text}")


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    try:
        trainer = Trainer(args, rank, world, device)
    except KeyboardInterrupt:  # before training starts, the only state is the pseudo-label cache, saved per batch
        print(f"interrupted during setup; pseudo-labels so far are kept in {Path(args.out) / 'pseudo_labels.json'}, "
              "and running the same command again continues from them", file=sys.stderr)
        return 130
    if args.resume:
        trainer.resume()
    # Ctrl-C or a scheduler's SIGTERM: finish the current step, save, exit.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: trainer.request_stop(signal.Signals(signum).name))
    finished = trainer.train()
    if world > 1:
        dist.destroy_process_group()
    return 0 if finished else 3


if __name__ == "__main__":
    sys.exit(main())
