"""Distil from what you have: few labels with many unlabelled images, and several teachers; one script, two parts.

``--part few-labels``  ``benchmarks/few_labels.py`` (``configs/few-labels.yaml``): scratch on 100 labels per class
                       against KD and SimKD with the other training images unlabelled. Prints, last,
                       ``few-labels gain = X pp``.
``--part ensemble``    ``benchmarks/ensemble.py`` (``configs/ensemble.yaml``): the best single-teacher student
                       against the student of all the teachers, 3 seeds. Prints, last, ``ensemble gain = Y pp``.

With no ``--part``, both, side by side (one process each, one thread each: the parts share nothing, each has its own
work folder), each part's output printed whole when it ends, few-labels first, so the last line is
``ensemble gain = Y pp``. Every row is a cached ``kdpipe run`` in the part's work folder: an interrupted run resumes.
The exit code is the first failing part's.

    python benchmarks/what_you_have.py [--part few-labels|ensemble] [--work DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: part → (script, work folder name under --work)
PARTS = {"few-labels": ("few_labels.py", "bench-few-labels"), "ensemble": ("ensemble.py", "bench-ensemble")}


def command(part: str, work: Path | None) -> list[str]:
    script, folder = PARTS[part]
    return [sys.executable, str(HERE / script), *(["--work", str(work / folder)] if work else [])]


def relay(part: str, stream, sink) -> None:
    """Copy a part's progress lines to ``sink``, each prefixed with the part's name."""
    for line in stream:
        sink.write(f"[{part}] {line}")
        sink.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=sorted(PARTS), help="one part (default: both, side by side)")
    parser.add_argument("--work", type=Path, help="one folder for the parts' work folders (default: each script's)")
    args = parser.parse_args()
    if args.part:
        return subprocess.run(command(args.part, args.work)).returncode
    running = {}
    for part in PARTS:
        proc = subprocess.Popen(command(part, args.work), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        thread = threading.Thread(target=relay, args=(part, proc.stderr, sys.stderr), daemon=True)
        thread.start()
        running[part] = (proc, thread)
    codes = []
    for proc, thread in running.values():  # few-labels first: the last line is the ensemble's gain
        out = proc.stdout.read()
        codes.append(proc.wait())
        thread.join()
        sys.stdout.write(out)
        sys.stdout.flush()
    return next((code for code in codes if code), 0)


if __name__ == "__main__":
    sys.exit(main())
