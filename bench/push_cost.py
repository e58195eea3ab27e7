"""What a push to a channel costs, in process: the pushing thread's CPU, its
time, and the machine's CPU (the database server's included), for one or more
copies of comet.py, interleaved.

    python bench/push_cost.py [--store postgresql] [--pushes 2000] [--runs 4] [--comet DIR ...]

Each run is a process of its own: the bench's comet app (``apps.comet_app``,
rooms as channels) on a fresh database (SQLite: a new file; MySQL and
PostgreSQL: the local servers' ``comet_bench``), 100 clients joined to one
channel by a poll each, 50 pushes to warm it, then ``--pushes`` pushes to the
channel, each called as a WSGI server would (``apps.direct``), with no HTTP.
It prints, a push: the thread's CPU (``time.thread_time``), the time it took,
and the whole machine's CPU from /proc/stat (every process: the database
server works on the same cores).  Runs alternate between the copies.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def machine_cpu():
    """Seconds the machine's cores have been busy (not idle, not waiting for I/O)."""
    with open("/proc/stat") as stat:
        ticks = [int(value) for value in stat.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def measure(comet_dir, store, pushes):
    """One run, in this process: ``{thread_ms, wall_ms, machine_ms}`` a push."""
    sys.path[:0] = [comet_dir, HERE]
    import apps
    import run
    url = run.store_url(store)
    reset = {"mysql": run.reset_mysql, "postgresql": run.reset_postgresql}.get(store)
    if reset:
        reset()
    app = apps.comet_app(url, tail_interval=3.0, poll_timeout=5, rooms_are="channel")[0]
    try:
        respond = apps.direct(app)
        for i in range(100):
            respond("GET", f"member{i}")        # each joins the channel at its first poll
        body = json.dumps({"type": "msg", "listeners": ["channel:r"], "room": "r",
                           "text": "hello, room"}).encode()
        for _ in range(50):
            respond("POST", "publisher", body=body)
        thread, wall, machine = time.thread_time(), time.perf_counter(), machine_cpu()
        for _ in range(pushes):
            answer = respond("POST", "publisher", body=body)
        thread, wall, machine = (time.thread_time() - thread, time.perf_counter() - wall,
                                 machine_cpu() - machine)
        if b'"accepted"' not in answer or b'"error"' in answer:
            raise SystemExit(f"a push failed: {answer[:200]!r}")
    finally:
        app.close()
        if reset:
            reset(drop_only=True)
    return {name: round(1000 * value / pushes, 3) for name, value in
            (("thread_ms", thread), ("wall_ms", wall), ("machine_ms", machine))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="postgresql",
                        choices=["memory", "sqlite", "mysql", "postgresql"])
    parser.add_argument("--pushes", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--comet", action="append",
                        help="a directory holding a comet.py (several to compare)")
    parser.add_argument("--one", help=argparse.SUPPRESS)     # a run, in a child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.store, args.pushes)))
        return
    copies = args.comet or [os.path.dirname(HERE)]
    for run in range(1, args.runs + 1):
        for comet_dir in copies:
            out = subprocess.run([sys.executable, __file__, "--one", os.path.abspath(comet_dir),
                                  "--store", args.store, "--pushes", str(args.pushes)],
                                 capture_output=True, text=True, check=True).stdout
            print(json.dumps({"run": run, "comet": comet_dir, "store": args.store,
                              **json.loads(out.splitlines()[-1])}), flush=True)


if __name__ == "__main__":
    main()
