"""The distillation loop over prepared data (prepare.py): batches of cached targets, the student's step, the
ASKD schedule, checkpoints that resume exactly, and dev evaluation.

How much of the student runs per step (`trainable_encoder_layers`, TRAIN_MODES):
    0   decoder only: the decoder attends to the frozen encoder's cached output (the cheapest)
    K   the top K encoder blocks train too, on the cached output of the blocks below them
    -1  the whole student from the log-Mel (no encoder cache; the only mode where SpecAugment and
        margin jitter can be applied live, since they change the encoder's input)
In the cached modes the margin jitter comes from the few margins cached per example (prepare.TargetSettings).
"""
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from askd import ASKDConfig, ASKDSchedule, SoftTargets, distillation_loss
from audio import SAMPLE_RATE
from cache import ArrayCache
from data import IGNORE_LABEL, length_bucketed_batches, spec_augment, training_tokens
from decoding import NO_FALLBACK, DecodingOptions
from evaluate import evaluate
from model import AudioContext, Whisper, padding_mask
from prepare import Labelled, TargetSettings, load_example_audio
from student import frozen_copy
from tokenizer import Tokenizer
from transcribe import clip_mels, frames_of_samples

GREEDY = DecodingOptions(language="en", without_timestamps=True)
BUDGET_CALIBRATION_STEPS = 10  # steps timed before a --max-minutes run lays its schedules over what fits
SECONDS_PER_POSITION = 0.02  # an encoder position: two 10 ms Mel frames
TEACHER_ARRAYS = ("top_values", "top_ids", "lse_1", "lse_t")  # per labelled token: see prepare.teacher_targets
TEACHER_HIDDEN = "hidden"  # per labelled token, the teacher's block outputs: read only for intermediate-layer KD


# ---------------------------------------------------------------------------------------------
# Data: prepared examples -> batches


class PreparedDataset(torch.utils.data.Dataset):
    """One labelled example per index: its target tokens, the teacher's cached top-k, and the student's
    input (cached encoder output at one of the cached margins, or the waveform when nothing is cached);
    with teacher_hidden, the teacher's block outputs too."""

    def __init__(self, examples: Sequence[Labelled], targets: ArrayCache, tokenizer: Tokenizer,
                 settings: TargetSettings, cached_input: bool, seed: int, teacher_hidden: bool = False):
        self.examples, self.targets, self.settings = list(examples), targets, settings
        self.cached_input, self.seed, self.epoch = cached_input, seed, 0
        self.teacher_arrays = TEACHER_ARRAYS + ((TEACHER_HIDDEN,) if teacher_hidden else ())
        self.sequences = [training_tokens(tokenizer, x.tokens, x.example.timestamps, x.prompt) for x in self.examples]
        self.token_lengths = [len(tokens) for tokens, _ in self.sequences]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Optional[dict]:
        x = self.examples[index]
        tokens, labels = self.sequences[index]
        rng = random.Random(hash((self.seed, self.epoch, index)))  # the same draw on every run and resume
        margin = rng.choice(self.settings.margins)
        try:
            features = f"features_m{margin}"
            cached = self.targets.load(x.target_item, self.teacher_arrays + ((features,) if self.cached_input else ()))
            item = dict(index=index, tokens=tokens, labels=labels, margin=margin,
                        **{name: np.asarray(cached[name]) for name in self.teacher_arrays})
            if self.cached_input:
                item["features"] = np.asarray(cached[features])  # (positions, D) float16
            else:
                item["audio"] = load_example_audio(x.example)
        except (OSError, ValueError, KeyError) as err:  # a file gone bad since preparation: one example lost
            print(f"warning: skipping {x.example.id}: {err}")
            return None
        return item


def collate_prepared(items: List[Optional[dict]], pad_token: int = 50256) -> dict:
    """Pad a batch: tokens/labels (B, T); features (B, P, D) float32 with positions (B,), or audio;
    the teacher's top-k (n_labels, k) (and block outputs (n_labels, L, D), if loaded) in the order of the
    labelled positions (row by row)."""
    good = [item for item in items if item is not None]
    batch = dict(skipped=len(items) - len(good), size=len(good))
    if not good:
        return batch
    width = max(len(item["tokens"]) for item in good)
    tokens = torch.full((len(good), width), pad_token, dtype=torch.long)
    labels = torch.full((len(good), width), IGNORE_LABEL, dtype=torch.long)
    for row, item in enumerate(good):
        tokens[row, : len(item["tokens"])] = torch.tensor(item["tokens"])
        labels[row, : len(item["labels"])] = torch.tensor(item["labels"])
    teacher = [name for name in (*TEACHER_ARRAYS, TEACHER_HIDDEN) if name in good[0]]
    batch.update(tokens=tokens, labels=labels, margins=[item["margin"] for item in good],
                 indices=[item["index"] for item in good],
                 **{name: torch.from_numpy(np.concatenate([item[name] for item in good])) for name in teacher})
    if "features" in good[0]:
        positions = [len(item["features"]) for item in good]
        features = torch.zeros(len(good), max(positions), good[0]["features"].shape[1])
        for row, item in enumerate(good):
            features[row, : positions[row]] = torch.from_numpy(item["features"].astype(np.float32))
        batch.update(features=features, positions=torch.tensor(positions))
    else:
        batch["audio"] = [item["audio"] for item in good]
    if "positions" in batch:  # the audio under the cached features: positions less the margin, 20 ms each
        batch["audio_s"] = sum((p - m) * SECONDS_PER_POSITION for p, m in zip(positions, batch["margins"]))
    else:
        batch["audio_s"] = sum(len(a) / SAMPLE_RATE for a in batch["audio"])
    return batch


# ---------------------------------------------------------------------------------------------
# The student's forward pass in each mode


class StudentForward(nn.Module):
    """The student's logits for a batch, from what the batch holds (see the module docstring)."""

    def __init__(self, student: Whisper, frozen_encoder_layers: Optional[int], keep_blocks: bool = False):
        super().__init__()
        self.student = student
        self.frozen = frozen_encoder_layers  # None: the whole student runs from the log-Mel
        self.keep_blocks = keep_blocks  # also return each decoder block's output (intermediate-layer KD)

    def forward(self, batch: dict) -> Tuple[Tensor, Optional[Tensor]]:
        """Logits (n_labels, V) at the positions that carry a label, in row-major order: padding and the
        prompt are never projected onto the vocabulary (the step's largest product); with keep_blocks, the
        decoder blocks' outputs at the same positions (n_labels, n_layers, D), else None."""
        student, positions = self.student, batch["positions"]
        if self.frozen is None:
            features = student.encoder(batch["mel"], positions)
        elif self.frozen < student.dims.n_audio_layer:
            mask = padding_mask(positions, batch["features"].shape[1])
            features = student.encoder.run_blocks(batch["features"], mask, first=self.frozen)
        else:
            features = batch["features"]
        blocks = [] if self.keep_blocks else None
        hidden = student.decoder.hidden(batch["tokens"], features, audio_lengths=positions, block_outputs=blocks)
        labelled = batch["labels"] != IGNORE_LABEL  # (B, T)
        logits = student.decoder.logits_of(hidden[labelled])  # (n_labels, V)
        return logits, (torch.stack([h[labelled] for h in blocks], dim=1) if blocks is not None else None)


def live_encoder_input(batch: dict, student: Whisper, device, augment: bool, generator: torch.Generator):
    """Log-Mel of the waveforms cut to each one's length plus its drawn margin (the live jitter), batched
    with per-row positions; SpecAugment on top when asked."""
    clips = batch["audio"]
    mel = clip_mels(clips, student.dims.n_mels, device)  # (B, n_mels, 3000)
    positions = [AudioContext("dynamic", m).positions(frames_of_samples(len(c)), student.dims.n_audio_ctx)
                 for c, m in zip(clips, batch["margins"])]
    mel = mel[:, :, : 2 * max(positions)].contiguous()
    if augment:
        spec_augment(mel, [2 * p for p in positions], generator)
    return mel, torch.tensor(positions, device=device)


class PreviousPredictions:
    """Each example's own top-k logits from the last time the student saw it (an epoch ago): the self-teacher
    of PS-KD, askd's phase B with self_teacher="previous-epoch". Kept as the teacher's are (prepare.py):
    k largest logits (float16) and their ids, and the row's log-normaliser at T, on the CPU. Under torchrun
    each process remembers the examples it saw; one that went to another process gets no self-target."""

    def __init__(self, k: int, temperature: float):
        self.k, self.temperature = k, temperature
        self.records: Dict[int, Tuple[Tensor, Tensor, Tensor]] = {}  # example index -> (values, ids, lse_t)

    @torch.no_grad()
    def record(self, logits: Tensor, indices: List[int], row_lengths: List[int]):
        """logits (n_labels, V), the rows of each example in turn (row_lengths of them)."""
        values, ids = logits.float().topk(self.k, dim=-1)  # (n_labels, k)
        values = values.half()
        rest = logits.float().scatter(-1, ids, float("-inf"))
        lse_t = (torch.cat([values.float(), rest], dim=-1) / self.temperature).logsumexp(-1)  # as prepare.py
        for index, v, i, l in zip(indices, values.cpu().split(row_lengths), ids.int().cpu().split(row_lengths),
                                  lse_t.cpu().split(row_lengths)):
            self.records[index] = (v.clone(), i.clone(), l.clone())

    def targets(self, indices: List[int], row_lengths: List[int], device) -> Optional[SoftTargets]:
        """The recorded predictions for these examples' rows; rows of an example not yet seen (or seen with
        another target length) get none. None if no example of the batch has a record."""
        kept, have = [], []
        for index, n in zip(indices, row_lengths):
            record = self.records.get(index)
            found = record is not None and len(record[0]) == n
            have.append(torch.full((n,), found))
            if found:
                kept.append(record)
        if not kept:
            return None
        values, ids, lse_t = (torch.cat(parts).to(device) for parts in zip(*kept))
        return SoftTargets(top_values=values, top_ids=ids, teacher_lse=lse_t, rows=torch.cat(have).to(device))

    def state_dict(self) -> dict:
        return dict(records=self.records)

    def load_state_dict(self, state: dict):
        self.records = dict(state["records"])


# ---------------------------------------------------------------------------------------------
# Training state: one list drives both saving and resuming


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    total_steps: int = 0
    best_wer: Optional[float] = None
    teacher_wer: Optional[float] = None
    skipped: int = 0
    self_teacher_step: Optional[int] = None


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


@dataclass
class TrainSettings:
    batch_size: int
    grad_accum: int
    lr: float
    weight_decay: float
    warmup: int
    clip: float
    spec_augment: bool
    eval_every: int
    save_every: int
    log_every: int
    max_minutes: Optional[float]
    workers: int
    seed: int


class NothingLoadable(RuntimeError):
    """Training cannot go on: no example of a whole epoch loads."""


def steps_that_fit(step: int, steps_timed: int, elapsed_s: float, budget_s: float, total_steps: int) -> int:
    """The total step count that ends a run within its time budget at the pace of the steps timed so far
    (never more than planned, never fewer than one more step)."""
    pace = elapsed_s / steps_timed
    return max(min(total_steps, step + int((budget_s - elapsed_s) / pace)), step + 1)


class Trainer:
    """The loop: batches -> the student's step under the ASKD schedule -> logs, dev WER, checkpoints."""

    def __init__(self, student: Whisper, dataset: PreparedDataset, config: ASKDConfig, settings: TrainSettings,
                 total_steps: int, frozen_encoder_layers: Optional[int], out: Path, dev_score: Callable,
                 save_student: Callable, log: Callable, rank: int = 0, world: int = 1,
                 teacher_layers: Optional[Sequence[int]] = None):
        self.student, self.dataset, self.config, self.settings = student, dataset, config, settings
        self.out, self.dev_score, self.save_student, self.log = out, dev_score, save_student, log
        self.rank, self.world, self.device = rank, world, student.device
        self.schedule = ASKDSchedule(config)
        self.progress = Progress(total_steps=total_steps)
        # intermediate-layer KD: the teacher block each student block stands for (student.layers_stood_for)
        self.teacher_layers = list(teacher_layers) if config.hidden_weight > 0 and teacher_layers else None
        self.forward = StudentForward(student, frozen_encoder_layers, keep_blocks=self.teacher_layers is not None)
        self.model = DistributedDataParallel(self.forward) if world > 1 else self.forward
        trainable = [p for p in student.parameters() if p.requires_grad]
        # fused: one kernel over all parameters; on a 2-core CPU 0.09 s per step against 0.70 s for the default
        # per-parameter loop (tiny.en's decoder, mostly its 51864 x 384 embedding: measured)
        self.optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay,
                                           betas=(0.9, 0.98), fused=True)
        self.self_teacher: Optional[StudentForward] = None
        previous = config.method == "askd" and config.self_teacher == "previous-epoch"
        self.previous = PreviousPredictions(dataset.settings.top_k, config.temperature) if previous else None
        self.stop_reason: Optional[str] = None

    # -- checkpoint ---------------------------------------------------------------------------

    def state_parts(self):
        """(name, save, restore) for everything a resumed run needs: the one list both directions read."""
        return (
            ("model_state_dict", self.student.state_dict, self.student.load_state_dict),
            ("optimizer", self.optimizer.state_dict, self.optimizer.load_state_dict),
            ("schedule", self.schedule.state_dict, self.schedule.load_state_dict),
            ("progress", lambda: asdict(self.progress), lambda s: setattr(self, "progress", Progress(**s))),
            ("self_teacher", lambda: None if self.self_teacher is None else self.self_teacher.student.state_dict(),
             self._restore_self_teacher),
            ("previous_predictions", lambda: None if self.previous is None else self.previous.state_dict(),
             lambda state: state is not None and self.previous.load_state_dict(state)),
            ("rng", rng_state, set_rng_state),
        )

    def checkpoint(self) -> dict:
        return {name: save() for name, save, _ in self.state_parts()}

    def restore(self, state: dict):
        for name, _, restore in self.state_parts():
            restore(state.get(name))  # None: a part a checkpoint made before it existed did not need

    def _restore_self_teacher(self, weights):
        self.self_teacher = None
        if weights is not None:
            self.self_teacher = StudentForward(frozen_copy(self.student), self.forward.frozen)
            self.self_teacher.student.load_state_dict(weights)

    # -- one optimiser step ---------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 10 % (a pure function of the step: nothing to checkpoint)."""
        total = self.progress.total_steps
        warmup = min(self.settings.warmup, max(total // 10, 1))
        if step < warmup:
            return self.settings.lr * (step + 1) / warmup
        x = (step - warmup) / max(total - warmup, 1)
        return self.settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(x, 1.0))))

    def to_device(self, batch: dict) -> dict:
        moved = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        if "audio" in batch:  # the live mode: the log-Mel and the jittered lengths are made here
            generator = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + self.progress.step * self.world + self.rank)
            moved["mel"], moved["positions"] = live_encoder_input(batch, self.student, self.device,
                                                                  self.settings.spec_augment, generator)
        return moved

    def soft_targets(self, phase: str, batch: dict) -> Optional[SoftTargets]:
        if phase == "teacher":
            hidden = batch[TEACHER_HIDDEN][:, self.teacher_layers] if self.teacher_layers else None
            return SoftTargets(top_values=batch["top_values"], top_ids=batch["top_ids"], teacher_lse=batch["lse_t"],
                               hidden=hidden)
        if phase == "self" and self.previous is not None:
            return self.previous.targets(batch["indices"], self.row_lengths(batch), self.device)
        if phase == "self":
            with torch.no_grad():
                return SoftTargets(logits=self.self_teacher(batch)[0])
        return None

    def micro_step(self, batch: dict, progress: float, scale: float, clock: dict) -> dict:
        phase = self.schedule.phase(progress)
        tick = time.perf_counter()
        soft = self.soft_targets(phase, batch)
        clock["self_teacher"] += time.perf_counter() - tick
        tick = time.perf_counter()
        logits, blocks = self.model(batch)
        if self.previous is not None:  # what the student says now is the self-target an epoch from now
            self.previous.record(logits, batch["indices"], self.row_lengths(batch))
        clock["forward"] += time.perf_counter() - tick
        tick = time.perf_counter()
        labels = batch["labels"][batch["labels"] != IGNORE_LABEL]  # (n_labels,), the order of the logits
        losses = distillation_loss(logits, labels, soft, self.schedule.soft_weight(progress), self.schedule.ce_weight(),
                                   self.config.temperature, blocks, self.config.hidden_weight)
        clock["loss"] += time.perf_counter() - tick
        tick = time.perf_counter()
        (losses["loss"] * scale).backward()
        clock["backward"] += time.perf_counter() - tick
        teacher_ce = None
        if phase == "teacher":  # the teacher's loss on its own likeliest token (its label, as a rule): for the
            teacher_ce = float((batch["lse_1"] - batch["top_values"][:, 0].float()).mean())  # adaptive schedule
        return dict(loss=losses["loss"].item(), ce=losses["ce"].item(), kl=losses["kl"].item(),
                    hidden=losses["hidden"].item(), teacher_ce=teacher_ce,
                    tokens=int((batch["labels"] != IGNORE_LABEL).sum()), audio_s=batch["audio_s"])

    @staticmethod
    def row_lengths(batch: dict) -> List[int]:
        """How many labelled positions (logit rows) each example of the batch has, in order."""
        return (batch["labels"] != IGNORE_LABEL).sum(dim=1).tolist()

    def update_self_teacher(self, progress: float):
        """Phase B: snapshot the student on entry, then every self_refresh steps (progressive self-KD)."""
        if self.schedule.phase(progress) != "self" or self.previous is not None:
            return
        p = self.progress
        if self.self_teacher is None or p.step - p.self_teacher_step >= self.config.self_refresh:
            self.self_teacher = StudentForward(frozen_copy(self.student), self.forward.frozen)
            p.self_teacher_step = p.step

    def optimizer_step(self, batches: List[dict], clock: dict) -> dict:
        p = self.progress
        fraction = p.step / p.total_steps
        self.update_self_teacher(fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(p.step)
        self.student.train()
        stats = []
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            sync = nullcontext() if last or self.world == 1 else self.model.no_sync()
            with sync:
                stats.append(self.micro_step(self.to_device(batch), fraction, 1.0 / len(batches), clock))
        tick = time.perf_counter()
        trainable = [q for q in self.student.parameters() if q.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, self.settings.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        clock["optimizer"] += time.perf_counter() - tick
        p.step += 1
        mean = lambda k: sum(s[k] for s in stats) / len(stats)  # noqa: E731
        teacher_ce = [s["teacher_ce"] for s in stats if s["teacher_ce"] is not None]
        self.schedule.observe(mean("ce"), sum(teacher_ce) / len(teacher_ce) if teacher_ce else None)
        return dict(step=p.step, progress=round(fraction, 4), phase=self.schedule.phase(fraction),
                    loss=mean("loss"), ce=mean("ce"), kl=mean("kl"), hidden=mean("hidden"),
                    soft_weight=self.schedule.soft_weight(fraction), lr=self.lr_at(p.step - 1), grad_norm=float(grad_norm),
                    tokens=sum(s["tokens"] for s in stats), audio_s=sum(s["audio_s"] for s in stats))

    # -- the loop -------------------------------------------------------------------------------

    def batches(self):
        """Batches from the current position on, epoch after epoch, the same order on every run."""
        s, p = self.settings, self.progress
        while True:
            self.dataset.epoch = p.epoch
            plan = length_bucketed_batches(self.dataset.token_lengths, s.batch_size, s.seed, p.epoch, self.rank, self.world)
            loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=plan[p.batch_in_epoch :],
                                                 collate_fn=collate_prepared, num_workers=s.workers)
            for batch in loader:
                p.batch_in_epoch += 1
                yield batch
            p.epoch += 1
            p.batch_in_epoch = 0

    def request_stop(self, reason: str):
        self.stop_reason = reason

    def any_rank(self, flag: bool) -> bool:
        """Whether any process raised the flag: all of them stop (or end) at the same step."""
        flag = torch.tensor(float(flag), device=self.device)
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def evaluate_and_keep_best(self, last: bool = False):
        """Rank 0 scores the student on the dev set and keeps the best one (save_student); with no dev set,
        the last student is the one kept."""
        p = self.progress
        if self.rank == 0:
            wer = self.dev_score(self.student)
            if wer is not None:
                improved = p.best_wer is None or wer < p.best_wer
                self.log(f"step {p.step}: dev WER {100 * wer:.2f}%" + (" (best so far)" if improved else ""),
                         step=p.step, dev_wer=wer)
                if improved:
                    p.best_wer = wer
                    self.save_student(wer)
            elif last:
                self.save_student(None)
        if self.world > 1:
            dist.barrier()

    def save(self, save_checkpoint: Callable):
        if self.rank == 0:
            save_checkpoint(self.checkpoint())

    def fit_schedules_to_budget(self, start: float, first_step: int):
        """With --max-minutes, shrink total_steps to what fits at the pace measured so far, so that the
        schedules (askd's phases, the learning rate's decay) run to their end inside the budget instead of
        being cut short."""
        p = self.progress
        elapsed = time.time() - start
        fits = steps_that_fit(p.step, p.step - first_step, elapsed, 60 * self.settings.max_minutes, p.total_steps)
        if self.world > 1:  # every process keeps the same schedule: the slowest pace decides
            fits_all = torch.tensor(float(fits), device=self.device)
            dist.all_reduce(fits_all, op=dist.ReduceOp.MIN)
            fits = int(fits_all.item())
        if fits < p.total_steps:
            self.log(f"--max-minutes {self.settings.max_minutes}: at {elapsed / (p.step - first_step):.1f} s a step, "
                     f"{fits} of the {p.total_steps} planned steps fit; the schedules now end at step {fits}",
                     budget_total_steps=fits, planned_total_steps=p.total_steps)
            p.total_steps = fits

    def next_group(self, stream) -> Optional[List[dict]]:
        """grad_accum batches with at least one loadable example each; None if a stop was requested while
        looking. A whole epoch with nothing loadable (the audio gone) is an error, not an endless loop."""
        group, empty_in_a_row = [], 0
        while len(group) < self.settings.grad_accum:
            if self.stop_reason is not None and self.world == 1:  # with several, all stop after a step
                return None
            batch = next(stream)
            self.progress.skipped += batch["skipped"]
            if batch["size"]:
                group.append(batch)
                empty_in_a_row = 0
            else:
                empty_in_a_row += 1
                if empty_in_a_row > len(self.dataset) // self.settings.batch_size + 1:
                    raise NothingLoadable("not one example of a whole epoch could be loaded (is the audio still "
                                          "there?); the checkpoint is saved: fix it and continue with --resume")
        return group

    def train(self, save_checkpoint: Callable) -> bool:
        """Train to total_steps, or until --max-minutes is spent: a time budget first lays the schedules over
        the steps that fit (after BUDGET_CALIBRATION_STEPS timed ones), then ends the run as its last step
        would (evaluated, the student kept). False if stopped by a signal (saved, resumable)."""
        s, p = self.settings, self.progress
        start, first_step = time.time(), p.step
        stream = self.batches()
        clock = dict.fromkeys(("data", "self_teacher", "forward", "loss", "backward", "optimizer"), 0.0)
        window_start, window_tokens, window_audio = time.perf_counter(), 0, 0.0
        while p.step < p.total_steps:
            tick = time.perf_counter()
            try:
                group = self.next_group(stream)
            except NothingLoadable:
                self.save(save_checkpoint)
                raise
            clock["data"] += time.perf_counter() - tick
            if group is None:  # a stop was requested: save as after a step
                self.save(save_checkpoint)
                return False
            stats = self.optimizer_step(group, clock)
            window_tokens += stats["tokens"]
            window_audio += stats["audio_s"]
            if p.step % s.log_every == 0 or p.step == p.total_steps:
                elapsed = time.perf_counter() - window_start
                shares = {f"share_{k}": round(v / elapsed, 3) for k, v in clock.items()}
                self.log(None, **stats, step_s=elapsed / s.log_every, tokens_per_s=window_tokens * self.world / elapsed,
                         audio_s_per_s=window_audio * self.world / elapsed, skipped=p.skipped, **shares)
                clock = dict.fromkeys(clock, 0.0)
                window_start, window_tokens, window_audio = time.perf_counter(), 0, 0.0
            if s.eval_every and p.step % s.eval_every == 0 and p.step < p.total_steps:
                self.evaluate_and_keep_best()
            stop = self.any_rank(self.stop_reason is not None)
            if p.step % s.save_every == 0 or stop:
                self.save(save_checkpoint)
            if stop:
                return False
            if s.max_minutes and p.step - first_step == BUDGET_CALIBRATION_STEPS:
                self.fit_schedules_to_budget(start, first_step)
            if self.any_rank(bool(s.max_minutes) and time.time() - start > 60 * s.max_minutes):
                self.log(f"--max-minutes {s.max_minutes} spent at step {p.step}/{p.total_steps}: ending here"
                         + ("" if p.step == p.total_steps else
                            f", at {p.step / p.total_steps:.0%} of the schedules (slower steps than the first ones)"),
                         budget_end_step=p.step)
                break
        try:
            self.evaluate_and_keep_best(last=True)
        finally:  # saved after the last evaluation, so its state knows it; saved even if that evaluation fails
            self.save(save_checkpoint)
        self.log(f"trained {p.step - first_step} steps in {time.time() - start:.0f} s")
        return True


class DevScorer:
    """score(model) -> dev WER (greedy, no fallback), each model on its own audio context. The last
    evaluate() report is kept: its per-utterance counts give the paired bootstrap of student vs teacher."""

    def __init__(self, dev_utterances, batch_size: int):
        self.dev_utterances, self.batch_size = dev_utterances, batch_size
        self.last_report: Optional[dict] = None

    def __call__(self, model: Whisper) -> Optional[float]:
        if not self.dev_utterances:
            return None
        model.eval()
        self.last_report = evaluate(model, self.dev_utterances, GREEDY, NO_FALLBACK, self.batch_size, progress=False)
        return self.last_report["wer"]
