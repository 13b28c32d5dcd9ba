"""Run many merges of one tool in one process, for scripts/compare_mergekit.py.

The comparison runs some sixty small merges per architecture family through each tool;
starting Python, torch and transformers took about 9 of every 10 seconds of each. This
worker imports the tool once and calls its command-line entry point - the code that
`mergekit-yaml` or `evomerge merge` runs, with the same arguments - once per job, its
stdout and stderr (file descriptors 1 and 2, so C-level output too) sent to the job's log.

    PYTHON scripts/merge_worker.py mergekit|evomerge

Reads one JSON request per line on stdin, {"argv": [...], "cwd": DIR, "log": FILE}, and
answers each with one line on stdout, {"ok": true|false}. It imports nothing of its own
package, so it runs under mergekit's venv as well as under evomerge's Python.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Callable


def mergekit_entry() -> Callable[[list[str]], bool]:
    """`mergekit-yaml ARGV`: the click command, without its sys.exit."""
    from mergekit.scripts.run_yaml import main

    def run(argv: list[str]) -> bool:
        main.main(args=argv, standalone_mode=False)
        return True

    return run


def evomerge_entry() -> Callable[[list[str]], bool]:
    """`evomerge ARGV`: evomerge.cli.main, which returns the exit status."""
    from evomerge.cli import main

    return lambda argv: main(argv) == 0


def run_job(entry: Callable[[list[str]], bool], argv: list[str], cwd: str, log: str) -> bool:
    """One merge with fds 1 and 2 pointing at `log`; any exception is a failure, logged."""
    os.chdir(cwd)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "w") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        try:
            return entry(argv)
        except SystemExit as exc:
            return exc.code in (0, None)
        except Exception:  # a failed merge is reported, the worker goes on
            traceback.print_exc()
            return False
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def main() -> None:
    entries = {"mergekit": mergekit_entry, "evomerge": evomerge_entry}
    if len(sys.argv) != 2 or sys.argv[1] not in entries:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(entries)}")
    entry = entries[sys.argv[1]]()
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    for line in sys.stdin:
        job = json.loads(line)
        ok = run_job(entry, job["argv"], job["cwd"], job["log"])
        replies.write(json.dumps({"ok": ok}) + "\n")


if __name__ == "__main__":
    main()
