"""FastWhisper benchmarks: one entry point, one mode per question.

    python bench.py [models]     # teacher vs students: latency, throughput, the split, memory, and where
                                 # the time goes vs audio length under a fixed vs a dynamic audio context
    python bench.py --quick      # the same, CI-sized (each mode's --help lists what --quick sets)
    python bench.py kernels      # hot-path kernels: eager reference vs torch.compile vs Triton
    python bench.py kernels --sweep-tiles  # CUDA: the Triton log-Mel kernel under each candidate tiling
    python bench.py peers        # the same utterances through openai-whisper, transformers, faster-whisper

Each mode lives in benchmarks/ (models.py, kernel_timing.py, peers.py; common.py holds what they share).

Every mode prints a table and writes a JSON report; models and peers also draw a PNG when matplotlib is
installed. Timing rules everywhere: warm-up first, the GPU synchronised (or CUDA events), medians of repeats,
fixed inputs. Numbers are only what this run measured. `python bench.py MODE --help` lists each mode's flags
and their defaults, which each mode keeps in one DEFAULTS and one QUICK table.
"""
import argparse
import sys

import torch

from benchmarks import kernel_timing, models, peers
from benchmarks.common import DEFAULT_DATA, ByDevice, default_help, quick_help, spell
from data import DATA_ENV, DEV_SPEAKERS
from load import DTYPES, default_dtype
from quantize import DEFAULT_SCOPE, SCOPES
from transcribe import add_audio_context_arguments, non_negative_int

MODES = {"models": models, "kernels": kernel_timing, "peers": peers}


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def dtype_help():
    names = {dtype: name for name, dtype in DTYPES.items()}
    return f"default: {spell(ByDevice(names[default_dtype('cuda')], names[default_dtype('cpu')]))}"


def add_audio_flags(parser, mode):
    """Flags of the modes that transcribe speech: which audio, which batch sizes, how often."""
    def helped(text, name):
        return default_help(text, name, mode.DEFAULTS, mode.QUICK)

    parser.add_argument("--quick", action="store_true", help=quick_help(mode.QUICK))
    parser.add_argument("--data", nargs="+", help=f"LibriSpeech-layout folder(s) or manifest(s) (default: "
                                                  f"${DATA_ENV}/{DEFAULT_DATA}, speakers {' and '.join(DEV_SPEAKERS)})")
    parser.add_argument("--speakers", help="comma-separated speaker ids to keep")
    parser.add_argument("--utterances", type=positive_int, help=helped("how many utterances, evenly spaced",
                                                                       "utterances"))
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", help=helped("", "batch_sizes"))
    parser.add_argument("--passes", type=positive_int, help=helped("timed passes over the audio; the median per "
                                                                   "batch", "passes"))
    parser.add_argument("--dtype", choices=list(DTYPES), help=dtype_help())
    parser.add_argument("--json", help=helped("where the report goes", "json"))
    parser.add_argument("--plot", help=helped("where the plot goes (needs matplotlib)", "plot"))


def add_models_flags(parser):
    def helped(text, name):
        return default_help(text, name, models.DEFAULTS, models.QUICK)

    parser.add_argument("--teacher", help=helped("model name or checkpoint", "teacher"))
    parser.add_argument("--student", nargs="+", metavar="PATH|NAME",
                        help="trained student checkpoints, each decoded for real beside the teacher; an official "
                             "model's name puts that model in the table too (e.g. tiny.en beside base's students)")
    parser.add_argument("--students", nargs="*", metavar="ENC,DEC",
                        help="untrained students from make_student, as encoder,decoder layers, decoded for the "
                             f"teacher's number of steps ({models.students_help()}; none: --students alone)")
    parser.add_argument("--decoders", nargs="+", choices=list(models.DECODERS), help=helped("", "decoders"))
    parser.add_argument("--windows", type=non_negative_int, help=helped("30 s windows of joined utterances, timed "
                                                                        "at batch 1", "windows"))
    parser.add_argument("--repeats", type=positive_int, help=helped("timed calls per split measurement", "repeats"))
    parser.add_argument("--warmup", type=non_negative_int, help=helped(
        "untimed calls before each split measurement (at least 1 runs: the first measures peak memory)", "warmup"))
    add_audio_context_arguments(parser, whose="every model's", margin_default="each model's own; for the "
                                f"sweep's dynamic column of a fixed model: {models.SWEEP_MARGIN}")
    parser.add_argument("--sweep-seconds", type=positive_int, nargs="+", help=helped(
        "clip lengths of the audio context sweep (fixed vs dynamic context at batch 1), at most 30", "sweep_seconds"))
    parser.add_argument("--sweep-repeats", type=positive_int, help=helped(
        "timed calls per sweep measurement; default: --repeats", "sweep_repeats"))
    parser.add_argument("--no-context-sweep", action="store_true", help="skip the audio context sweep")
    parser.add_argument("--int8", nargs="+", choices=list(SCOPES), default=None, metavar="SCOPE",
                        help=f"also every model with int8 weights in each SCOPE (quantize.py: {', '.join(SCOPES)}; "
                             f"{DEFAULT_SCOPE} is the one we recommend), CPU, float32, in the same turns as the "
                             "float models")


def add_peers_flags(parser):
    parser.add_argument("--model", help=default_help("model name or checkpoint, the same weights for every engine",
                                                     "model", peers.DEFAULTS, peers.QUICK))
    parser.add_argument("--peers", nargs="+", choices=list(peers.PEERS),
                        help=default_help("", "peers", peers.DEFAULTS, peers.QUICK))


def add_kernels_flags(parser):
    def helped(text, name):
        return default_help(text, name, kernel_timing.DEFAULTS, kernel_timing.QUICK)

    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help=quick_help(kernel_timing.QUICK))
    sizes.add_argument("--full", dest="sizes", action="store_const", const="full",
                       help=f"the full sizes, even on CPU (default: {spell(kernel_timing.DEFAULTS['sizes'])})")
    parser.add_argument("--kl-dtypes", nargs="+", choices=list(DTYPES), help=helped("logits dtypes of the KL rows",
                                                                                    "kl_dtypes"))
    parser.add_argument("--repeats", type=positive_int, help=helped("timed calls; the median is reported", "repeats"))
    parser.add_argument("--warmup", type=non_negative_int, help=helped("untimed calls after the first (checked) "
                                                                       "call", "warmup"))
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (compiling is slow)")
    parser.add_argument("--sweep-tiles", action="store_true",
                        help="CUDA only: time the Triton log-Mel kernel under each of kernels.log_mel.TILE_CANDIDATES "
                             f"at B={kernel_timing.SWEEP_BATCH} x 30 s instead of the usual rows")
    parser.add_argument("--json", help=helped("where the results go", "json"))


def build_parser():
    parser = argparse.ArgumentParser(description="FastWhisper benchmarks. MODE is models (the default), kernels "
                                                 "or peers: python bench.py MODE --help")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if available, else cpu")
    common.add_argument("--threads", type=positive_int, help="torch CPU threads (torch.set_num_threads)")
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")

    models_parser = modes.add_parser("models", parents=[common], help="teacher vs students: latency, split, memory")
    add_audio_flags(models_parser, models)
    add_models_flags(models_parser)
    kernels_parser = modes.add_parser("kernels", parents=[common], help="eager vs torch.compile vs Triton per kernel")
    add_kernels_flags(kernels_parser)
    peers_parser = modes.add_parser("peers", parents=[common], help="ours vs openai-whisper, transformers, "
                                                                    "faster-whisper")
    add_audio_flags(peers_parser, peers)
    add_peers_flags(peers_parser)
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in tuple(MODES) + ("-h", "--help"):
        argv.insert(0, "models")  # `python bench.py [flags]` is the models mode
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    MODES[args.mode].run(args)


if __name__ == "__main__":
    main()
