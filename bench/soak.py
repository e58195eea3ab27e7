"""Soak: hours of a chat in minutes, to see that memory and tables level off.

    python bench/soak.py [--minutes 30] [--visitors 24] [--every 10] [--out bench/soak]
    python bench/soak.py --plot bench/soak.jsonl      # redraw the plot only

A real threaded wsgiref server in its own process serves comet.py on a fresh
SQLite file with ``retention=60``; ``--visitors`` slots of simulated visitors
talk through it.  Each visitor lives about a minute: a fresh cookie (so a new
client id), a ``join`` to one of five channels, a poll loop, a message to its
channel every ~2 s and now and then one to a client id it has seen; then half
of them ``leave`` and half just vanish (the presence timeout drops them, and
what is still addressed to them is purged later).  The slot starts a new
visitor at once.

Every ``--every`` seconds it samples the server's RSS (``/proc/PID/status``),
the row count of every table, and the sizes of the server's per-process maps
(window bytes, clients seen, parked clients, rate buckets), into
``OUT.jsonl``, and at the end draws ``OUT.png`` (matplotlib) or, without
matplotlib, ``OUT.svg``.  It prints the first and the last minutes side by
side.  Every loop is bounded by the deadline.
"""

import argparse
import contextlib
import http.client
import json
import os
import random
import socketserver
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ROOMS = [f"room{n}" for n in range(5)]
TABLES = ["comet_packages", "comet_deliveries", "comet_purged", "comet_purge", "comet_purge_log",
          "comet_members", "comet_clients"]


# --------------------------------------------------------------------------
# The server process
# --------------------------------------------------------------------------

def serve(port, path, retention, presence_timeout, poll_timeout):
    sys.path.insert(0, ROOT)
    from comet import Comet
    comet = Comet(None, store=f"sqlite:///{path}", retention=retention, poll_timeout=poll_timeout,
                  presence_timeout=presence_timeout, rate=(50, 100))
    for room in ROOMS:
        comet.channel(room)

    def app(environ, start_response):
        if environ["PATH_INFO"] != "/soak/stats":
            return comet(environ, start_response)
        window = comet._window
        body = json.dumps(dict(
            comet.stats(), window_bytes=window.bytes if window else 0,
            seen=len(comet._seen), waiting_clients=len(comet._parking._waiters),
            rate_buckets=len(comet._rate._buckets))).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    sys.path.insert(0, HERE)
    from serve import wsgiref_server
    wsgiref_server(port, app).serve_forever(poll_interval=0.2)


# --------------------------------------------------------------------------
# Visitors
# --------------------------------------------------------------------------

class Totals:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = dict(visitors=0, pushes=0, push_errors=0, polls=0, poll_errors=0,
                           received=0, resets=0)
        self.known = []                     # client ids seen as senders, newest last

    def add(self, **counts):
        with self.lock:
            for name, n in counts.items():
                self.counts[name] += n

    def learn(self, client):
        with self.lock:
            if client not in self.known[-200:]:
                self.known.append(client)
                del self.known[:-200]

    def someone(self, rng):
        with self.lock:
            return rng.choice(self.known) if self.known else None


class Visitor:
    """One visitor: a fresh cookie, a channel, a poll loop and some pushes, for ``life`` s."""

    def __init__(self, port, totals, rng):
        self.port = port
        self.totals = totals
        self.rng = rng
        self.cookie = None
        self.cursor = None
        self.gone = threading.Event()

    def request(self, method, path, body=None, timeout=30):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Cookie": self.cookie} if self.cookie else {}
            if body is not None:
                body = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            cookie = response.getheader("Set-Cookie")
            if cookie:
                self.cookie = cookie.split(";")[0]
            return response.status, json.loads(data) if data else None
        finally:
            conn.close()

    def poll(self):
        query = "" if self.cursor is None else "?cursor=" + urllib.parse.quote(self.cursor)
        try:
            status, answer = self.request("GET", "/comet/poll" + query)
        except OSError:
            status, answer = None, None
        if status != 200:
            self.totals.add(poll_errors=1)
            return False
        self.cursor = answer["cursor"]
        for package in answer["packages"]:
            if isinstance(package.get("sender"), str):
                self.totals.learn(package["sender"])
        self.totals.add(polls=1, received=len(answer["packages"]), resets=int(answer["reset"]))
        return True

    def push(self, package):
        try:
            status, _ = self.request("POST", "/comet/push", package)
        except OSError:
            status = None
        self.totals.add(pushes=1, push_errors=int(status != 200))

    def polling(self, deadline):
        while not self.gone.is_set() and time.monotonic() < deadline:
            if not self.poll():
                self.gone.wait(1)

    def live(self, life, deadline):
        self.totals.add(visitors=1)
        end = min(time.monotonic() + life, deadline)
        if not self.poll():                 # the cookie and the first cursor
            return
        room = self.rng.choice(ROOMS)
        self.push({"type": "join", "listeners": [room]})
        poller = threading.Thread(target=self.polling, args=(deadline,), daemon=True)
        poller.start()
        n = 0
        while time.monotonic() < end:
            self.gone.wait(self.rng.uniform(1, 3))
            n += 1
            self.push({"type": "message", "listeners": [room], "text": f"hello {n}"})
            someone = self.totals.someone(self.rng) if n % 5 == 0 else None
            if someone:
                self.push({"type": "note", "listeners": someone, "text": "psst"})
        if self.rng.random() < 0.5:
            self.push({"type": "leave", "listeners": [room]})
        self.gone.set()                     # vanish: no more polls
        poller.join(35)


def slot(port, totals, seed, deadline):
    rng = random.Random(seed)
    life = rng.uniform(1, 60)               # the first visitors leave at staggered times
    while time.monotonic() < deadline - 5:
        Visitor(port, totals, rng).live(life, deadline)
        life = rng.uniform(50, 70)


# --------------------------------------------------------------------------
# Sampling, the plot
# --------------------------------------------------------------------------

def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def sample(pid, path, port, started, totals):
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
        rows = {table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                for table in TABLES}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/soak/stats")
        stats = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    with totals.lock:
        counts = dict(totals.counts)
    return dict(t=round(time.monotonic() - started, 1), rss_kib=rss_kib(pid), rows=rows,
                db_kib=os.path.getsize(path) // 1024,
                maps={name: stats[name] for name in
                      ("window_bytes", "seen", "waiting_clients", "rate_buckets", "parked")},
                head=stats["head"], **counts)


def plot(jsonl, out):
    """Draw the samples: OUT.png with matplotlib, else a hand-made OUT.svg."""
    with open(jsonl) as file:
        samples = [json.loads(line) for line in file if line.strip()]
    minutes = [s["t"] / 60 for s in samples]
    series = [("server RSS (MiB)", [s["rss_kib"] / 1024 for s in samples])]
    series += [(table, [s["rows"][table] for s in samples]) for table in TABLES]
    series += [("window (KiB)", [s["maps"]["window_bytes"] / 1024 for s in samples]),
               ("clients seen", [s["maps"]["seen"] for s in samples]),
               ("rate buckets", [s["maps"]["rate_buckets"] for s in samples])]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _svg(minutes, series, out + ".svg")
    figure, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    axes[0].plot(minutes, series[0][1])
    axes[0].set_ylabel("MiB")
    axes[0].set_title("comet.py soak on SQLite, retention 60 s: server RSS")
    for name, values in series[1:1 + len(TABLES)]:
        axes[1].plot(minutes, values, label=name)
    axes[1].set_yscale("symlog", linthresh=10)      # the small tables show beside the large
    axes[1].set_ylabel("rows (log)")
    axes[1].set_title("rows per table")
    axes[1].legend(loc="upper left", fontsize=8)
    for name, values in series[1 + len(TABLES):]:
        axes[2].plot(minutes, values, label=name)
    axes[2].set_title("per-process maps")
    axes[2].legend(loc="upper left", fontsize=8)
    axes[2].set_xlabel("minutes")
    figure.tight_layout()
    figure.savefig(out + ".png", dpi=80)
    return out + ".png"


def _svg(minutes, series, path):
    """One small panel per series, polylines scaled to their own maximum."""
    width, height, panel = 640, 60, 78
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
               "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
    span = max(minutes[-1], 1e-9)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 180}"'
             f' height="{panel * len(series) + 30}" font-family="sans-serif" font-size="11">',
             '<rect width="100%" height="100%" fill="white"/>']
    for n, (name, values) in enumerate(series):
        top = 10 + n * panel
        peak = max(values) or 1
        points = " ".join(f"{170 + m / span * width:.1f},{top + height - v / peak * height:.1f}"
                          for m, v in zip(minutes, values))
        parts += [f'<text x="5" y="{top + 25}">{name}</text>',
                  f'<text x="5" y="{top + 40}" fill="#666">max {peak:,.0f}</text>',
                  f'<line x1="170" y1="{top + height}" x2="{170 + width}" y2="{top + height}"'
                  ' stroke="#ccc"/>',
                  f'<polyline fill="none" stroke="{colours[n % len(colours)]}"'
                  f' stroke-width="1.5" points="{points}"/>']
    parts.append(f'<text x="170" y="{panel * len(series) + 22}">0 to {span:.0f} minutes</text>')
    parts.append("</svg>")
    with open(path, "w") as file:
        file.write("\n".join(parts))
    return path


def summary(samples, minutes=5):
    """Mean of the first and of the last ``minutes`` (after the first 2, the warm-up)."""
    def mean(chosen, get):
        return round(sum(get(s) for s in chosen) / len(chosen), 1) if chosen else None
    end = samples[-1]["t"]
    early = [s for s in samples if 120 <= s["t"] < 120 + minutes * 60]
    late = [s for s in samples if s["t"] >= end - minutes * 60]
    lines = [f"{'':24} {'minutes 2-' + str(2 + minutes):>14} {'last ' + str(minutes):>14}"]
    rows = [("RSS (MiB)", lambda s: s["rss_kib"] / 1024)]
    rows += [(table, lambda s, t=table: s["rows"][t]) for table in TABLES]
    rows += [("window (KiB)", lambda s: s["maps"]["window_bytes"] / 1024),
             ("clients seen", lambda s: s["maps"]["seen"]),
             ("rate buckets", lambda s: s["maps"]["rate_buckets"])]
    for name, get in rows:
        lines.append(f"{name:24} {mean(early, get)!s:>14} {mean(late, get)!s:>14}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--visitors", type=int, default=24)
    parser.add_argument("--every", type=float, default=10, help="seconds between samples")
    parser.add_argument("--retention", type=float, default=60)
    parser.add_argument("--out", default=os.path.join(HERE, "soak"))
    parser.add_argument("--plot", metavar="JSONL", help="only draw the plot of these samples")
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(int(args.serve[0]), args.serve[1], args.retention,
                     presence_timeout=30, poll_timeout=10)
    if args.plot:
        print(plot(args.plot, os.path.splitext(args.plot)[0]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "soak.db")
        with socketserver.TCPServer(("127.0.0.1", 0), None) as probe:
            port = probe.server_address[1]
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), path,
                                   "--retention", str(args.retention)])
        try:
            _run(args, server, path, port)
        finally:
            server.terminate()
            server.wait(10)


def _run(args, server, path, port):
    deadline_wait = time.monotonic() + 15
    while time.monotonic() < deadline_wait:
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=1).connect()
            break
        except OSError:
            time.sleep(0.1)
    started = time.monotonic()
    deadline = started + args.minutes * 60
    totals = Totals()
    slots = [threading.Thread(target=slot, args=(port, totals, n, deadline), daemon=True)
             for n in range(args.visitors)]
    for thread in slots:
        thread.start()
    samples = []
    with open(args.out + ".jsonl", "w") as out:
        while time.monotonic() < deadline:
            time.sleep(max(0.0, started + len(samples) * args.every - time.monotonic()))
            samples.append(sample(server.pid, path, port, started, totals))
            out.write(json.dumps(samples[-1]) + "\n")
            out.flush()
    for thread in slots:
        thread.join(40)
    print(summary(samples))
    print(plot(args.out + ".jsonl", args.out))


if __name__ == "__main__":
    main()
