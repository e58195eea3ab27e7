"""The load generator: raw HTTP/1.1 over asyncio, many connections from one process.

Three client dialects: comet's wire protocol (comet.py and the floor app),
socket.io's long-polling transport, and a bare POST (hello).  The workloads
at the bottom each return a dict of measurements.  Every loop is bounded in
count and in time: a loop that runs out of either stops and says so in
``errors``, never hangs.
"""

import asyncio
import contextlib
import json
import random
import secrets
import statistics
import time
import urllib.parse

HOST = "127.0.0.1"
POLL_TIMEOUT = 25.0                         # the apps' poll timeout; a poll may take this long
MAX_LOOP = 1_000_000                        # no loop here turns more often than this


class BenchError(Exception):
    """A request the server refused, or an answer the client cannot read."""


# --------------------------------------------------------------------------
# HTTP/1.1
# --------------------------------------------------------------------------

class Connection:
    """One keep-alive connection to 127.0.0.1:port, reopened when the server closed it."""

    def __init__(self, port):
        self.port = port
        self.reader = self.writer = None

    async def request(self, method, target, headers=None, body=b"", timeout=POLL_TIMEOUT + 15):
        """``(status, body)``; a reused connection that the server closed is retried once."""
        head = [f"{method} {target} HTTP/1.1", f"Host: {HOST}:{self.port}"]
        head += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if body or method == "POST":
            head.append(f"Content-Length: {len(body)}")
        data = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        try:
            async with asyncio.timeout(timeout):
                for attempt in range(2):
                    fresh = self.writer is None or self.reader.at_eof()
                    if fresh:
                        self.close()
                        self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
                    try:
                        self.writer.write(data)
                        status, keep, answer = await self._response()
                    except (ConnectionError, asyncio.IncompleteReadError):
                        self.close()
                        if fresh or attempt:
                            raise
                        continue
                    if not keep:
                        self.close()
                    return status, answer
        except BaseException:
            self.close()                    # a half-read answer must not meet the next request
            raise

    async def _response(self):
        line = await self.reader.readline()
        if not line:
            raise ConnectionResetError("the server closed the connection")
        version, status = line.split(None, 2)[:2]
        headers = {}
        for _ in range(200):
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        connection = headers.get("connection", "")
        keep = connection == "keep-alive" if version == b"HTTP/1.0" else connection != "close"
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            chunks = []
            for _ in range(MAX_LOOP):
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    while (await self.reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            body = b"".join(chunks)
        else:
            body, keep = await self.reader.read(), False
        return int(status), keep, body

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


# --------------------------------------------------------------------------
# Dialects: subscribers (poll) and publishers (push)
# --------------------------------------------------------------------------

ROOMS = "listener"                          # or "channel": see apps.comet_app
STAMPS = False                              # each package with a fresh _stamp, as a browser's


def package(room, seq, kind="msg", **fields):
    """What every publisher sends; the send time ``t`` travels inside it.  To comet.py
    it is addressed to the listener ``room``, or with ``ROOMS = "channel"`` to the
    room's channel.  With ``STAMPS`` it carries a fresh ``_stamp``, as every push
    of the browser client does (the others' apps ignore it)."""
    listeners = ["channel:" + room] if ROOMS == "channel" else ["room"]
    if STAMPS:
        fields.setdefault("_stamp", secrets.token_urlsafe(12))
    return {"type": kind, "listeners": listeners, "room": room, "seq": seq,
            "t": time.perf_counter(), "text": "hello, room", **fields}


class CometSubscriber:
    """A client of comet.py (or the floor) polling with the cursor of its last answer."""

    def __init__(self, port, client, room):
        self.conn = Connection(port)
        self.headers = {"X-Client": client, "X-Room": room}
        self.cursor = None

    async def start(self):
        await self.poll()                   # no cursor: the head, at once

    async def poll(self):
        target = "/comet/poll"
        if self.cursor is not None:
            target += "?cursor=" + urllib.parse.quote(self.cursor)
        status, body = await self.conn.request("GET", target, self.headers)
        if status != 200:
            raise BenchError(f"poll answered {status}: {body[:200]!r}")
        answer = json.loads(body)
        self.cursor = answer["cursor"]
        return answer["packages"]

    async def close(self):
        self.conn.close()


class CometPublisher:
    def __init__(self, port, client, room=None):
        self.conn = Connection(port)
        self.headers = {"X-Client": client, "Content-Type": "application/json"}
        if room is not None:                # a member of the room's channel, where rooms are
            self.headers["X-Room"] = room

    async def push(self, package):
        status, body = await self.conn.request("POST", "/comet/push", self.headers,
                                               json.dumps(package).encode())
        if status != 200:
            raise BenchError(f"push answered {status}: {body[:200]!r}")

    async def close(self):
        self.conn.close()


class SocketIOSubscriber:
    """An engine.io v4 polling client: handshake, connect, then GET after GET."""

    def __init__(self, port, client, room):
        self.conn = Connection(port)            # one: a POST goes between two GETs
        self.room = room
        self.sid = None

    async def start(self):
        status, body = await self.conn.request(
            "GET", f"/socket.io/?EIO=4&transport=polling&room={self.room}")
        if status != 200 or not body.startswith(b"0"):
            raise BenchError(f"handshake answered {status}: {body[:200]!r}")
        self.sid = json.loads(body[1:])["sid"]
        await self._post("40")
        for _ in range(100):
            packets = await self._get()
            if any(p.startswith("40") for p in packets):
                return
        raise BenchError("no socket.io connect answer")

    async def _get(self):
        status, body = await self.conn.request(
            "GET", f"/socket.io/?EIO=4&transport=polling&sid={self.sid}")
        if status != 200:
            raise BenchError(f"poll answered {status}: {body[:200]!r}")
        return body.decode().split("\x1e")

    async def _post(self, data):
        status, body = await self.conn.request(
            "POST", f"/socket.io/?EIO=4&transport=polling&sid={self.sid}",
            {"Content-Type": "text/plain;charset=UTF-8"}, data.encode())
        if status != 200:
            raise BenchError(f"post answered {status}: {body[:200]!r}")

    async def poll(self):
        packages = []
        for packet in await self._get():
            if packet.startswith("42"):
                packages.append(json.loads(packet[2:])[1])
            elif packet == "2":
                await self._post("3")           # pong, or the server drops us
            elif packet.startswith("1"):
                raise BenchError("the server closed the session")
        return packages

    async def close(self):
        if self.sid:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._post("1"), 5)
        self.conn.close()


class PlainPublisher:
    """POST the package to ``path``: socketio's emit endpoint, or hello."""

    def __init__(self, port, path):
        self.conn = Connection(port)
        self.path = path

    async def push(self, package):
        status, body = await self.conn.request("POST", self.path,
                                               {"Content-Type": "application/json"},
                                               json.dumps(package).encode())
        if status != 200:
            raise BenchError(f"push answered {status}: {body[:200]!r}")

    async def close(self):
        self.conn.close()


class Target:
    """One server process serving one app: its port, pid and dialect."""

    def __init__(self, app, port, pid=None):
        self.app = app                          # hello, floor, socketio, comet
        self.port = port
        self.pid = pid
        self._stats = Connection(port)

    def subscriber(self, client, room):
        if self.app == "socketio":
            return SocketIOSubscriber(self.port, client, room)
        if self.app in ("comet", "floor"):
            return CometSubscriber(self.port, client, room)
        raise BenchError(f"{self.app} cannot hold a poll")

    def publisher(self, client, room=None):
        if self.app == "socketio":
            return PlainPublisher(self.port, "/push")
        if self.app == "hello":
            return PlainPublisher(self.port, "/")
        return CometPublisher(self.port, client, room)

    async def stats(self):
        status, body = await self._stats.request("GET", "/_bench/stats", timeout=10)
        return json.loads(body)

    async def wait_inflight(self, predicate, timeout):
        """Wait until ``predicate(inflight)``; False when ``timeout`` passed first."""
        return await self.wait_count("inflight", predicate, timeout)

    async def wait_count(self, name, predicate, timeout):
        """Wait until ``predicate(stats[name])``; False when ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        for _ in range(MAX_LOOP):
            if predicate((await self.stats())[name]):
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return False


# --------------------------------------------------------------------------
# Measuring the server process
# --------------------------------------------------------------------------

def raise_open_files(want=65536):
    """Lift RLIMIT_NOFILE as far as this process may (root may raise the hard limit too)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (max(want, hard), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, limit), limit))
            return
        except (ValueError, OSError):
            continue


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def cpu_seconds(pid):
    """utime + stime of the process, in seconds."""
    import os
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values, p):
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def ms(seconds):
    return None if seconds is None else round(seconds * 1000, 3)


# --------------------------------------------------------------------------
# An audience: N subscribers of one room, each polling in a loop
# --------------------------------------------------------------------------

async def limited(coroutines, limit):
    """Run ``coroutines`` with at most ``limit`` at once; their results in order."""
    semaphore = asyncio.Semaphore(limit)

    async def one(coroutine):
        async with semaphore:
            return await coroutine
    return await asyncio.gather(*(one(c) for c in coroutines))


class Audience:
    """``n`` subscribers to ``room`` at ``target``; ``on_package(package, now)`` for each arrival."""

    def __init__(self, target, room, n, on_package, deadline, prefix=None):
        self.target = target
        self.room = room
        self.subscribers = [target.subscriber(f"{prefix or room}-{i}", room) for i in range(n)]
        self.on_package = on_package
        self.deadline = deadline
        self.stopping = False
        self.errors = []
        self.tasks = []
        self.answers = []                   # perf_counter() of each poll answered

    async def start(self, concurrency=200):
        await limited([s.start() for s in self.subscribers], concurrency)
        self.tasks = [asyncio.create_task(self._listen(s)) for s in self.subscribers]

    async def _listen(self, subscriber):
        for _ in range(MAX_LOOP):
            if self.stopping or time.monotonic() > self.deadline:
                return
            try:
                packages = await subscriber.poll()
            except Exception as error:      # counted; the loop goes on until its bounds
                self.errors.append(repr(error))
                if len(self.errors) > 1000 or self.stopping:
                    return
                await asyncio.sleep(0.1)
                continue
            now = time.perf_counter()
            self.answers.append(now)
            for p in packages:
                self.on_package(p, now)

    async def stop(self, publisher=None):
        """Release the parked polls (a last package to the room), then close."""
        self.stopping = True
        if publisher is not None and self.tasks:
            with contextlib.suppress(Exception):
                await publisher.push(package(self.room, -1, kind="bye"))
        if self.tasks:
            done, pending = await asyncio.wait(self.tasks, timeout=10)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await limited([s.close() for s in self.subscribers], 500)


# --------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------

async def push_round(members, seq, n, round_limit, push):
    """One round: ``push`` (a coroutine) sent while ``members`` wait for package
    ``seq``; the seconds until the push was answered, and until each arrival."""
    collecting = asyncio.create_task(asyncio.to_thread(members.collect, seq, round_limit))
    sent = time.monotonic()
    await push
    answered = time.monotonic() - sent
    got, lacking = await collecting
    if lacking or len(got) < n:
        raise BenchError(f"round {seq}: {len(got)} of {n} had it in {round_limit:g} s")
    return answered, [t - sent for t in got]


async def fanout(target, n, rounds=3, idle=0.0, round_limit=10.0, time_limit=120.0, processes=4):
    """One push to ``n`` parked polls, ``rounds`` times: the time until all received it.

    The polls are held by ``Members`` (client processes, raw sockets, a
    fresh connection a round, the arrival taken before the answer is
    parsed), so what is timed is the server's fan-out, not this process's
    reading of ``n`` answers.  The push is sent once the app's own count of
    parked polls reached ``n`` (socket.io has none: its poll requests inside
    the app, then 0.2 s).  With ``idle`` > 0, first the server's CPU while
    the ``n`` polls sit parked that many seconds.
    """
    deadline = time.monotonic() + time_limit
    room = f"fan{n}-{random.randrange(10**6)}"
    clients = [f"{room}-{i}" for i in range(n)]
    publisher = target.publisher(f"{room}-pub", room)
    result = {"workload": "fanout", "n": n, "rounds": 0}
    totals, latencies, phases = [], [], []     # phases: (push answered, first arrival) a round
    members, cursor, dialect = None, None, "comet"
    count = "inflight" if target.app == "socketio" else "parked"
    try:
        if target.app == "socketio":
            subscribers = [target.subscriber(c, room) for c in clients]
            await limited([s.start() for s in subscribers], 200)
            clients, dialect = [s.sid for s in subscribers], "socketio"
            for subscriber in subscribers:
                subscriber.conn.close()
        else:
            head = target.subscriber(f"{room}-head", room)
            await head.start()
            await head.close()
            cursor = head.cursor
        base = (await target.stats())[count]
        members = Members(target.port, clients, cursor, processes, dialect, room)
        for seq in range(rounds):
            if time.monotonic() > deadline:
                raise BenchError(f"round {seq}: out of time")
            await asyncio.to_thread(members.park)
            if not await target.wait_count(count, lambda k: k >= base + n, 30):
                raise BenchError(f"round {seq}: {(await target.stats())[count] - base} of {n} polls parked")
            if count == "inflight":
                await asyncio.sleep(0.2)    # parked inside the app, not just counted in
            if idle and seq == 0:
                await asyncio.sleep(0.5)
                cpu0, t0 = cpu_seconds(target.pid), time.monotonic()
                await asyncio.sleep(idle)
                cpu1, t1 = cpu_seconds(target.pid), time.monotonic()
                result["idle_cpu_pct"] = round(100 * (cpu1 - cpu0) / (t1 - t0), 2)
                result["idle_seconds"] = round(t1 - t0, 1)
            answered, arrivals = await push_round(members, seq, n, round_limit,
                                                  publisher.push(package(room, seq)))
            phases.append((answered, min(arrivals)))
            totals.append(max(arrivals))
            latencies += arrivals
            result["rounds"] += 1
        result["rss_mb"] = rss_mb(target.pid)
    except Exception as error:              # recorded as a failed cell, the run goes on
        result["failed"] = repr(error)
    finally:
        if members:
            members.close()
            result["client_cpu_s"] = members.cpu
        await publisher.close()
    if totals:
        result.update(all_ms=ms(statistics.median(totals)), all_ms_rounds=[ms(t) for t in totals],
                      best_ms=ms(min(totals)), p50_ms=ms(percentile(latencies, 50)),
                      p99_ms=ms(percentile(latencies, 99)),
                      answered_ms_rounds=[ms(answered) for answered, _ in phases],
                      first_ms_rounds=[ms(first) for _, first in phases])
    result["errors"] = 0
    return result


async def throughput(target, subscribers=100, publishers=1, duration=4.0, warmup=1.0,
                     time_limit=90.0):
    """``publishers`` pushing back to back to a room of ``subscribers`` for ``duration`` s.

    Deliveries/s counts the packages that arrived in the measured window
    (after ``warmup``); latency is from the push's send to each arrival.
    """
    deadline = time.monotonic() + time_limit
    room = f"tp{publishers}-{random.randrange(10**6)}"
    window = [None, None]
    latencies, pushes = [], []

    def on_package(p, now):
        if p.get("type") == "msg" and window[0] is not None and window[0] <= now <= window[1]:
            latencies.append(now - p["t"])

    audience = Audience(target, room, subscribers, on_package, deadline)
    pubs = [target.publisher(f"{room}-pub{i}", room) for i in range(publishers)]
    result = {"workload": "throughput", "n": subscribers, "publishers": publishers}
    base = (await target.stats())["inflight"]

    async def publish(pub, index):
        seq = index * MAX_LOOP
        for _ in range(MAX_LOOP):
            now = time.perf_counter()
            if now > window[1] or time.monotonic() > deadline:
                return
            p = package(room, seq)
            await pub.push(p)
            if window[0] <= p["t"] <= window[1]:
                pushes.append(time.perf_counter() - p["t"])
            seq += 1

    try:
        await audience.start()
        if not await target.wait_inflight(lambda k: k >= base + subscribers, 60):
            raise BenchError("the subscribers did not park")
        start = time.perf_counter()
        window[:] = [start + warmup, start + warmup + duration]
        cpu0 = cpu_seconds(target.pid)
        await asyncio.gather(*(publish(pub, i) for i, pub in enumerate(pubs)))
        cpu1 = cpu_seconds(target.pid)
        await asyncio.sleep(0.5)            # the last arrivals inside the window
        answers = sum(window[0] <= t <= window[1] for t in audience.answers)
        result.update(deliveries_per_s=round(len(latencies) / duration),
                      pushes_per_s=round(len(pushes) / duration),
                      packages_per_answer=round(len(latencies) / max(1, answers), 2),
                      p50_ms=ms(percentile(latencies, 50)), p99_ms=ms(percentile(latencies, 99)),
                      push_p50_ms=ms(percentile(pushes, 50)),
                      server_cpu_pct=round(100 * (cpu1 - cpu0) / (warmup + duration), 1),
                      rss_mb=rss_mb(target.pid))
    except Exception as error:              # recorded as a failed cell, the run goes on
        result["failed"] = repr(error)
    finally:
        await audience.stop(pubs[0])
        for pub in pubs:
            await pub.close()
    result["errors"] = len(audience.errors)
    return result


async def push_latency(target, count=200, subscribers=1, time_limit=60.0):
    """Back-to-back pushes from one publisher to a room of ``subscribers``: each push's round trip."""
    deadline = time.monotonic() + time_limit
    room = f"pl-{random.randrange(10**6)}"
    result = {"workload": "push_latency", "n": subscribers}
    audience = None
    if target.app != "hello":
        audience = Audience(target, room, subscribers, lambda p, now: None, deadline)
    publisher = target.publisher(f"{room}-pub", room)
    times = []
    try:
        if audience:
            base = (await target.stats())["inflight"]
            await audience.start()
            if not await target.wait_inflight(lambda k: k >= base + subscribers, 30):
                raise BenchError("the subscribers did not park")
        for seq in range(count):
            if time.monotonic() > deadline:
                break
            p = package(room, seq)
            await publisher.push(p)
            times.append(time.perf_counter() - p["t"])
    except Exception as error:              # recorded as a failed cell, the run goes on
        result["failed"] = repr(error)
    finally:
        if audience:
            await audience.stop(publisher)
        await publisher.close()
    result.update(pushes=len(times), p50_ms=ms(percentile(times, 50)),
                  p99_ms=ms(percentile(times, 99)),
                  errors=len(audience.errors) if audience else 0)
    return result


async def hold(target, peak=10000, step=1000, step_limit=30.0, time_limit=180.0):
    """Ramp parked polls ``step`` at a time up to ``peak``: the server's RSS at each step."""
    deadline = time.monotonic() + time_limit
    room = f"hold-{random.randrange(10**6)}"
    result = {"workload": "hold", "n": peak, "held": 0, "steps": []}
    audiences = []
    try:
        result["rss_start_mb"] = rss_mb(target.pid)
        for k in range(step, peak + 1, step):
            audience = Audience(target, room, step, lambda p, now: None, deadline,
                                prefix=f"{room}-{k}")
            audiences.append(audience)
            await audience.start(concurrency=250)
            if not await target.wait_inflight(lambda held: held >= k, step_limit):
                raise BenchError(f"{(await target.stats())['inflight']} of {k} parked")
            await asyncio.sleep(0.3)
            result["held"] = k
            result["steps"].append((k, round(rss_mb(target.pid), 1)))
        result["rss_mb"] = rss_mb(target.pid)
    except Exception as error:              # recorded as a failed cell, the run goes on
        result["failed"] = repr(error)
    finally:
        # The server is stopped after this cell: closing our ends is enough.
        for audience in audiences:
            audience.stopping = True
            for task in audience.tasks:
                task.cancel()
            await asyncio.gather(*audience.tasks, return_exceptions=True)
            await limited([s.close() for s in audience.subscribers], 1000)
    result["errors"] = sum(len(a.errors) for a in audiences)
    if result["held"]:
        result["rss_per_poll_kb"] = round(
            (result["steps"][-1][1] - result["rss_start_mb"]) * 1024 / result["held"], 2)
    return result


async def cross_process(pusher, poller, count=40, time_limit=60.0):
    """Push to one comet process, a poll parked on another: the time until it arrives there."""
    deadline = time.monotonic() + time_limit
    client = f"xp-{random.randrange(10**6)}"
    arrived = {}

    def on_package(p, now):
        arrived[p.get("seq")] = now

    audience = Audience(poller, "xp", 1, on_package, deadline, prefix=client)
    recipient = audience.subscribers[0].headers["X-Client"]
    publisher = pusher.publisher(f"{client}-pub")
    result = {"workload": "cross_process", "n": 1}
    times = []
    try:
        await audience.start()
        for seq in range(count):
            if time.monotonic() > deadline:
                break
            if not await poller.wait_inflight(lambda k: k >= 1, 10):
                raise BenchError("the poll did not park")
            await asyncio.sleep(random.uniform(0.01, 0.1))      # no phase lock with the tail
            sent = time.perf_counter()
            await publisher.push({"type": "msg", "listeners": recipient, "seq": seq})
            for _ in range(MAX_LOOP):
                if seq in arrived or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.001)
            if seq not in arrived:
                raise BenchError(f"push {seq} never arrived")
            times.append(arrived[seq] - sent)
    except Exception as error:              # recorded as a failed cell, the run goes on
        result["failed"] = repr(error)
    finally:
        audience.stopping = True
        with contextlib.suppress(Exception):
            await publisher.push({"type": "bye", "listeners": recipient, "seq": -1})
        await audience.stop()
        await publisher.close()
    result.update(pushes=len(times), p50_ms=ms(percentile(times, 50)),
                  p99_ms=ms(percentile(times, 99)), errors=len(audience.errors))
    return result



# --------------------------------------------------------------------------
# Many members: client processes with raw sockets
# --------------------------------------------------------------------------

def _poll_request(port, dialect, client, cursor, room):
    """One poll of ``client``: comet's (and the floor's) with its cursor, or socket.io's by sid."""
    if dialect == "socketio":
        target, headers = f"/socket.io/?EIO=4&transport=polling&sid={client}", ""
    else:
        target = "/comet/poll?cursor=" + urllib.parse.quote(cursor)
        headers = f"X-Client: {client}\r\nX-Room: {room}\r\n"
    return (f"GET {target} HTTP/1.1\r\nHost: {HOST}:{port}\r\n{headers}"
            "Connection: close\r\n\r\n").encode()


def _whole(data):
    """The body of a whole HTTP answer in ``data`` (Content-Length or chunked), else None."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    body = data[end + 4:]
    for line in data[:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            return body if len(body) >= int(value) else None
        if name == b"transfer-encoding" and value == b"chunked":
            if not (body == b"0\r\n\r\n" or body.endswith(b"\r\n0\r\n\r\n")):
                return None
            chunks = []
            for _ in range(MAX_LOOP):
                size, _, rest = body.partition(b"\r\n")
                size = int(size.split(b";")[0], 16)
                if size == 0:
                    return b"".join(chunks)
                chunks.append(rest[:size])
                body = rest[size + 2:]
    return None


def _read_answer(dialect, body, seq):
    """``(whether package seq is in it, the new cursor, whether to pong)`` of one poll answer."""
    if dialect == "socketio":
        packets = body.decode().split("\x1e")
        found = any(p.startswith("42") and json.loads(p[2:])[1].get("seq") == seq for p in packets)
        return found, None, "2" in packets
    answer = json.loads(body)
    return any(p.get("seq") == seq for p in answer["packages"]), answer["cursor"], False


def _members_process(port, dialect, room, clients, cursor, commands, answers):
    """Hold one parked poll per client in this process, a fresh connection each.

    ``("park",)`` sends every client's poll; ``("collect", seq, limit)``
    reads every answer and puts ``(arrival times of package seq, how many
    never had it)``.  An arrival is ``time.monotonic()`` when the whole
    answer is in, parsed only afterwards, so the client's own work stays out
    of the figure; an answer without the package (a poll that timed out,
    socket.io's ping) is followed by a fresh poll, as a client would.
    """
    import resource
    import selectors
    import socket
    cursors = dict.fromkeys(clients, cursor)
    socks = {}

    def send(client):
        sock = socket.create_connection((HOST, port))
        sock.sendall(_poll_request(port, dialect, client, cursors[client], room))
        socks[sock] = client
        return sock

    def pong(sid):
        sock = socket.create_connection((HOST, port))
        sock.sendall((f"POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\n"
                      f"Host: {HOST}:{port}\r\nContent-Type: text/plain;charset=UTF-8\r\n"
                      "Content-Length: 1\r\nConnection: close\r\n\r\n3").encode())
        sock.recv(4096)
        sock.close()

    for _ in range(MAX_LOOP):
        command = commands.get()
        if command[0] == "park":
            for client in clients:
                send(client)
            answers.put(("parked", len(socks)))
        elif command[0] == "collect":
            seq, limit = command[1], command[2]
            selector = selectors.DefaultSelector()
            buffers = {}
            for sock in socks:
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ)
                buffers[sock] = b""
            arrivals = []
            deadline = time.monotonic() + limit
            for _ in range(MAX_LOOP):
                if not buffers or time.monotonic() > deadline:
                    break
                whole = []
                for key, _ in selector.select(timeout=0.2):
                    sock = key.fileobj
                    chunk = sock.recv(65536)
                    buffers[sock] += chunk
                    body = _whole(buffers[sock])
                    if body is not None or not chunk:
                        whole.append((time.monotonic(), sock, body))
                for arrival, sock, body in whole:
                    del buffers[sock]
                    selector.unregister(sock)
                    sock.close()
                    client = socks.pop(sock)
                    try:
                        found, cursors[client], ping = _read_answer(dialect, body, seq)
                    except (TypeError, ValueError, KeyError, IndexError, AttributeError):
                        found, ping = False, False
                    if found:
                        arrivals.append(arrival)
                        continue
                    if ping:
                        pong(client)
                    again = send(client)        # not this one yet: poll again
                    again.setblocking(False)
                    selector.register(again, selectors.EVENT_READ)
                    buffers[again] = b""
            selector.close()
            answers.put((arrivals, len(buffers)))
            # Polls still open here are left to the server (released by a last package).
        else:
            for sock in socks:
                sock.close()
            usage = resource.getrusage(resource.RUSAGE_SELF)
            answers.put(("cpu", usage.ru_utime + usage.ru_stime))
            return


class Members:
    """``clients`` spread over ``processes`` client processes, a poll each
    (``dialect``: "comet", which the floor speaks too, or "socketio", each
    client a session id)."""

    def __init__(self, port, clients, cursor=None, processes=4, dialect="comet", room=""):
        import multiprocessing
        context = multiprocessing.get_context("fork")
        self.procs, self.commands = [], []
        self.answers = context.Queue()
        self.cpu = None
        for k in range(processes):
            commands = context.Queue()
            proc = context.Process(target=_members_process, daemon=True,
                                   args=(port, dialect, room, clients[k::processes], cursor,
                                         commands, self.answers))
            proc.start()
            self.procs.append(proc)
            self.commands.append(commands)

    def _all(self, command, timeout):
        for commands in self.commands:
            commands.put(command)
        return [self.answers.get(timeout=timeout) for _ in self.procs]

    def park(self, timeout=60):
        return sum(n for _, n in self._all(("park",), timeout))

    def collect(self, seq, limit):
        arrivals, lacking = [], 0
        for got, lost in self._all(("collect", seq, limit), limit + 30):
            arrivals += got
            lacking += lost
        return arrivals, lacking

    def close(self):
        """Stop the processes; ``cpu`` is then the CPU seconds they used."""
        with contextlib.suppress(Exception):
            self.cpu = round(sum(cpu for _, cpu in self._all(("stop",), 10)), 2)
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


async def channel(target, n=10000, rounds=3, joins=1000, join_concurrency=50, join_limit=120.0,
                  round_limit=30.0, processes=4):
    """One push to a channel of ``n`` members, every one with a poll parked, ``rounds`` times:
    the time until the push is answered, and until the last member has the package.

    The first ``joins`` members join with ``join`` packages, ``join_concurrency``
    at a time (their rate is reported); the app enrols the others in bulk
    (``/_bench/enrol``).  The pusher is member 0.  The polls are held by
    ``Members`` (client processes, raw sockets, a fresh connection a round),
    and the push is sent once the app's own count of parked polls reached
    ``n``.  The floor has no channels: there the same clients park and the
    same push goes to all (the floor's fan-out to ``n``).
    """
    name = f"channel:{n}-{random.randrange(10**6)}"
    clients = [f"m{random.randrange(10**6)}-{i}" for i in range(n)]
    pusher = target.publisher(clients[0])
    result = {"workload": "channel", "n": n, "rounds": 0, "joined": 0}
    answered, totals, latencies = [], [], []
    members = None

    async def parked_now():
        stats = await target.stats()
        return stats.get("parked", stats["inflight"])

    async def join(client):
        conn = Connection(target.port)
        try:
            status, body = await conn.request(
                "POST", "/comet/push", {"X-Client": client, "Content-Type": "application/json"},
                json.dumps({"type": "join", "listeners": [name]}).encode())
        finally:
            conn.close()
        if status != 200:
            raise BenchError(f"join answered {status}: {body[:200]!r}")
        result["joined"] += 1

    try:
        if target.app == "comet":
            started = time.monotonic()
            await asyncio.wait_for(limited([join(c) for c in clients[:joins]], join_concurrency),
                                   join_limit)
            result["joins_per_s"] = round(result["joined"] / (time.monotonic() - started), 1)
            started = time.monotonic()
            for k in range(joins, n, 1000):
                status, body = await target._stats.request(
                    "POST", "/_bench/enrol", {"Content-Type": "application/json"},
                    json.dumps({"channel": name, "clients": clients[k:k + 1000]}).encode(), timeout=60)
                if status != 200:
                    raise BenchError(f"enrol answered {status}: {body[:200]!r}")
            result["enrol_s"] = round(time.monotonic() - started, 1)
        head = CometSubscriber(target.port, clients[0], name)
        await head.start()
        head.conn.close()
        base = await parked_now()
        members = Members(target.port, clients, head.cursor, processes, room=name)
        for seq in range(rounds):
            started = time.monotonic()
            await asyncio.to_thread(members.park)
            for _ in range(MAX_LOOP):
                if await parked_now() >= base + n or time.monotonic() > started + round_limit:
                    break
                await asyncio.sleep(0.02)
            if await parked_now() < base + n:
                raise BenchError(f"round {seq}: {await parked_now() - base} of {n} polls parked")
            result.setdefault("park_s", round(time.monotonic() - started, 1))
            p = package(name, seq)
            p["listeners"] = [name] if target.app == "comet" else ["room"]
            push_s, arrivals = await push_round(members, seq, n, round_limit, pusher.push(p))
            answered.append(push_s)
            totals.append(max(arrivals))
            latencies += arrivals
            result["rounds"] += 1
        result["rss_mb"] = rss_mb(target.pid)
    except Exception as error:              # recorded as a failed cell, the run goes on
        result["failed"] = repr(error)
    finally:
        if members:
            members.close()
            result["client_cpu_s"] = members.cpu
        await pusher.close()
    if totals:
        result.update(push_ms=ms(statistics.median(answered)), push_ms_rounds=[ms(t) for t in answered],
                      all_ms=ms(statistics.median(totals)), all_ms_rounds=[ms(t) for t in totals],
                      p50_ms=ms(percentile(latencies, 50)), p99_ms=ms(percentile(latencies, 99)))
    return result
