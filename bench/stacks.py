"""Summarise a py-spy ``--format raw`` profile (collapsed stacks): where the samples are,
by thread, by own frame, and by any frame on the stack (inclusive), optionally only for
stacks passing through a given function.

    .venv/bin/python -m bench.stacks PROFILE.txt [--top 25] [--under NAME]
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

#: leaf frames that are a thread waiting (py-spy cannot always tell a blocked C call from work):
#: an idle pool worker, aiosqlite's idle connection thread, the event loop's select
WAITING = ("_worker (concurrent/futures/thread.py", "_connection_worker_thread (aiosqlite/core.py",
           "EpollSelector.select (selectors.py", "Condition.wait (threading.py", "Event.wait (threading.py")

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def short(frame: str) -> str:
    match = FRAME.match(frame)
    if not match:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "python3.11/", "/bench/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['func']} ({path})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stacks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--under", help="only stacks with a frame containing this text")
    parser.add_argument("--idle", action="store_true", help="keep stacks of waiting threads (see WAITING)")
    args = parser.parse_args(argv)
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    with open(args.profile) as handle:
        for line in handle:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            frames = stack.split(";")
            if args.under and not any(args.under in f for f in frames):
                continue
            names = [short(f) for f in frames if not f.startswith(("thread", "process"))]
            if not args.idle and names and names[-1].startswith(WAITING):
                continue
            total += count
            threads[frames[0].split(" ")[0] if frames[0].startswith(("thread", "process")) else frames[0]] += count
            if names:
                own[names[-1]] += count
            for name in set(names):
                inclusive[name] += count
    print(f"{total} samples")
    for title, counter in (("threads", threads), ("own", own), ("inclusive", inclusive)):
        print(f"\n-- {title}")
        for name, count in counter.most_common(args.top):
            print(f"{100 * count / total:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
