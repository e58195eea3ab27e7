"""Instructions per push and per poll answer, counted by valgrind: an A/B that
the machine's other work does not move.

    python bench/instructions.py [--store memory|sqlite|mysql|postgresql] [--subscribers 100]
                                 [--rounds 10] [--rooms listener|channel] [--comet DIR ...]
    python bench/instructions.py --green [--store memory|sqlite|floor] [--publishers 4] ...

For each comet.py (``--comet DIR``, several to compare; the repository's by
default) it runs one Python process under ``valgrind --tool=callgrind`` three
times: a fixed set-up alone, then ``--rounds`` rounds of one push to a room of
``--subscribers`` (the bench's comet app, called as a WSGI server would), then
the same rounds with every subscriber's poll answered after each push.  The
differences, divided by the rounds, are the instructions of one push and of
one poll answer (``PYTHONHASHSEED=0``; repeated runs agree within 1 %).
``--rooms channel``: the room is a channel its clients joined (see
``apps.comet_app``), not the listener ``room``.
On MySQL and PostgreSQL (the local servers, a fresh database ``comet_bench``
for each count) these are the Python process's instructions, the driver's
included; the database server's own work is not counted.

``--green`` counts what the gevent throughput cell spends instead: under
gevent's monkey patching, every subscriber a green thread with its poll
parked; a round is ``--publishers`` pushes to a channel of them all, sent
together, then every poll answered (with all of them) and parked again.  The
figure is the instructions of one poll answer with its share of the pushes,
parking and wake-up included; ``--store floor`` counts the floor's (the
bench's ideal long poll), the same way.  No background thread runs inside
the count (no tail, sweep or purge), so repeated runs agree to a few
hundred instructions.
Needs valgrind (Debian's package).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def work(comet_dir, store, rounds, subscribers, polls, green=False, publishers=4):
    """The counted process: set-up, then ``rounds`` pushes (and their polls)."""
    if green:
        from gevent import monkey
        monkey.patch_all()
    sys.path[:0] = [comet_dir, HERE]
    import apps
    import run
    if store == "floor":
        app = apps.Floor(poll_timeout=600)
    else:
        url = run.store_url(store)
        app = apps.comet_app(url, tail_interval=3000.0 if green else 3.0,
                             poll_timeout=600 if green else 5)[0]
        app.presence_timeout = 1e6          # no presence sweep during the count
        if green:
            app._housekeeping = lambda stop: None   # nor a purge

    respond = apps.direct(app)

    def call(method, client, query="", body=b""):
        return json.loads(respond(method, client, query, body))

    if green:
        return green_rounds(app, respond, rounds, subscribers, publishers)
    listeners = ["channel:r"] if os.environ.get("COMET_BENCH_ROOMS") == "channel" else ["room"]

    def push(seq):
        call("POST", "publisher", body=json.dumps(
            {"type": "msg", "listeners": listeners, "room": "r", "seq": seq, "text": "hello, room"}).encode())

    subs = [f"sub-{i}" for i in range(subscribers)]
    cursors = {sub: call("GET", sub)["cursor"] for sub in subs}
    deadline = time.monotonic() + 120       # polls answered from the window, as in a server
    while app._window is not None and app._window.horizon is None and time.monotonic() < deadline:
        time.sleep(0.05)
    for seq in range(-1, rounds):           # the first round warms up, and is in every run
        push(seq)
        if polls or seq < 0:
            for sub in subs:
                cursors[sub] = call("GET", sub, "cursor=" + cursors[sub])["cursor"]
    os._exit(0)                             # no teardown in the count


def green_rounds(app, respond, rounds, subscribers, publishers):
    """``--green``: the rounds of parked polls and pushes sent together.  An answer's
    cursor is cut out of it, not parsed: what is counted is the app's work."""
    import apps
    import gevent
    import gevent.event
    floor = not hasattr(app, "_parking")
    subs = [f"sub-{i}" for i in range(subscribers)]
    pubs = [f"pub-{i}" for i in range(publishers)]

    cursor = apps.cursor_of
    cursors = {client: cursor(respond("GET", client)) for client in subs + pubs}
    if not floor and app._window is not None:
        app._tail()                         # the window starts now; no tail runs later
    answered = [0]
    everyone, all_parked = gevent.event.Event(), gevent.event.Event()
    if not floor:                       # comet's polls tell when the last parks again: a spin
        park = app._parking.park        # while a store's round trip is out would be counted

        def park_and_tell(*args):       # the last to park again once every poll is answered
            waiter = park(*args)
            if app._parking.count == subscribers and answered[0] in (0, subscribers):
                all_parked.set()
            return waiter
        app._parking.park = park_and_tell

    def subscriber(client):
        after = cursors[client]
        while True:
            after = cursor(respond("GET", client, "cursor=" + after))
            answered[0] += 1
            if answered[0] == subscribers:
                everyone.set()

    def until_parked():
        if floor:                       # the floor never waits on I/O: a spin ends
            while app.parked < subscribers:
                gevent.sleep(0)
        else:
            all_parked.wait()
            all_parked.clear()

    for client in subs:
        gevent.spawn(subscriber, client)
    until_parked()
    bodies = [json.dumps({"type": "msg", "listeners": ["channel:r"], "room": "r", "seq": i,
                          "text": "hello, room"}).encode() for i in range(publishers)]
    for _ in range(-1, rounds):             # the first round warms up, and is in every run
        answered[0] = 0
        everyone.clear()
        gevent.joinall([gevent.spawn(respond, "POST", pub, "", body)
                        for pub, body in zip(pubs, bodies)])
        everyone.wait()
        until_parked()
    os._exit(0)


def count(comet_dir, store, rounds, subscribers, polls, rooms="listener", green=False,
          publishers=4):
    sys.path.insert(0, HERE)
    import run
    if store in ("mysql", "postgresql"):
        getattr(run, f"reset_{store}")()
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out", sys.executable,
             __file__, "--work", comet_dir, store, str(rounds), str(subscribers), str(int(polls)),
             str(int(green)), str(publishers)],
            env={**os.environ, "PYTHONHASHSEED": "0", "COMET_BENCH_ROOMS": rooms},
            capture_output=True, text=True)
    return int(re.search(r"Collected : (\d+)", run.stderr)[1])


def main():
    if sys.argv[1:2] == ["--work"]:
        comet_dir, store, rounds, subscribers, polls, green, publishers = sys.argv[2:]
        return work(comet_dir, store, int(rounds), int(subscribers), polls == "1",
                    green == "1", int(publishers))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["memory", "sqlite", "mysql", "postgresql", "floor"],
                        default="memory", help="floor: the ideal long poll (--green only)")
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--rooms", choices=["listener", "channel"], default="listener")
    parser.add_argument("--comet", action="append", help="a directory holding a comet.py")
    parser.add_argument("--green", action="store_true",
                        help="parked polls under gevent, pushes sent together: per answer")
    parser.add_argument("--publishers", type=int, default=4, help="pushes a round (--green)")
    args = parser.parse_args()
    if args.green:
        for comet_dir in args.comet or [os.path.dirname(HERE)]:   # always to a channel
            alone, rounds = (count(comet_dir, args.store, n, args.subscribers, True, "channel",
                                   True, args.publishers) for n in (0, args.rounds))
            print(json.dumps({"comet": os.path.abspath(comet_dir), "store": args.store,
                              "green": True, "subscribers": args.subscribers,
                              "publishers": args.publishers, "answer_instructions":
                              round((rounds - alone) / args.rounds / args.subscribers)}))
        return
    if args.store == "floor":
        parser.error("--store floor counts only with --green")
    for comet_dir in args.comet or [os.path.dirname(HERE)]:
        alone = count(comet_dir, args.store, 0, args.subscribers, False, args.rooms)
        pushes = count(comet_dir, args.store, args.rounds, args.subscribers, False, args.rooms)
        rounds = count(comet_dir, args.store, args.rounds, args.subscribers, True, args.rooms)
        push = (pushes - alone) / args.rounds
        poll = (rounds - pushes) / args.rounds / args.subscribers
        print(json.dumps({"comet": os.path.abspath(comet_dir), "store": args.store,
                          "rooms": args.rooms,
                          "subscribers": args.subscribers, "push_instructions": round(push),
                          "poll_instructions": round(poll)}))


if __name__ == "__main__":
    main()
