"""A second fan-out harness, independent of load.py's client, to check its figures.

    python bench/fanout_check.py --servers wsgiref,gevent --apps floor,comet-memory,comet-sqlite
                                 [--n 1000] [--reps 3] [--workers 4] [--comet DIR]

One push to N parked polls, on its own clock: ``--workers`` processes each
hold N/workers raw sockets (``selectors``, no asyncio), each socket one poll
sent with the head's cursor and ``Connection: close``, read once and never
sent again.  The parent waits until the app's own count of parked polls
(``/_bench/stats`` ``parked``: comet's ``Comet.stats()``, the floor's
waiters on its condition) reaches N, takes ``time.monotonic()`` just before
it sends the push over a connection opened beforehand, and the workers
take it when a poll's whole answer holding the package is in.  "All have
it" is the last such arrival; an answer without the package (a timed-out
poll) counts as missing, and a repetition that misses any is a failure.
Each repetition is fresh connections on the same server process; the
server's CPU from the push to the last answer (from /proc, in clock ticks:
10 ms) and the client's own (the workers' and the parent's) are printed
beside it.  ``--comet DIR`` serves the comet.py in DIR.
"""

import argparse
import http.client
import json
import multiprocessing
import os
import resource
import selectors
import socket
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import load  # noqa: E402
import run  # noqa: E402


def stats(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/_bench/stats")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def head_cursor(port, room):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/comet/poll", headers={"X-Client": f"{room}-head", "X-Room": room})
        return json.loads(conn.getresponse().read())["cursor"]
    finally:
        conn.close()


def complete(data):
    """Whether ``data`` holds a whole HTTP answer with a Content-Length."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return False
    for line in data[:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(data) - end - 4 >= int(value)
    return False


def worker(port, room, cursor, clients, seq, ready, results, limit):
    """Open one socket per client, send its poll, then read every answer: arrival times."""
    sel = selectors.DefaultSelector()
    buffers = {}
    for client in clients:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall((f"GET /comet/poll?cursor={cursor} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                      f"X-Client: {client}\r\nX-Room: {room}\r\nConnection: close\r\n\r\n").encode())
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
        buffers[sock] = b""
    ready.put(len(clients))
    arrivals, missing = [], 0
    deadline = time.monotonic() + limit
    for _ in range(10 * len(clients) + 100000):
        if not buffers or time.monotonic() > deadline:
            break
        for key, _ in sel.select(timeout=0.5):
            sock = key.fileobj
            chunk = sock.recv(65536)
            buffers[sock] += chunk
            if chunk and not complete(buffers[sock]):
                continue
            now = time.monotonic()
            body = buffers.pop(sock).partition(b"\r\n\r\n")[2]
            sel.unregister(sock)
            sock.close()
            try:
                found = any(p.get("seq") == seq for p in json.loads(body)["packages"])
            except ValueError:
                found = False
            if found:
                arrivals.append(now)
            else:
                missing += 1
    missing += len(buffers)
    for sock in buffers:
        sock.close()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    results.put((arrivals, missing, cpu.ru_utime + cpu.ru_stime))


def one_push(port, n, workers, seq, limit=20.0):
    """One repetition: N fresh polls parked, one push; its figures."""
    room = f"check-{os.getpid()}-{seq}"
    cursor = head_cursor(port, room)
    base = stats(port)["parked"]
    ready, results = multiprocessing.Queue(), multiprocessing.Queue()
    share = [[f"{room}-{i}" for i in range(w, n, workers)] for w in range(workers)]
    procs = [multiprocessing.Process(target=worker,
                                     args=(port, room, cursor, clients, seq, ready, results, limit))
             for clients in share]
    for proc in procs:
        proc.start()
    sent = sum(ready.get(timeout=limit) for _ in procs)
    deadline = time.monotonic() + limit
    parked = base
    while time.monotonic() < deadline:
        parked = stats(port)["parked"]
        if parked >= base + n:
            break
        time.sleep(0.02)
    if parked < base + n:
        raise RuntimeError(f"{parked - base} of {sent} polls parked")
    pusher = http.client.HTTPConnection("127.0.0.1", port, timeout=limit)
    pusher.connect()
    body = json.dumps({"type": "msg", "listeners": ["room"], "room": room, "seq": seq}).encode()
    server = stats(port)["pid"]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    server0 = load.cpu_seconds(server)
    t0 = time.monotonic()
    pusher.request("POST", "/comet/push", body,
                   {"X-Client": f"{room}-pub", "Content-Type": "application/json"})
    pusher.getresponse().read()
    answered = time.monotonic() - t0
    pusher.close()
    arrivals, missing, client_cpu = [], 0, 0.0
    for _ in procs:
        got, lost, cpu = results.get(timeout=limit + 10)
        arrivals += got
        missing += lost
        client_cpu += cpu
    server_cpu = load.cpu_seconds(server) - server0
    for proc in procs:
        proc.join(10)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu += (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    if missing or not arrivals:
        raise RuntimeError(f"{missing} of {n} polls answered without the package")
    latencies = sorted(t - t0 for t in arrivals)
    return {"all_ms": round(1000 * latencies[-1], 1), "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
            "push_ms": round(1000 * answered, 1),
            "server_cpu_ms": round(1000 * server_cpu), "client_cpu_s": round(client_cpu, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="wsgiref,gevent")
    parser.add_argument("--apps", default="floor,comet-memory,comet-sqlite")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4, help="client processes")
    parser.add_argument("--comet", help="a directory holding the comet.py to serve")
    args = parser.parse_args()
    load.raise_open_files()
    env = run.served_env(args.comet)
    stores = run.Stores()
    print(f"load average {os.getloadavg()[0]:.2f}; N={args.n}, {args.workers} client processes")
    try:
        for server in args.servers.split(","):
            floor = None
            for app in args.apps.split(","):
                name, _ = run.app_args(app)
                with run.Server(server, name, stores.url(app), env) as srv:
                    figures = []
                    for seq in range(args.reps):
                        try:
                            figures.append(one_push(srv.port, args.n, args.workers, seq))
                        except Exception as error:
                            print(f"{server:8} {app:13} rep {seq}: FAILED {error!r}", flush=True)
                    for f in figures:
                        print(f"{server:8} {app:13} all {f['all_ms']:7.1f} ms  p50 {f['p50_ms']:7.1f}"
                              f"  push answered {f['push_ms']:6.1f}"
                              f"  server cpu {f['server_cpu_ms']:4} ms"
                              f"  client cpu {f['client_cpu_s']:.2f} s", flush=True)
                    if figures:
                        median = statistics.median(f["all_ms"] for f in figures)
                        if app == "floor":
                            floor = median
                        ratio = f"  ({median / floor:.2f}x floor)" if floor else ""
                        print(f"{server:8} {app:13} median all {median:.1f} ms{ratio}", flush=True)
    finally:
        stores.close()
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
