"""FastWhisper benchmarks: one entry point, one mode per question.

    python bench.py [models]    # teacher vs students: latency, throughput, the split, memory     (bench_models.py)
    python bench.py --quick     # the same, CI-sized: tiny.en, 3 utterances, batch 1 and 2, greedy
    python bench.py kernels     # hot-path kernels: eager reference vs torch.compile vs Triton    (bench_kernels.py)
    python bench.py peers       # the utterances through openai-whisper, transformers, faster-whisper (bench_peers.py)

Every mode prints a table and writes a JSON report (bench.json, bench-kernels.json, bench-peers.json); models
and peers also draw a PNG when matplotlib is installed. Timing rules everywhere: warm-up first, the GPU
synchronised (or CUDA events), medians of repeats, fixed inputs. Numbers are only what this run measured.
`python bench.py MODE --help` lists each mode's flags.
"""
import argparse
import sys

import torch

import bench_kernels
import bench_models
import bench_peers
from load import DTYPES

MODES = ("models", "kernels", "peers")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_models_flags(models):
    models.add_argument("--quick", action="store_true", help="CI-sized: " + ", ".join(
        f"{k}={v}" for k, v in bench_models.QUICK.items()))
    models.add_argument("--teacher", help="model name or checkpoint (default: base; quick: tiny.en)")
    models.add_argument("--student", help="a trained student checkpoint: decoded for real, beside the teacher")
    models.add_argument("--students", nargs="+", metavar="ENC,DEC",
                        help="untrained students from make_student, as encoder,decoder layers, decoded for the "
                             "teacher's number of steps "
                             "(default: 6,2 6,1 4,2 3,2 for base; quick: the first)")
    models.add_argument("--decoders", nargs="+", choices=list(bench_models.DECODERS), help="default: both")
    models.add_argument("--windows", type=int, help="30 s windows of joined utterances, timed at batch 1 (default 4)")
    models.add_argument("--repeats", type=positive_int, help="timed calls per split measurement (default 3)")
    models.add_argument("--warmup", type=int, default=1, help="untimed calls before each split measurement "
                                                              "(at least 1: the first measures peak memory)")
    models.add_argument("--json", default="bench.json", help="where the report goes")
    models.add_argument("--plot", default="bench.png", help="where the plot goes (needs matplotlib)")
    models.set_defaults(run=bench_models.run)


def add_peers_flags(peers):
    peers.add_argument("--quick", action="store_true", help="CI-sized: " + ", ".join(
        f"{k}={v}" for k, v in bench_peers.QUICK.items()))
    peers.add_argument("--model", help="model name or checkpoint, the same weights for every engine "
                                       "(default: base; quick: tiny.en)")
    peers.add_argument("--peers", nargs="+", choices=list(bench_peers.PEERS), help="default: all of them")
    peers.add_argument("--json", default="bench-peers.json", help="where the report goes")
    peers.add_argument("--plot", default="bench-peers.png", help="where the plot goes (needs matplotlib)")
    peers.set_defaults(run=bench_peers.run)


def add_audio_flags(parser):
    """Flags of the modes that transcribe speech: which audio, which batch sizes, how often."""
    parser.add_argument("--data", nargs="+", help="LibriSpeech-layout folder(s) or manifest(s) "
                                                  "(default: $FASTWHISPER_DATA/train-clean-5, speakers 669 and 3242)")
    parser.add_argument("--speakers", help="comma-separated speaker ids to keep")
    parser.add_argument("--utterances", type=positive_int, help="how many utterances, evenly spaced (default 30)")
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+",
                        help="default: 1 8 16 32 on CUDA, 1 8 on CPU (models); 1 16 on CUDA, 1 on CPU (peers)")
    parser.add_argument("--passes", type=positive_int, help="timed passes over the audio; the median per batch "
                                                            "(default: 3 on CUDA, 1 on CPU)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: float16 on CUDA, float32 on CPU")


def build_parser():
    parser = argparse.ArgumentParser(description="FastWhisper benchmarks. MODE is models (the default), kernels "
                                                 "or peers: python bench.py MODE --help")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if available, else cpu")
    common.add_argument("--threads", type=positive_int, help="torch CPU threads (torch.set_num_threads)")
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")

    models = modes.add_parser("models", parents=[common], help="teacher vs students: latency, split, memory")
    add_audio_flags(models)
    add_models_flags(models)

    kernels = modes.add_parser("kernels", parents=[common], help="eager vs torch.compile vs Triton per kernel")
    sizes = kernels.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="small sizes (default on CPU)")
    sizes.add_argument("--full", action="store_true", help="the issue's sizes even on CPU (default on CUDA)")
    kernels.add_argument("--repeats", type=positive_int, default=10, help="timed calls; the median is reported")
    kernels.add_argument("--warmup", type=int, default=2, help="untimed calls after the first (checked) call")
    kernels.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (compiling is slow)")
    kernels.add_argument("--json", default="bench-kernels.json", help="where the results go")
    kernels.set_defaults(run=bench_kernels.run)

    peers = modes.add_parser("peers", parents=[common], help="ours vs openai-whisper, transformers, faster-whisper")
    add_audio_flags(peers)
    add_peers_flags(peers)
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in MODES + ("-h", "--help"):
        argv.insert(0, "models")  # `python bench.py [flags]` is the models mode
    args = build_parser().parse_args(argv)
    if getattr(args, "warmup", 0) < 0:
        raise SystemExit("--warmup must be at least 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.run(args)


if __name__ == "__main__":
    main()
