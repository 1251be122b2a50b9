"""Adaptive Self-Knowledge Distillation (ASKD): the loss and its schedule.

The paper (arXiv 2601.19919) states the shape of the method, not its formulas: distillation in which the
teacher's weight decays as training progresses (a curriculum), followed by a self-knowledge-distillation
phase that acts as a regulariser. Our reading, with every choice configurable (ASKDConfig):

  progress p = step / total_steps in [0, 1]
  Phase A, p <= p_A (teacher curriculum):
      L = CE(y, S) + lambda(p) * T^2 * KL(softmax(z_T / T) || softmax(z_S / T))
      lambda decays from lambda_0 to lambda_min: linear (default), cosine, exponential, or adaptive
      (lambda follows how much of the student's label-loss gap to the teacher is still open, so the
      teacher's pull fades as the student catches up, whatever the step count).
  Phase B, p > p_A (progressive self-distillation, as PS-KD):
      L = CE(y, S) + mu(p) * T^2 * KL(softmax(z_S~ / T) || softmax(z_S / T))
      S~ is a frozen snapshot of the student, refreshed every `self_refresh` steps, or (self_teacher =
      "previous-epoch", PS-KD's own choice) the student's top-k predictions for the same example recorded
      the last time it was seen, an epoch earlier; a snapshot refreshed often is the student itself (self-KL
      ~0.001, measured), so it cannot teach. mu grows linearly from lambda_min (continuing where phase A
      ended) to mu_max, trusting the self-teacher more as it improves.

Baselines under the same budget: "ce" (labels only) and "kd" (static: 0.8 * CE + T^2 * KL, as distil-whisper).
A live soft target's KL goes through kernels.kl_div (the fused Triton kernel on GPU, row chunks on CPU);
the teacher's, read from the cache as its top-k logits per token, through top_k_kl_div.
"""
import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from data import IGNORE_LABEL as IGNORE
from kernels import kl_div

METHODS = ("askd", "kd", "ce")
SCHEDULES = ("linear", "cosine", "exponential", "adaptive")
SELF_TEACHERS = ("snapshot", "previous-epoch")


def _knob(default, help: str, choices=None):
    """A config field with the help text and choices its command-line flag shows (distill.py builds one
    flag per field, so each default is written here only)."""
    return field(default=default, metadata=dict(help=help, choices=choices))


@dataclass
class ASKDConfig:
    method: str = _knob("askd", "askd: teacher weight decays, then self-distillation; kd: 0.8 CE + T^2 KL "
                                "(distil-whisper); ce: labels only", METHODS)
    temperature: float = _knob(2.0, "softmax temperature T of the KL terms")
    lambda_start: float = _knob(1.0, "askd: teacher weight lambda_0 at the start of phase A")
    lambda_min: float = _knob(0.1, "askd: teacher weight at the end of phase A")
    schedule: str = _knob("linear", "askd: how lambda decays in phase A", SCHEDULES)
    phase_a_end: float = _knob(0.7, "askd: fraction of training with the teacher (phase A)")
    mu_max: float = _knob(0.5, "askd: self-distillation weight at the end of training")
    self_refresh: int = _knob(100, "askd: steps between refreshes of the self-teacher snapshot")
    self_teacher: str = _knob("snapshot", "askd, phase B: snapshot: a frozen copy of the student, refreshed every "
                                          "self_refresh steps; previous-epoch: each example's own predictions the "
                                          "last time the student saw it (PS-KD): a teacher that differs from the "
                                          "student by an epoch of training", SELF_TEACHERS)
    kd_ce_weight: float = _knob(0.8, "kd: weight of the label CE (the KL's weight is 1), as distil-whisper")
    adaptive_momentum: float = _knob(0.9, "askd, adaptive schedule: EMA of the label losses that drive it")
    hidden_weight: float = _knob(0.0, "weight of intermediate-layer distillation (kd, askd's phase A, scaled like "
                                      "the teacher's KL): each student decoder block's output pulled to the teacher "
                                      "block's it stands for (student.layers_stood_for); 0: off")

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.self_teacher not in SELF_TEACHERS:
            raise ValueError(f"self_teacher must be one of {SELF_TEACHERS}, got {self.self_teacher!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.phase_a_end <= 1.0:
            raise ValueError(f"phase_a_end must be in [0, 1], got {self.phase_a_end}")
        if self.hidden_weight < 0:
            raise ValueError(f"hidden_weight must be >= 0, got {self.hidden_weight}")
        if self.temperature <= 0 or self.self_refresh < 1:
            raise ValueError("temperature must be > 0 and self_refresh >= 1")


class ASKDSchedule:
    """Which phase training is in, and the weight of the soft targets at each step."""

    def __init__(self, config: ASKDConfig):
        self.config = config
        self.student_ce: Optional[float] = None  # running (EMA) label losses, for the adaptive schedule
        self.teacher_ce: Optional[float] = None
        self.initial_gap: Optional[float] = None

    def phase(self, progress: float) -> str:
        """Where the soft targets come from: the teacher (phase A, and kd throughout), the student's own
        snapshot (phase B), or nowhere (ce)."""
        if self.config.method == "ce":
            return "none"
        if self.config.method == "kd" or progress <= self.config.phase_a_end:
            return "teacher"
        return "self"

    def soft_weight(self, progress: float) -> float:
        """lambda(p) in phase A, mu(p) in phase B; 1 for kd, 0 for ce."""
        c = self.config
        if c.method == "ce":
            return 0.0
        if c.method == "kd":
            return 1.0
        if self.phase(progress) == "teacher":
            return self._lambda(min(progress / c.phase_a_end, 1.0) if c.phase_a_end > 0 else 1.0)
        ramp = (progress - c.phase_a_end) / (1.0 - c.phase_a_end)
        return c.lambda_min + (c.mu_max - c.lambda_min) * ramp

    def ce_weight(self) -> float:
        return self.config.kd_ce_weight if self.config.method == "kd" else 1.0

    def _lambda(self, x: float) -> float:
        """Teacher weight at fraction x in [0, 1] of phase A."""
        c = self.config
        span = c.lambda_start - c.lambda_min
        if c.schedule == "linear":
            decay = 1.0 - x
        elif c.schedule == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * x))
        elif c.schedule == "exponential":  # falls to 1 % of the span by the end of phase A
            decay = (math.exp(-math.log(100.0) * x) - 0.01) / 0.99
        else:
            decay = self._open_gap()
        return c.lambda_min + span * decay

    def _open_gap(self) -> float:
        """Fraction of the initial (student CE - teacher CE) gap still open, in [0, 1]."""
        if self.initial_gap is None or self.initial_gap <= 0:
            return 1.0
        gap = self.student_ce - self.teacher_ce
        return min(max(gap / self.initial_gap, 0.0), 1.0)

    def observe(self, student_ce: float, teacher_ce: Optional[float]):
        """Feed this step's label losses (the adaptive schedule reads their running averages)."""
        if teacher_ce is None:
            return
        m = self.config.adaptive_momentum
        if self.student_ce is None:
            self.student_ce, self.teacher_ce = student_ce, teacher_ce
            self.initial_gap = student_ce - teacher_ce
        else:
            self.student_ce = m * self.student_ce + (1 - m) * student_ce
            self.teacher_ce = m * self.teacher_ce + (1 - m) * teacher_ce

    def state_dict(self) -> Dict:
        return dict(student_ce=self.student_ce, teacher_ce=self.teacher_ce, initial_gap=self.initial_gap)

    def load_state_dict(self, state: Dict):
        self.student_ce, self.teacher_ce, self.initial_gap = state["student_ce"], state["teacher_ce"], state["initial_gap"]


def label_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the positions that have a label. logits (..., V), labels (...)."""
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE)


def top_k_kl_div(student_logits: Tensor, top_values: Tensor, top_ids: Tensor, teacher_lse: Tensor,
                 temperature: float) -> Tensor:
    """T^2 * KL between the teacher and the student at temperature T over k + 1 outcomes: the teacher's k
    likeliest tokens, each exact, and all others as one "rest" bucket. Mean over rows.

    This is what the cache keeps of the teacher: its k largest logits, their ids, and the log-normaliser
    of its full row at T (teacher_lse = logsumexp(z_T / T)), so its top-k probabilities are exact. At T = 2
    Whisper's distribution is flat: its 64 likeliest tokens hold only ~25 % of the mass, so renormalising
    over them (dropping the rest) is badly wrong (KL 6.6 where the full one is 0.16, measured). With the
    rest as one bucket the gradient points the same way as the full KL's (cosine 0.999 at k = 64); the
    loss value is lower (0.09 vs 0.16: the spread inside the rest is not counted).
    student_logits (N, V); top_values (N, k) logits, top_ids (N, k) their ids; teacher_lse (N,)."""
    log_q = (student_logits.float() / temperature).log_softmax(dim=-1)  # (N, V)
    log_q_top = log_q.gather(-1, top_ids.long())  # (N, k)
    log_p_top = top_values.float() / temperature - teacher_lse.float()[:, None]  # (N, k), exact
    p_top = log_p_top.exp()
    p_rest = (1 - p_top.sum(-1)).clamp_min(1e-12)
    q_rest = (1 - log_q_top.exp().sum(-1)).clamp_min(1e-12)
    kl = (p_top * (log_p_top - log_q_top)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())  # (N,)
    return temperature**2 * kl.mean()


def hidden_state_loss(student_blocks: Tensor, teacher_blocks: Tensor) -> Tensor:
    """Mean squared distance between the student's block outputs and the teacher's it stands for, each
    vector first normalised to zero mean and unit variance (a layer norm without scale): the residual
    stream's size grows with depth and a few channels carry most of it, so raw MSE would be theirs alone.
    The value is 2 (1 - correlation) per position, 0 when equal. Both (n_labels, n_student_layers, D)."""
    shape = student_blocks.shape[-1:]
    return (F.layer_norm(student_blocks.float(), shape) - F.layer_norm(teacher_blocks.float(), shape)).pow(2).mean()


@dataclass
class SoftTargets:
    """What the student is distilled from this step: a live model's full logits (B, T, V) (the
    self-teacher), or the k largest logits (n_labels, k) and their ids at each labelled position, in
    order, with the log-normaliser of each full row at T (the teacher, read from the cache); with the
    teacher, optionally its block outputs for the student's blocks (n_labels, n_student_layers, D). `rows`
    (n_labels,) bool, if given, says which labelled positions have top-k targets (the others get no KL)."""
    logits: Optional[Tensor] = None
    top_values: Optional[Tensor] = None
    top_ids: Optional[Tensor] = None
    teacher_lse: Optional[Tensor] = None
    hidden: Optional[Tensor] = None
    rows: Optional[Tensor] = None


def distillation_loss(
    student_logits: Tensor,
    labels: Tensor,
    soft: Optional[SoftTargets],
    soft_weight: float,
    ce_weight: float,
    temperature: float,
    student_blocks: Optional[Tensor] = None,
    hidden_weight: float = 0.0,
) -> Dict[str, Tensor]:
    """ce_weight * CE(labels, student) + soft_weight * T^2 * KL(soft || softmax(student / T))
    [+ soft_weight * hidden_weight * hidden_state_loss(student_blocks, soft.hidden), when both are given].

    student_logits (B, T, V) with labels (B, T) holding IGNORE where no loss is taken, or only the
    labelled positions: (n, V) with labels (n,). The KL is averaged over the same labelled positions as the
    CE; soft logits have the student's shape.
    """
    ce = label_loss(student_logits, labels)
    total = ce_weight * ce
    kl = torch.zeros((), device=ce.device)
    if soft is not None and soft_weight > 0:
        mask = labels.flatten() != IGNORE
        rows = student_logits.flatten(0, -2)  # (N, V)
        if soft.logits is not None:
            kl = kl_div(rows, soft.logits.flatten(0, -2).detach(), temperature, mask)
        else:
            rows = rows[mask] if soft.rows is None else rows[mask][soft.rows]
            if len(rows):
                kl = top_k_kl_div(rows, soft.top_values, soft.top_ids, soft.teacher_lse, temperature)
        total = total + soft_weight * kl
    hidden = torch.zeros((), device=ce.device)
    if soft is not None and soft.hidden is not None and student_blocks is not None and soft_weight * hidden_weight > 0:
        hidden = hidden_state_loss(student_blocks, soft.hidden)
        total = total + soft_weight * hidden_weight * hidden
    return dict(loss=total, ce=ce, kl=kl, hidden=hidden)
