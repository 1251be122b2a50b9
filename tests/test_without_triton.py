"""Triton is optional: with `import triton` failing, as on macOS and Windows where it has no wheels, the
command lines still run and the kernels fall back to their PyTorch versions.

Each check runs in a subprocess whose sitecustomize puts a finder first on sys.meta_path that refuses
`triton` (and `triton.*`) with ModuleNotFoundError, as a missing package does. At exit the subprocess
reports whether triton got into sys.modules anyway."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCK_TRITON = textwrap.dedent("""
    import atexit
    import sys


    class _NoTriton:
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None


    sys.meta_path.insert(0, _NoTriton())
    atexit.register(lambda: print("triton in sys.modules:", "triton" in sys.modules, file=sys.stderr))
""")

KERNELS_FALL_BACK = textwrap.dedent("""
    import sys

    import torch

    from kernels import TRITON_AVAILABLE, kl_div, kl_div_reference, log_mel_spectrogram
    from kernels import log_mel_spectrogram_reference, log_mel_spectrogram_triton, kl_div_triton

    assert TRITON_AVAILABLE is False
    gen = torch.Generator().manual_seed(0)
    audio = 0.1 * torch.randn(2, 4000, generator=gen)
    assert torch.equal(log_mel_spectrogram(audio), log_mel_spectrogram_reference(audio))

    student = 3 * torch.randn(5, 1271, generator=gen)
    teacher = 3 * torch.randn(5, 1271, generator=gen)
    mask = torch.tensor([True, False, True, True, False])
    losses, grads = [], []
    for fn in (kl_div, kl_div_reference):
        leaf = student.clone().requires_grad_()
        loss = fn(leaf, teacher, 2.0, mask)
        loss.backward()
        losses.append(loss.detach())
        grads.append(leaf.grad)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-8)
    assert torch.equal(kl_div(student, teacher, 2.0, mask), kl_div_reference(student, teacher, 2.0, mask))

    for call in (lambda: kl_div_triton(student, teacher), lambda: log_mel_spectrogram_triton(audio)):
        try:
            call()
        except RuntimeError as e:
            assert "needs Triton: pip install triton" in str(e), e
        else:
            raise AssertionError("a Triton kernel ran without Triton")
    print("kernels fall back")
""")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of a Python that cannot import triton."""
    folder = tmp_path_factory.mktemp("no_triton")
    (folder / "sitecustomize.py").write_text(BLOCK_TRITON)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("TRITON_INTERPRET", None)  # set by conftest for the interpreter tests; nothing to interpret here
    return env


def run(env, *args, timeout=600):
    """Runs python with args in the repository; returns stdout after checking it exited 0 without triton."""
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stderr[-3000:]}"
    assert "triton in sys.modules: False" in done.stderr, f"triton was imported after all:\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_block_works(env):
    out = run(env, "-c", "import importlib\n"
                         "try:\n    importlib.import_module('triton')\nexcept ImportError:\n    print('blocked')")
    assert out.strip() == "blocked"


def test_kernels_fall_back_to_pytorch(env):
    assert "kernels fall back" in run(env, "-c", KERNELS_FALL_BACK)


def test_transcribe_without_triton(env, data_dir):
    out = run(env, "transcribe.py", "--model", "tiny.en", str(data_dir / "longform" / "jfk.flac"))
    words = re.sub(r"[^a-z ]", "", out.lower()).split()
    assert " ".join(words) == ("and so my fellow americans ask not what your country can do for you "
                               "ask what you can do for your country")


@pytest.mark.parametrize("script", ["bench.py", "distill.py"])
def test_command_line_help_without_triton(env, script):
    assert "usage:" in run(env, script, "--help", timeout=300)
