"""The `evomerge` command: subcommands merge, eval, zoo and evolve.

Each package owns its subcommand's parser and runner (merging/cli.py, evaluation/cli.py,
niches/cli.py), which only parse and call the library. This is the one module that knows
all three layers. It resolves a `--zoo` size name to its folder (the zoo belongs to
evaluation; merging only ever gets a folder), and it turns what a user can cause into
one message and an exit status, never a traceback. Building the parser imports no
torch, so `evomerge --help` answers at once.
"""
from __future__ import annotations

import argparse
import os
import sys

from evaluation.cli import add_eval_parser, add_zoo_parser
from merging.cli import add_merge_parser
from niches.cli import add_evolve_parser

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a tool stopped by Ctrl-C
EXIT_STDOUT_CLOSED = 141  # 128 + SIGPIPE, what a shell reports for a Unix tool whose reader left


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evomerge",
        description="Evolutionary model merging: merge checkpoints with mergekit-compatible recipes, "
                    "score candidates per example, build the offline model zoo, evolve recipes with CMA-ES or M2N2.",
        epilog="Run `evomerge COMMAND --help` for a command's flags. A first look: bash scripts/demo.sh",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_merge_parser(subparsers)
    add_eval_parser(subparsers)
    add_zoo_parser(subparsers)
    add_evolve_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from merging.errors import EvomergeError

    try:
        if getattr(args, "zoo", None) is not None:
            from evaluation.zoo import find_zoo

            args.zoo = find_zoo(args.zoo)
        args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at exit
    except BrokenPipeError:
        return _stdout_closed()
    except (EvomergeError, OSError) as exc:  # OSError: disk full, permission denied, in the system's words
        print(f"evomerge: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        interrupted = getattr(args, "interrupted", None)
        print(f"evomerge: interrupted; {interrupted(args) if interrupted else 'no output was written'}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _stdout_closed() -> int:
    """The reader of stdout left (`evomerge ... | head`): not an error, so no message. As
    Python's documentation advises (signal module, "Note on SIGPIPE"), point stdout at
    devnull so that the interpreter's final flush does not raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_STDOUT_CLOSED


if __name__ == "__main__":
    sys.exit(main())
