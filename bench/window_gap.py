"""Reads of a process's window while one of its commits waits past a gap.

    python bench/window_gap.py [--members 100,1000,10000] [--comet DIR ...]

A shared store's window keeps this process's commits that come after another
process's commit not tailed yet (a gap) apart, and refuses the reads of their
recipients until the gap is filled: those polls read the store.  This times,
in process, a window started at 0 holding one package at position 2 for a
channel of ``--members``: each member's read (refused), then 1,000 reads of
clients with nothing there (answered).  Each comet.py given (``--comet``,
several to compare; the repository's by default) in turn.
"""

import argparse
import importlib.util
import json
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def load(directory):
    spec = importlib.util.spec_from_file_location(f"comet_{abs(hash(directory))}",
                                                  os.path.join(directory, "comet.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(comet, members):
    window = comet._Window(1 << 30)
    window.start(0)
    clients = [f"client-{i}" for i in range(members)]
    window.add([(2, 1, [(client, '{"type":"msg"}') for client in clients])])   # 1 not tailed
    started = time.perf_counter()
    for client in clients:
        if window.read(client, 0, 100) is not None:
            raise SystemExit("a read past the gap was answered")
    refused = time.perf_counter()
    for i in range(1000):
        window.read(f"other-{i}", 0, 100)
    done = time.perf_counter()
    return round((refused - started) * 1000, 2), round((done - refused) * 1000, 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", default="100,1000,10000")
    parser.add_argument("--comet", action="append", help="a directory holding a comet.py")
    args = parser.parse_args()
    for directory in args.comet or [os.path.dirname(HERE)]:
        comet = load(os.path.abspath(directory))
        for members in map(int, args.members.split(",")):
            refused, others = measure(comet, members)
            print(json.dumps({"comet": os.path.abspath(directory), "members": members,
                              "members_reads_ms": refused, "other_1000_reads_ms": others}))


if __name__ == "__main__":
    main()
