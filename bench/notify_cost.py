"""What NOTIFY costs the pushes of a PostgreSQL store: several writer processes
pushing back to back into one database, with NOTIFY and without, in
alternating rounds.

    python bench/notify_cost.py [--writers 4] [--threads 4] [--rounds 6] [--seconds 3] [--parked]

Each writer is a process of its own with a ``Comet`` on the store
(``PostgreSQLStore(url, notify=True or False)``) whose threads call
``comet.push`` back to back: no HTTP, so what is measured is the part of a
push that NOTIFY changes (hooks, the transaction, the commit), group commit
included.  With NOTIFY each process also LISTENs, as a deployment does, and
with ``--parked`` holds a parked poll (of a client nobody writes to), so that
every notification of another process's commit makes it tail, as a web
process with open pages does (without one it leaves that to its next tail).
Rounds alternate (with, without, without, with, ...), so that a busy minute
of the machine hurts both alike; the database ``comet_notify_cost`` on 127.0.0.1:5432 (user
postgres) is made for the run and dropped after it.
"""

import argparse
import multiprocessing
import os
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
URL = "postgresql://postgres@127.0.0.1:5432/comet_notify_cost"
ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def writer(notify, parked, threads, start, seconds, results):
    """One process: ``threads`` threads pushing until ``seconds`` after ``start``."""
    sys.path.insert(0, os.path.dirname(HERE))
    import comet
    app = comet.Comet(None, store=comet.PostgreSQLStore(URL, notify=notify))
    app.push({"type": "warm", "listeners": "nobody"})      # connections open, LISTEN on
    if parked:
        app._parking.park("nobody", "127.0.0.1", 0)     # what a poll parks, without its HTTP
    counts = [0] * threads

    def push(index):
        while time.time() < start:
            time.sleep(0.001)
        end = start + seconds
        while time.time() < end:
            app.push({"type": "m", "listeners": "bob", "text": "x" * 40})
            counts[index] += 1
    workers = [threading.Thread(target=push, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    app.close()
    results.put(sum(counts))


def round_(notify, parked, writers, threads, seconds):
    """Pushes a second, all writers together, in one round."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start = time.time() + 2.0                               # every process ready by then
    processes = [context.Process(target=writer,
                                 args=(notify, parked, threads, start, seconds, results))
                 for _ in range(writers)]
    for process in processes:
        process.start()
    total = sum(results.get(timeout=seconds + 60) for _ in processes)
    for process in processes:
        process.join(30)
    return total / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=4, help="processes")
    parser.add_argument("--threads", type=int, default=4, help="pushing threads a process")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of each, alternating")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--parked", action="store_true", help="a parked poll in every process")
    args = parser.parse_args()
    import psycopg
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS comet_notify_cost WITH (FORCE)")
        admin.execute("CREATE DATABASE comet_notify_cost")
    rates = {True: [], False: []}
    try:
        for index in range(2 * args.rounds):
            notify = index % 4 in (0, 3)    # with, without, without, with, ...
            rate = round_(notify, args.parked, args.writers, args.threads, args.seconds)
            rates[notify].append(rate)
            print(f"round {index + 1:2}: {'with' if notify else 'without'} NOTIFY"
                  f" {rate:7.0f} pushes/s", flush=True)
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as admin:
            admin.execute("DROP DATABASE IF EXISTS comet_notify_cost WITH (FORCE)")
    with_, without = statistics.median(rates[True]), statistics.median(rates[False])
    print(f"{args.writers} processes x {args.threads} threads"
          f"{', a poll parked in each' if args.parked else ''}, {args.rounds} rounds of"
          f" {args.seconds:g} s each: with NOTIFY {with_:.0f} pushes/s (median;"
          f" {min(rates[True]):.0f}-{max(rates[True]):.0f}), without {without:.0f}"
          f" ({min(rates[False]):.0f}-{max(rates[False]):.0f}): {with_ / without:.2f}x")


if __name__ == "__main__":
    main()
