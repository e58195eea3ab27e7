"""Profile comet.py's push and poll paths under one workload of the benchmark.

    python bench/profile_comet.py --store sqlite --workload fanout [--server cheroot] [--n 1000]
    python bench/profile_comet.py --store memory --workload throughput --publishers 4

The server runs every request under cProfile with a per-thread CPU clock
(``time.thread_time``), so time spent parked does not count, only the CPU
each request burns.  Prints the functions by own time and by cumulative
time; ``--out FILE`` keeps the pstats file.  Use a threaded server (cheroot,
gthread, wsgiref): under gevent a greenlet's clock is the whole thread's.
"""

import argparse
import asyncio
import io
import os
import pstats
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import load  # noqa: E402
import run  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="cheroot", choices=["wsgiref", "cheroot", "gthread"])
    parser.add_argument("--store", default="memory",
                        choices=["memory", "sqlite", "mysql", "postgresql"])
    parser.add_argument("--workload", default="fanout", choices=["fanout", "throughput", "push_latency"])
    parser.add_argument("--n", type=int, default=1000, help="parked polls (fan-out) or subscribers")
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--rooms", default="channel", choices=["listener", "channel"],
                        help="what a room is to comet.py, as bench/run.py's --rooms")
    parser.add_argument("--comet", help="a directory holding the comet.py to serve")
    parser.add_argument("--top", type=int, default=35)
    parser.add_argument("--out", help="keep the pstats file here")
    args = parser.parse_args()
    load.raise_open_files()

    env = dict(run.served_env(args.comet), COMET_BENCH_ROOMS=args.rooms)
    load.ROOMS = args.rooms
    stores = run.Stores()
    path = args.out or os.path.join(tempfile.mkdtemp(prefix="comet-profile-"), "comet.pstats")
    try:
        server = run.Server(args.server, "comet", stores.url("comet-" + args.store), env,
                            profile=path)
        with server:
            target = server.target()
            if args.workload == "fanout":
                result = asyncio.run(load.fanout(target, args.n, rounds=args.rounds))
            elif args.workload == "throughput":
                result = asyncio.run(load.throughput(target, args.n, args.publishers,
                                                     duration=args.duration))
            else:
                result = asyncio.run(load.push_latency(target, count=500))
        print(load_brief(result))
    finally:
        stores.close()
        if args.store == "mysql":
            run.reset_mysql(drop_only=True)
        if args.store == "postgresql":
            run.reset_postgresql(drop_only=True)
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(path, stream=text).strip_dirs().sort_stats(order).print_stats(args.top)
        print(f"===== by {order} =====")
        print(text.getvalue().split("\n", 6)[-1] if "function calls" in text.getvalue() else text.getvalue())
    print("pstats file:", path)


def load_brief(result):
    import report
    return report.brief(result)


if __name__ == "__main__":
    main()
