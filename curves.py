"""Training curves of distillation runs, from their OUT/log.jsonl, drawn side by side (needs matplotlib).

    python curves.py runs/kd-s0 runs/askd-s0 runs/ce-s0 --out curves.png

Panels: the label cross-entropy (the part of the loss every method shares, so methods compare on it),
the KL to the soft target (the teacher's, or in ASKD's second phase the self-teacher's), and the weight
of that soft target (ASKD's lambda, then mu). Runs of one method (the folder name up to its first "-")
share a colour; seeds differ by line style.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

PANELS = (("ce", "label cross-entropy"), ("kl", "KL to the soft target"), ("soft_weight", "soft-target weight"))


def read_log(run: Path) -> List[dict]:
    """The step records of a run's log.jsonl (those with a loss), in order."""
    path = Path(run) / "log.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run} a distill.py --out folder?")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "loss" in r and "step" in r]


def smoothed(values: List[float], weight: float = 0.8) -> List[float]:
    """An exponential moving average (TensorBoard's smoothing): steps of 16 examples are noisy."""
    out, average = [], None
    for v in values:
        average = v if average is None else weight * average + (1 - weight) * v
        out.append(average)
    return out


def plot(runs: Dict[str, List[dict]], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def method(name):
        return name.split("-")[0]

    colours = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(sorted({method(n) for n in runs}))}
    styles = ["-", "--", ":", "-."]
    figure, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
    seen = {}
    for name, records in sorted(runs.items()):
        style = styles[seen.setdefault(method(name), 0) % len(styles)]
        seen[method(name)] += 1
        colour = colours[method(name)]
        steps = [r["step"] for r in records]
        for axis, (key, title) in zip(axes, PANELS):
            if all(key in r for r in records):
                values = [r[key] for r in records]
                axis.plot(steps, values if key == "soft_weight" else smoothed(values), style, color=colour, label=name)
            axis.set_title(title)
            axis.set_xlabel("step")
    for axis in axes:
        if axis.lines:
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="distill.py --out folders")
    parser.add_argument("--out", default="curves.png", help="the PNG to write")
    args = parser.parse_args(argv)
    try:
        runs = {Path(run).name: read_log(Path(run)) for run in args.runs}
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    try:
        plot(runs, Path(args.out))
    except ImportError:
        sys.exit("error: drawing needs matplotlib (pip install matplotlib)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
