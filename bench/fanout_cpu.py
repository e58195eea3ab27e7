"""What a fan-out round costs the serving process: its CPU in each round of the
fan-out cell, the database servers' CPU, and CPython's full collections.

    python bench/fanout_cpu.py [--server gevent] [--apps floor,comet-memory,comet-mysql]
                               [--n 1000] [--rounds 15] [--gc] [--comet DIR]

Each app is served in turn (``bench/serve.py``, rooms as channels) and driven
by the fan-out cell of ``bench/run.py``: one push to ``--n`` parked polls,
``--rounds`` times.  Around each round (from the push to the last arrival)
it reads the serving process's user and system CPU and the database servers'
(every mariadbd and postgres process) from /proc, in clock ticks of 10 ms, so
a round's figure is coarse and their mean is what to compare.  With ``--gc``
the served process times each of its full collections (``gc.callbacks``,
through a ``sitecustomize`` put on its path) and the report says how many
rounds one fell in and how long they took inside rounds.  The first round
(a new process's polls) is left out of the means.  Prints one JSON line an
app: the cell's median and best round, the push answered, and the means.
"""

import argparse
import asyncio
import glob
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import cpu_split  # noqa: E402
import load  # noqa: E402
import run  # noqa: E402

# Appends "start end" (monotonic: the same clock in every process) of each full
# collection to $COMET_BENCH_GC_LOG.<pid>.
SITECUSTOMIZE = """
import gc, os, time
_log, _started = os.environ.get("COMET_BENCH_GC_LOG"), [0.0]
def _timed(phase, info):
    if phase == "start":
        _started[0] = time.monotonic()
    elif info["generation"] == 2 and _log:
        with open("%s.%d" % (_log, os.getpid()), "a") as out:
            out.write("%.6f %.6f\\n" % (_started[0], time.monotonic()))
gc.callbacks.append(_timed)
"""


def served_env(comet_dir, gc_log):
    env = dict(run.served_env(comet_dir), COMET_BENCH_ROOMS="channel")
    if gc_log:
        site = os.path.dirname(gc_log)
        with open(os.path.join(site, "sitecustomize.py"), "w") as file:
            file.write(SITECUSTOMIZE)
        env["PYTHONPATH"] += os.pathsep + site
        env["COMET_BENCH_GC_LOG"] = gc_log
    return env


def overlap(spans, start, end):
    """Seconds of ``spans`` (start, end) inside [start, end]."""
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in spans)


def measure(server, app, stores, env, n=1000, rounds=15):
    """One app's cell: the cell's result and, a round, (start, end, server CPU s, database CPU s)."""
    name, _ = run.app_args(app)
    load.ROOMS = "channel"
    timed = []
    push_round = load.push_round

    async def round_timed(members, seq, n, limit, push):
        own, database = cpu_split.process_times(target.pid), cpu_split.database_cpu()
        started = time.monotonic()
        answered = await push_round(members, seq, n, limit, push)
        ended = time.monotonic()
        own_after, database_after = cpu_split.process_times(target.pid), cpu_split.database_cpu()
        timed.append((started, ended,                      # clock ticks: whole 10 ms
                      round(own_after[0] + own_after[1] - own[0] - own[1], 6),
                      round(database_after - database, 6)))
        return answered

    with run.Server(server, name, stores.url(app), env) as served:
        target = served.target()
        load.push_round = round_timed
        try:
            result = asyncio.run(load.fanout(target, n, rounds=rounds))
        finally:
            load.push_round = push_round
    return result, timed, served.pid


def summary(app, result, timed, collections):
    later = timed[1:] or timed
    line = {"app": app, "all_ms": result.get("all_ms"), "best_ms": result.get("best_ms"),
            "answered_ms": round(statistics.median(result["answered_ms_rounds"]), 2)
            if result.get("answered_ms_rounds") else None,
            "cpu_ms_a_round": round(1000 * statistics.mean(t[2] for t in later), 1),
            "database_ms_a_round": round(1000 * statistics.mean(t[3] for t in later), 1)}
    if "failed" in result:
        line["failed"] = result["failed"]
    if collections is not None:
        inside = [overlap(collections, start, end) for start, end, _, _ in later]
        line.update(full_collections=len(collections),
                    rounds_with_one=sum(1 for seconds in inside if seconds > 0),
                    rounds=len(later),
                    collection_ms_a_round=round(1000 * statistics.mean(inside), 1))
    return line


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="gevent", choices=["wsgiref", "cheroot", "gevent",
                                                               "gthread"])
    parser.add_argument("--apps", default="floor,comet-memory,comet-mysql,comet-postgresql")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--gc", action="store_true", help="time the served process's full collections")
    parser.add_argument("--comet", help="a directory holding the comet.py to serve")
    args = parser.parse_args()
    load.raise_open_files()
    workdir = tempfile.mkdtemp(prefix="comet-fanout-cpu-")
    gc_log = os.path.join(workdir, "gc") if args.gc else None
    env = served_env(args.comet, gc_log)
    stores = run.Stores()
    try:
        for app in args.apps.split(","):
            result, timed, pid = measure(args.server, app, stores, env, args.n, args.rounds)
            collections = None
            if gc_log:
                collections = [tuple(map(float, line.split()))
                               for path in glob.glob(f"{gc_log}.{pid}") for line in open(path)]
            print(json.dumps(summary(app, result, timed, collections)), flush=True)
    finally:
        stores.close()


if __name__ == "__main__":
    main()
