"""How long one push takes while other threads keep the GIL busy, in process.

    python bench/push_under_load.py [--busy 8] [--pushes 150] [--stores memory,sqlite]
        [--comet DIR]

A push to 100 recipients (``Comet.push``, a listener returning them) on each of
``--stores``: ``memory:``, a fresh SQLite file, and the local MySQL
(``mysql://root@127.0.0.1:3306/test``) and PostgreSQL
(``postgresql://postgres@127.0.0.1:5432/test``), whose comet tables it drops
first; each first alone, then beside ``--busy``
threads that each run Python (``json.dumps``) and write a byte to /dev/null
now and then, as threads answering polls run Python and write to sockets.  It
prints the median and mean time of a push.

What it shows: a push that lets go of the GIL (Python's ``sqlite3`` steps and
resets each statement with the GIL released, the MySQL and PostgreSQL drivers
let it go at each socket call; the stores hold it for a push's own
statements on threaded servers) waits, each time it wants the GIL back, for
the busy threads to give it up (at their next write, or when the switch
interval, 5 ms, forces them).  A push on ``memory:`` lets go nowhere and is
done within one turn.  In the throughput cells this wait, not the CPU a push
costs, bounds a durable store: each publisher has one push in flight, so
pushes/s is the publishers over a push's round trip.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


STORES = {"memory": "memory:", "sqlite": "sqlite:///{scratch}/{busy}.db",
          "mysql": "mysql://root@127.0.0.1:3306/test",
          "postgresql": "postgresql://postgres@127.0.0.1:5432/test"}


def fresh(comet, url):
    """Drops the comet tables of a server store, so each measurement starts empty."""
    store = comet.open_store(url)
    with contextlib.closing(store._connect()) as conn:
        cur = conn.cursor()
        for table in ("meta", "packages", "deliveries", "purged", "purge_log", "members",
                      "clients", "spans", "purge", "claims"):
            cur.execute(f"DROP TABLE IF EXISTS comet_{table}")
        conn.commit()
    store.close()


def push_times(comet, store, busy, pushes):
    app = comet.Comet(None, store=store, rate=(1e6, 1e6))
    recipients = [f"c{i}" for i in range(100)]

    @app.listener("room")
    def room(environ, package, db):
        return recipients

    # One push first, untimed and alone: it starts the app's housekeeping threads, whose
    # first reads may hold the pool's one connection while it runs, and then it opens
    # another; opened beside the busy threads, that connect would be timed (or time out).
    app.push({"type": "room", "listeners": ["room"], "n": -1})
    stop = threading.Event()
    sink = os.open(os.devnull, os.O_WRONLY)

    def spin():
        work = {"a": list(range(50)), "b": "x" * 100}
        while not stop.is_set():
            for _ in range(20):
                json.dumps(work)
            os.write(sink, b"x")            # lets go of the GIL, as a socket write does

    threads = [threading.Thread(target=spin, daemon=True) for _ in range(busy)]
    for thread in threads:
        thread.start()
    times = []
    try:
        for n in range(pushes):
            start = time.perf_counter()
            app.push({"type": "room", "listeners": ["room"], "n": n})
            times.append((time.perf_counter() - start) * 1000)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        os.close(sink)
        app.close()
    return statistics.median(times), statistics.mean(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--busy", type=int, default=8, help="busy threads beside the pusher")
    parser.add_argument("--pushes", type=int, default=150)
    parser.add_argument("--stores", default="memory,sqlite",
                        help="of memory, sqlite, mysql, postgresql (the local test servers)")
    parser.add_argument("--comet", default=os.path.dirname(HERE),
                        help="a directory holding the comet.py to measure")
    args = parser.parse_args()
    sys.path.insert(0, args.comet)
    import comet
    print(f"comet.py: {comet.__file__}; {args.pushes} pushes to 100 recipients each")
    with tempfile.TemporaryDirectory() as scratch:
        for busy in (0, args.busy):
            for name in args.stores.split(","):
                store = STORES[name].format(scratch=scratch, busy=busy)
                if name in ("mysql", "postgresql"):
                    fresh(comet, store)
                median, mean = push_times(comet, store, busy, args.pushes)
                print(f"{busy:2d} busy threads  {name:7s} push: median {median:7.2f} ms,"
                      f" mean {mean:7.2f} ms", flush=True)


if __name__ == "__main__":
    main()
