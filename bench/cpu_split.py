"""Where the serving process's CPU goes in a throughput cell: per push, in all,
in the kernel, in context switches, and inside the application's own calls.

    python bench/cpu_split.py [--server cheroot] [--apps socketio,comet-memory,comet-sqlite]
                              [--runs 2] [--rooms channel] [--comet DIR]

Each run serves each app (``bench/serve.py --cpu``, every request's call of the
app timed on its thread's CPU clock) and drives the throughput cell of
``bench/run.py`` (100 subscribers, 4 publishers, 5 s).  For 3 s in its middle
it reads the process's user and system CPU, its threads' context switches and
the database servers' CPU (every mariadbd and postgres process: they share the
cores) from /proc, and prints, per push: the process's CPU, the database's, the
voluntary and involuntary switches, and the polls answered; then, over the whole cell, what
a poll's and a push's own call of the app cost on average.  The app's calls
are a fraction of what the process spends: the rest is the WSGI server's own
work for each request and the kernel's, which every app pays per request, so
the packages each answer carries (fewer polls a push) count as much as the
app's own CPU.  Apps alternate within a run, as in bench/run.py.  Under gevent
(``--server gevent``) a call's thread CPU takes in what other green threads ran
while it waited: there only the figures per push and the packages an answer
hold.
"""

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import load  # noqa: E402
import run  # noqa: E402


def process_times(pid):
    """``(user s, system s, voluntary switches, involuntary switches)`` of ``pid``."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    voluntary = involuntary = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as status:
                for line in status:
                    if line.startswith("voluntary_ctxt_switches"):
                        voluntary += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        involuntary += int(line.split()[1])
        except OSError:                     # a thread that ended meanwhile
            pass
    return int(fields[11]) / tick, int(fields[12]) / tick, voluntary, involuntary


def database_cpu():
    """CPU seconds used so far by the database servers' processes (mariadbd,
    postgres: the server and every backend), which share the cores."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as stat:
                name, fields = stat.read().split(" (", 1)[1].rsplit(")", 1)
        except OSError:                     # a process that ended meanwhile
            continue
        if name in ("mariadbd", "mysqld", "postgres"):
            fields = fields.split()
            total += int(fields[11]) + int(fields[12])
    return total / tick


async def cell(target, duration=5.0):
    """The throughput cell, the process read at a fifth and four fifths of it."""
    task = asyncio.ensure_future(load.throughput(target, 100, 4, duration=duration, warmup=0.5))
    await asyncio.sleep(0.5 + duration / 5)
    before, started = process_times(target.pid) + (database_cpu(),), time.monotonic()
    await asyncio.sleep(duration * 3 / 5)
    after, took = process_times(target.pid) + (database_cpu(),), time.monotonic() - started
    result = await task
    return result, [b - a for a, b in zip(before, after)], took


def measure(server, app, stores, env, logdir, duration=5.0):
    name, _ = run.app_args(app)
    path = os.path.join(logdir, f"cpu-{app}.json")
    with run.Server(server, name, stores.url(app), env, logdir, cpu=path) as srv:
        result, (user, system, voluntary, involuntary, database), took = asyncio.run(
            cell(srv.target(), duration))
    with open(path) as calls:
        calls = json.load(calls)
    pushes = result["pushes_per_s"] * took
    polls, poll_s = calls.get("GET", (0, 0.0))
    posts, post_s = calls.get("POST", (1, 0.0))
    return dict(
        server=server, app=app, deliveries_per_s=result["deliveries_per_s"],
        packages_per_answer=result["packages_per_answer"],
        push_p50_ms=result["push_p50_ms"],
        user_pct=round(100 * user / took), system_pct=round(100 * system / took),
        cpu_ms_per_push=round(1000 * (user + system) / pushes, 2),
        database_ms_per_push=round(1000 * database / pushes, 2),
        voluntary_per_push=round(voluntary / pushes), involuntary_per_push=round(involuntary / pushes),
        polls_per_push=round(polls / max(1, posts), 1),
        app_us_per_poll=round(1e6 * poll_s / max(1, polls)),
        app_us_per_push=round(1e6 * post_s / max(1, posts)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="cheroot",
                        choices=["wsgiref", "cheroot", "gthread", "gevent"])
    parser.add_argument("--apps", default="socketio,comet-memory,comet-sqlite,comet-mysql,"
                                          "comet-postgresql")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--rooms", default="channel", choices=["listener", "channel"])
    parser.add_argument("--comet", help="a directory holding the comet.py to serve")
    args = parser.parse_args()
    load.raise_open_files()
    load.ROOMS = args.rooms
    env = dict(run.served_env(args.comet), COMET_BENCH_ROOMS=args.rooms)
    stores = run.Stores()
    try:
        with tempfile.TemporaryDirectory() as logdir:
            for _ in range(args.runs):
                for app in args.apps.split(","):
                    print(json.dumps(measure(args.server, app, stores, env, logdir)), flush=True)
    finally:
        stores.close()
        run.reset_mysql(drop_only=True)
        run.reset_postgresql(drop_only=True)


if __name__ == "__main__":
    main()
