"""The ``relic`` command line: one console script, one subcommand per user task.

    relic shards build SOURCE OUT [options]     build WebDataset shards (local dir or s3://)
    relic shards index URL                      write our manifest for shards made elsewhere
    relic shards verify OUT | inspect OUT       check or summarise a shard set
    relic train CONFIG [key=value ...]          pretrain with Ray Train (local Ray or RAY_ADDRESS)
    relic eval CHECKPOINT ...                   kNN / linear probe / robustness, export
    relic demo                                  the whole system on built-in digits, with a report
    relic doctor [--url URL]                    what this node offers and whether we can run here

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported lazily so that ``relic shards`` does not pay for importing Ray or torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "shards": ("commands.shards", "build, index, verify and inspect WebDataset shards"),
    "train": ("commands.train", "pretrain ReLIC with Ray Train from a YAML config"),
    "eval": ("commands.evaluate", "evaluate a checkpoint (kNN, linear probe, robustness) and export it"),
    "demo": ("commands.demo", "build digits shards, pretrain, evaluate and write a report"),
    "doctor": ("commands.doctor", "check what this node offers and whether the system can run here"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relic", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    requested = argv[0] if argv else None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        # Only the requested subcommand's module is imported (the others may pull in Ray/torch).
        if name == requested:
            module = importlib.import_module(module_name)
            module.add_arguments(sp)
            sp.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    # Options may come before or after ``key=value`` overrides (``relic train CONFIG --print-config
    # a=b``): argparse ends a positional list at the first option, so the overrides after it are
    # handed back here.
    if hasattr(args, "overrides"):
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if not ("=" in e and not e.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
