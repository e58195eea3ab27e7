"""How long one purge step takes over pushes to a big channel, each stored as
one channel row: the step gives every member that lost one its purge mark.

    python bench/purge_channel.py [--members 2000] [--packages 1000] [--stores sqlite,mysql,postgresql]

For each store (a fresh SQLite file; the local MariaDB and PostgreSQL in a
fresh database ``comet_bench``), it enrols ``--members`` in one channel,
stores ``--packages`` pushes to it older than the cutoff, then times each
purge step until nothing is left, and prints the steps, their seconds and
the marks written.  ``--comet DIR`` times another copy of comet.py.
"""

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=2000)
    parser.add_argument("--packages", type=int, default=1000)
    parser.add_argument("--stores", default="sqlite,mysql,postgresql")
    parser.add_argument("--comet", default=os.path.dirname(HERE))
    args = parser.parse_args()
    sys.path[:0] = [args.comet, HERE]
    import comet
    import run

    for kind in args.stores.split(","):
        if kind == "sqlite":
            url = f"sqlite:///{tempfile.mkdtemp()}/purge.db"
        else:
            getattr(run, f"reset_{kind}")()
            url = {"mysql": run.MYSQL, "postgresql": run.POSTGRESQL}[kind]
        store = comet.open_store(url)
        try:
            members = [f"m{i}" for i in range(args.members)]
            with store.transaction() as tx:
                for client in members:
                    tx.add_member("room", client, '"m"', store.now())
            old = store.now() - 60_000
            for start in range(0, args.packages, 50):     # 50 pushes a commit
                with store.transaction() as tx:
                    for _ in range(min(50, args.packages - start)):
                        tx.member_ids("room")
                        tx.append(comet._new_stamp(), old, '{"type":"note"}',
                                  [(client, None) for client in members], "room")
            steps = []
            for _ in range(100_000):
                started = time.perf_counter()
                more = store.purge(old + 1)
                steps.append(time.perf_counter() - started)
                if not more:
                    break
            marks = store._query("SELECT COUNT(*) FROM comet_purged")[0][0]
            print(json.dumps({"store": kind, "members": args.members, "packages": args.packages,
                              "steps": len(steps), "longest_step_s": round(max(steps), 4),
                              "total_s": round(sum(steps), 4), "marks": marks}))
        finally:
            store.close()


if __name__ == "__main__":
    main()
