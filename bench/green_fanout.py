"""A fan-out under gevent, in process: the app's own part of waking N parked polls.

    python bench/green_fanout.py [--store floor|memory|sqlite|mysql|postgresql] [--n 1000]
                                 [--rounds 25] [--tail-interval 0.1] [--gap] [--comet DIR]

Under gevent's monkey patching, N green threads each call the bench's app (as
a WSGI server would, no socket) with a poll parked in it; one push; the time
until every poll has been answered.  No server, no client processes: what is
timed is the app's work to wake and answer N polls, which the served fan-out
cell adds the server's and the kernel's to.  Prints the median and the best
round (the first two rounds warm up and are left out), and the median time
until the push was answered (its polls are woken after that).

``--gap`` (a durable store): before each push a second app on the same store,
as another process would, commits a package to someone else, which the first
has not tailed yet when its push commits: the push waits past that gap in its
window.  Prints the store reads a round made as well.
"""

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="memory",
                        choices=["floor", "memory", "sqlite", "mysql", "postgresql"])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--tail-interval", type=float, default=0.1)
    parser.add_argument("--gap", action="store_true",
                        help="another process's commit, not tailed yet, before each push")
    parser.add_argument("--comet", help="a directory holding the comet.py to time")
    args = parser.parse_args()

    from gevent import monkey
    monkey.patch_all()
    import gevent
    import gevent.event
    sys.path[:0] = [os.path.abspath(args.comet or os.path.dirname(HERE)), HERE]
    import apps
    import run

    if args.store == "floor":
        app = apps.Floor(poll_timeout=600)
    else:
        url = run.store_url(args.store)
        if args.store in ("mysql", "postgresql"):
            getattr(run, f"reset_{args.store}")()
        app = apps.comet_app(url, tail_interval=args.tail_interval, poll_timeout=600,
                             rooms_are="channel")[0]
        if args.gap:                        # another process on the same store
            import comet
            other = comet.Comet(None, store=url, tail_interval=3600)
            reads = [0]
            read = app.store.read

            def counted(*a):
                reads[0] += 1
                return read(*a)
            app.store.read = counted

    respond, cursor = apps.direct(app), apps.cursor_of

    def parked():
        return app.parked if args.store == "floor" else app._parking.count

    clients = [f"sub-{i}" for i in range(args.n)]
    cursors = {client: cursor(respond("GET", client)) for client in clients + ["pub"]}
    body = json.dumps({"type": "msg", "listeners": ["channel:r"], "room": "r",
                       "text": "hello"}).encode()
    times, pushes, round_reads, errors = [], [], [], []
    for _ in range(args.rounds + 2):
        answered, everyone = [0], gevent.event.Event()

        def poll(client):
            answer = respond("GET", client, "cursor=" + cursors[client])
            if b'"cursor":"' in answer:
                cursors[client] = cursor(answer)
            else:                           # an error (a 503, say): counted, its text kept
                errors.append(answer[:200].decode(errors="replace"))
            answered[0] += 1
            if answered[0] == args.n:
                everyone.set()

        polls = [gevent.spawn(poll, client) for client in clients]
        deadline = time.monotonic() + 60
        while parked() < args.n and time.monotonic() < deadline:
            gevent.sleep(0.001)
        if args.gap:
            other.push({"type": "elsewhere", "listeners": "nobody"})
            reads[0] = 0
        started = time.perf_counter()
        respond("POST", "pub", body=body)
        pushes.append((time.perf_counter() - started) * 1000)
        if not everyone.wait(60):
            sys.exit(f"{answered[0]} of {args.n} polls answered in 60 s")
        times.append((time.perf_counter() - started) * 1000)
        gevent.joinall(polls)
        if args.gap:
            round_reads.append(reads[0])
    times, pushes = times[2:], pushes[2:]
    print(json.dumps({"store": args.store, "n": args.n, "rounds": len(times),
                      "median_ms": round(statistics.median(times), 2),
                      "best_ms": round(min(times), 2),
                      "push_answered_ms": round(statistics.median(pushes), 2),
                      "errors": len(errors), **({"first_error": errors[0]} if errors else {}),
                      **({"store_reads_a_round": statistics.median(round_reads[2:])}
                         if args.gap else {})}))
    os._exit(0)                             # no teardown: the store's threads are daemons


if __name__ == "__main__":
    main()
