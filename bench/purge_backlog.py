"""Purge a backlog while pushing: how long does a push wait behind the purge?

    python bench/purge_backlog.py [--store sqlite|mysql] [--rows 600000] [--recipients 200]
                                  [--comet DIR]

Builds a backlog of ``--rows`` delivery rows (packages of ``--recipients``
recipients each, stored an hour ago, inserted straight into the tables), then
opens a ``Comet`` on the store with ``retention=60`` and pushes one package
every 5 ms from one thread, each timed from the call to ``comet.push`` until
it returns (committed), while the housekeeping thread purges the backlog.  It
also times the gaps between the tail's turns (``tail_interval`` 0.1 s).  It
stops when the backlog is gone (or after ``--limit`` seconds) and prints one
JSON line: the purge's duration, the pushes, their latency (p50, p99, max) and
the longest gap between two tail turns.  ``--rows 0 --seconds S`` is the same
pushing for S seconds with nothing to purge: the baseline.  ``--comet DIR`` measures the comet.py
in DIR instead (an older one, to compare).  MariaDB: 127.0.0.1:3306 as root,
a database ``comet_bench_purge`` created and dropped.
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MYSQL = "mysql://root@127.0.0.1:3306/comet_bench_purge"


def backlog(store, rows, recipients, ts):
    """``rows`` delivery rows, ``recipients`` to a package, stored at ``ts``, by plain SQL."""
    packages = rows // recipients
    if not packages:
        return 0
    body = '{"type":"message","listeners":["room"],"text":"' + "x" * 100 + '"}'
    with store._connection() as conn:
        cur = conn.cursor()
        head = store._execute(cur, "SELECT head FROM comet_meta").fetchone()[0]
        for start in range(0, packages, 50):
            positions = range(head + start + 1, head + min(start + 50, packages) + 1)
            store._insert(cur, "INSERT INTO comet_packages (pos, stamp, ts, body) VALUES",
                          [(p, f"backlog{p:012d}", ts, body) for p in positions])
            store._insert(cur, "INSERT INTO comet_deliveries (recipient, pos, body) VALUES",
                          [(f"member{r:04d}", p, None) for p in positions for r in range(recipients)])
        store._execute(cur, "UPDATE comet_meta SET head = ?", (head + packages,))
        conn.commit()
    return head + packages


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] if values else None


def run(comet, url, rows, recipients, limit, seconds):
    store = comet.open_store(url)
    started = time.monotonic()
    last = backlog(store, rows, recipients, int(time.time() * 1000) - 3_600_000)
    built = time.monotonic() - started
    app = comet.Comet(None, store=store, retention=60, tail_interval=0.1)

    @app.listener("to")
    def to(environ, package, db):
        return package["to"]

    tails = []
    real_tail = app._tail

    def timed_tail():
        tails.append(time.monotonic())
        return real_tail()
    app._tail = timed_tail

    # Each write step of the purge, timed from its transaction's start to its commit:
    # the longest a push can wait behind the purge.
    steps = []
    real_transaction = store.transaction

    @contextlib.contextmanager
    def timed_transaction(alone=False):
        started = time.perf_counter()
        with real_transaction(alone) as tx:
            yield tx
        if alone:
            steps.append((started, time.perf_counter()))
    store.transaction = timed_transaction

    def left():
        return store._query("SELECT COUNT(*) FROM comet_deliveries WHERE pos <= ?", (last,))[0][0]

    latencies, pushed, done = [], [], threading.Event()

    def pushing():
        while not done.is_set():
            sent = time.perf_counter()
            app.push({"type": "note", "listeners": ["to"], "to": ["bob"]})
            latencies.append(time.perf_counter() - sent)
            pushed.append((sent, time.perf_counter()))
            done.wait(0.005)
    pusher = threading.Thread(target=pushing)
    purge_started = time.monotonic()
    pusher.start()
    deadline = purge_started + limit
    remaining = rows
    while remaining and time.monotonic() < deadline:
        time.sleep(0.2)
        remaining = left()
    purged_in = time.monotonic() - purge_started
    while time.monotonic() < purge_started + seconds:
        time.sleep(0.2)
    done.set()
    pusher.join(30)
    during = [t for t in tails if t <= purge_started + max(purged_in, seconds)]
    gaps = [b - a for a, b in zip(during, during[1:])]
    app.close()
    slow = [(a, b) for a, b in pushed if b - a > 0.1]
    behind = [(a, b) for a, b in slow if any(s < b and e > a for s, e in steps)]
    return dict(store=url.split(":")[0], rows=rows, recipients=recipients,
                backlog_built_s=round(built, 1), purged_s=round(purged_in, 2),
                left=remaining, pushes=len(latencies),
                push_ms_p50=round(percentile(latencies, 0.5) * 1000, 1),
                push_ms_p99=round(percentile(latencies, 0.99) * 1000, 1),
                push_ms_max=round(max(latencies) * 1000, 1),
                purge_steps=len(steps),
                purge_step_ms_max=round(max((e - s for s, e in steps), default=0) * 1000, 1),
                pushes_over_100ms=len(slow), of_them_during_a_purge_step=len(behind),
                tail_turns=len(during),
                tail_gap_ms_max=round(max(gaps) * 1000, 1) if gaps else None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", choices=["sqlite", "mysql"], default="sqlite")
    parser.add_argument("--rows", type=int, default=600_000)
    parser.add_argument("--recipients", type=int, default=200)
    parser.add_argument("--limit", type=float, default=300, help="seconds, at most")
    parser.add_argument("--seconds", type=float, default=0, help="seconds of pushing, at least")
    parser.add_argument("--step", type=int, help="rows a purge step deletes (comet._PURGE_ROWS)")
    parser.add_argument("--comet", default=os.path.dirname(HERE), help="the directory of comet.py")
    args = parser.parse_args()
    sys.path.insert(0, args.comet)
    import comet
    if args.step:
        comet._PURGE_ROWS = args.step
    with tempfile.TemporaryDirectory() as tmp:
        if args.store == "sqlite":
            url = f"sqlite:///{tmp}/backlog.db"
        else:
            import pymysql
            server = pymysql.connect(host="127.0.0.1", user="root", autocommit=True)
            with server.cursor() as cur:
                cur.execute("DROP DATABASE IF EXISTS comet_bench_purge")
                cur.execute("CREATE DATABASE comet_bench_purge CHARACTER SET utf8mb4")
            url = MYSQL
        try:
            result = run(comet, url, args.rows, args.recipients, args.limit, args.seconds)
        finally:
            if args.store == "mysql":
                with contextlib.closing(server), server.cursor() as cur:
                    cur.execute("DROP DATABASE IF EXISTS comet_bench_purge")
    result["load_average"] = round(os.getloadavg()[0], 1)     # the machine's, at the end
    result["comet"] = os.path.abspath(os.path.join(args.comet, "comet.py"))
    result["step"] = getattr(comet, "_PURGE_ROWS", None)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
