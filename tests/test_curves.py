"""curves.py: the training curves of distill.py runs, from their log.jsonl."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from curves import read_log, smoothed

ROOT = Path(__file__).resolve().parents[1]


def _run(folder: Path, method: str, steps: int) -> Path:
    folder.mkdir()
    lines = [{"preparation": {"examples": 3}}, {"step": 0, "teacher_dev_wer": 0.06}]
    lines += [dict(step=s, loss=2.0 / s, ce=1.5 / s, kl=0.5 / s, soft_weight=1 - s / (2 * steps), phase=method)
              for s in range(1, steps + 1)]
    (folder / "log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return folder


def test_the_step_records_are_read_in_order(tmp_path):
    records = read_log(_run(tmp_path / "kd-s0", "teacher", 5))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert smoothed([1.0, 0.0, 0.0], weight=0.5) == [1.0, 0.5, 0.25]


def test_the_command_draws_the_runs_or_says_what_it_needs(tmp_path):
    runs = [str(_run(tmp_path / name, "teacher", 8)) for name in ("kd-s0", "kd-s1", "askd-s0")]
    out = tmp_path / "curves.png"
    run = subprocess.run([sys.executable, "curves.py", *runs, "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    if importlib.util.find_spec("matplotlib") is None:
        assert run.returncode != 0 and "matplotlib" in run.stderr and not out.exists()
    else:
        assert run.returncode == 0, run.stderr
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run([sys.executable, "curves.py", str(tmp_path / "nothing")], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert missing.returncode != 0 and "log.jsonl" in missing.stderr
