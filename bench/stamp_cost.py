"""What a client stamp costs a push, in process: the browser client stamps every
push (so that one sent again is stored once), the throughput cells' pushes
carry none.

    python bench/stamp_cost.py [--pushes 300] [--rounds 3] [--stores sqlite,mysql,postgresql]
        [--comet DIR]

On each store (a fresh SQLite file; the local MySQL and PostgreSQL in their
``test`` database, whose comet tables it drops first), ``Comet.push`` of
packages to one client, in batches of ``--pushes``: a batch without stamps,
then a batch with a fresh stamp on each, ``--rounds`` times.  It prints each
batch's median push time.  A stamp is claimed before the push's hooks run (a
round trip of its own on MySQL and PostgreSQL), so that a push sent again while
the first is under way waits for it and is answered accepted without running
them twice.
"""

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from push_under_load import STORES, fresh  # noqa: E402


def batch_times(app, pushes, stamped):
    """The median time of ``pushes`` pushes to one client, in ms."""
    tag = secrets.token_hex(6)
    times = []
    for n in range(pushes):
        package = {"type": "note", "listeners": ["to"], "n": n}
        if stamped:
            package["_stamp"] = f"{tag}-{n:06d}"
        start = time.perf_counter()
        app.push(package)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure(comet, store, pushes, rounds):
    """``{"plain": [ms, ...], "stamped": [ms, ...]}``, a median per batch."""
    app = comet.Comet(None, store=store, rate=(1e6, 1e6))

    @app.listener("to")
    def to(environ, package, db):
        return ["bob"]

    app.push({"type": "note", "listeners": ["to"], "n": -1})   # housekeeping started, untimed
    medians = {"plain": [], "stamped": []}
    try:
        for _ in range(rounds):
            for way in medians:
                medians[way].append(batch_times(app, pushes, way == "stamped"))
    finally:
        app.close()
    return medians


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pushes", type=int, default=300, help="pushes a batch")
    parser.add_argument("--rounds", type=int, default=3, help="batches of each kind")
    parser.add_argument("--stores", default="sqlite,mysql,postgresql",
                        help="of memory, sqlite, mysql, postgresql (the local test servers)")
    parser.add_argument("--comet", default=os.path.dirname(HERE),
                        help="a directory holding the comet.py to measure")
    args = parser.parse_args()
    sys.path.insert(0, args.comet)
    import comet
    print(f"comet.py: {comet.__file__}; median push to one client, ms, by batch of"
          f" {args.pushes}")
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.stores.split(","):
            store = STORES[name].format(scratch=scratch, busy="stamps")
            if name in ("mysql", "postgresql"):
                fresh(comet, store)
            medians = measure(comet, store, args.pushes, args.rounds)
            print(f"{name:10s} without a stamp: "
                  + " / ".join(f"{ms:.2f}" for ms in medians["plain"])
                  + "; with one: " + " / ".join(f"{ms:.2f}" for ms in medians["stamped"]),
                  flush=True)


if __name__ == "__main__":
    main()
