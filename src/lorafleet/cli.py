"""The ``lorafleet`` command line.

    lorafleet demo                                   # the bundled demo (what `make demo` runs)
    lorafleet generate --model PATH --prompt TEXT    # KV-cache generation, chat template applied
    lorafleet train CONFIG.yaml                      # train every task of a config together
    lorafleet train CONFIG.yaml --nproc 2            # the same as a 2-stage pipeline (starts torchrun)
    lorafleet eval CONFIG.yaml                       # each task's saved adapter on its eval_dataset
    lorafleet generate --model PATH --prompt TEXT --adapter base --adapter DIR   # answers side by side
    lorafleet export --adapter DIR --output PATH [--merge] [--gguf]   # PEFT / merged HF / llama.cpp GGUF
    lorafleet serve --base-model PATH --data-dir DIR # fine-tuning service: REST API, dashboard, worker
    lorafleet tokens create --tenant NAME --data-dir DIR   # an API token for the service
    lorafleet worker --store URL --base-model M --data-dir DIR  # a training worker of a fleet
    lorafleet tenants set NAME --weight 2 --max-queued-jobs 20 # fair-share weight and quotas of a tenant
    lorafleet jobs create|list|show|cancel|download  # the service's command-line client
    lorafleet bench [--quick]                        # benchmarks/bench.py: lorafleet vs PEFT, mlora, FSDP

User mistakes (``ValueError`` and subclasses: bad config, bad data, bad model path) print one clear
paragraph and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable

__all__ = ["main"]

EXIT_USER_ERROR = 2


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (options without help text get one that is only that).

    Flags (store_true / store_false), ``--help``, ``--version`` and options whose default is None show none.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, argparse.SUPPRESS) and action.nargs != 0
        if shown and "%(default)" not in text and (action.option_strings or action.nargs in ("?", "*")):
            text = f"{text} (default: %(default)s)" if text else "default: %(default)s"
        return text

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.default not in (None, argparse.SUPPRESS) and action.nargs != 0:
            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)


class _Parser(argparse.ArgumentParser):
    """``ArgumentParser`` with ``_HelpFormatter``; subcommand parsers (and theirs) inherit the class."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generate_cli import cli_generate

    return cli_generate(args)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with the base model (and adapters)")
    p.add_argument("--model", required=True, help="Hugging Face folder or .gguf file")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument(
        "--system", default=None, metavar="TEXT", help="a system message before each prompt (chat template)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--adapter",
        action="append",
        metavar="[LABEL=]DIR",
        help="a PEFT adapter folder (repeatable; 'base' = no adapter): every prompt is answered by every "
        "adapter in one batch, each row with its own adapter, and the answers are printed side by side",
    )
    p.set_defaults(func=_cmd_generate)


def _cmd_train(args: argparse.Namespace) -> int:
    from .train.run import cli_train

    return cli_train(args)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train every task of a YAML config together")
    p.add_argument("config", help="the run's YAML config")
    p.add_argument("--no-progress", action="store_true", help="no live progress bars (logs only)")
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="P",
        help="run a pipeline of P processes on this machine (starts torchrun; same as "
        "`torchrun --nproc-per-node P -m lorafleet train CONFIG`)",
    )
    p.set_defaults(func=_cmd_train)


def _cmd_eval(args: argparse.Namespace) -> int:
    from .train.evaluate import cli_eval

    return cli_eval(args)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate saved adapters on their tasks' eval_dataset (fused batches)")
    p.add_argument("config", help="the run's YAML config (its tasks name the eval datasets)")
    p.add_argument(
        "--adapter",
        action="append",
        metavar="TASK=DIR",
        help="evaluate this PEFT folder for TASK (repeatable; default: OUTPUT_DIR/adapters/<adapter>)",
    )
    p.add_argument(
        "--output-dir", default=None, help="where the trained adapters are (default: the config's)"
    )
    p.add_argument("--with-base", action="store_true", help="also the base model on each sft eval set")
    p.set_defaults(func=_cmd_eval)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import cli_demo

    return cli_demo(args)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train four adapters on the bundled SmolLM2 and compare their answers")
    p.add_argument("--config", default=None, help="demo config (default: examples/demo.yaml)")
    p.add_argument("--output-dir", default=None, help="override the config's output_dir")
    p.set_defaults(func=_cmd_demo)


def _add_export(sub) -> None:
    from .export_cli import add_export_command

    add_export_command(sub)


def _add_service(sub) -> None:
    from .service.commands import (
        add_jobs_command,
        add_serve_command,
        add_tenants_command,
        add_tokens_command,
        add_worker_command,
    )

    add_serve_command(sub)
    add_worker_command(sub)
    add_tenants_command(sub)
    add_tokens_command(sub)
    add_jobs_command(sub)


def _cmd_bench(args: argparse.Namespace) -> int:
    import subprocess
    from pathlib import Path

    candidates = [
        Path(__file__).resolve().parents[2] / "benchmarks" / "bench.py",
        Path.cwd() / "benchmarks" / "bench.py",
    ]
    script = next((c for c in candidates if c.is_file()), None)
    if script is None:
        raise ValueError(
            "lorafleet bench runs benchmarks/bench.py from a source checkout, and none was found next to the "
            "installed package or in the current folder; run it from the repository root"
        )
    forwarded = ["--quick"] if args.quick else ["--smoke"] if args.smoke else []
    if args.repeats is not None:
        forwarded += ["--repeats", str(args.repeats)]
    forwarded += ["--no-mlora"] if args.no_mlora else []
    forwarded += ["--no-parallel"] if args.no_parallel else []
    forwarded += ["--no-pipeline"] if args.no_pipeline else []
    forwarded += ["--threads", str(args.threads)] if args.threads is not None else []
    forwarded += ["--out-dir", args.out_dir] if args.out_dir else []
    forwarded += ["--cache-dir", args.cache_dir] if args.cache_dir else []
    return subprocess.call([sys.executable, str(script), *forwarded])


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="the side-by-side benchmark (benchmarks/bench.py): tables and charts")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer scenarios, one run each")
    mode.add_argument("--smoke", action="store_true", help="a tiny model, seconds")
    p.add_argument("--repeats", type=int, default=None, help="runs per figure (default 3)")
    p.add_argument("--no-mlora", action="store_true", help="skip the mlora package and its venv")
    p.add_argument("--no-parallel", action="store_true", help="skip N PEFT processes at once")
    p.add_argument(
        "--no-pipeline", action="store_true", help="skip benchmarks/pipeline.py (pipeline vs FSDP)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads per contender (default: cores)")
    p.add_argument("--out-dir", default=None, help="default: benchmarks/results")
    p.add_argument("--cache-dir", default=None, help="default: benchmarks/.cache")
    p.set_defaults(func=_cmd_bench)


_COMMANDS: list[Callable] = [
    _add_demo,
    _add_train,
    _add_eval,
    _add_generate,
    _add_export,
    _add_service,
    _add_bench,
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="lorafleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"lorafleet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # user mistakes: config, data, model path
        print(f"lorafleet {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``lorafleet`` command and ``python -m lorafleet``: the CPU allocator set for training
    (``cpu_memory.tune_cpu_allocator``), ``main``, then a quick exit.

    Once ``main`` has returned every file is closed and every thread joined, yet a normal interpreter exit
    with torch and matplotlib loaded still spends half a second to a second tearing modules down
    (``benchmarks/realistic.py`` prints the time from the last step to the exit). So the ``atexit``
    handlers run, the standard streams are flushed, and the process ends with ``os._exit``. ``main`` itself
    (for callers in Python) returns as usual; an exception still propagates with its traceback.
    """
    import atexit
    import os

    from .cpu_memory import tune_cpu_allocator

    tune_cpu_allocator()
    code = main()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
