"""Run the benchmark matrix and write bench/RESULTS.md and bench/results.jsonl.

    python bench/run.py              # the full matrix, 3 interleaved repetitions (~20 min)
    python bench/run.py --quick      # a tiny run of every workload, once (~5 min)
    python bench/run.py --report     # rewrite RESULTS.md from results.jsonl

Every server runs as its own process (``bench/serve.py``), so its RSS and CPU
are read from /proc; the load comes from this process (``bench/load.py``).
Repetitions are interleaved: repetition 1 of every cell, then repetition 2,
... so a slow minute of the machine hurts every app alike.  ``--comet DIR``
serves a trial copy of comet.py from DIR instead of the repository's.
"""

import argparse
import asyncio
import contextlib
import datetime
import http.client
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import load  # noqa: E402
import report  # noqa: E402

SERVERS = ["wsgiref", "cheroot", "gevent", "gthread"]
APPS = ["hello", "floor", "socketio", "comet-memory", "comet-sqlite", "comet-mysql",
        "comet-postgresql"]
CHANNEL_APPS = ["floor", "comet-sqlite", "comet-mysql", "comet-postgresql"]
DURABLE = ["comet-sqlite", "comet-mysql", "comet-postgresql", "comet-postgresql-nonotify"]
MYSQL = "mysql://root@127.0.0.1:3306/comet_bench"
POSTGRESQL = "postgresql://postgres@127.0.0.1:5432/comet_bench"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def store_url(store):
    """The URL of a comet store of kind ``store`` for an in-process measurement: a new
    SQLite file, or the local servers' ``comet_bench`` (``reset_mysql``, ``reset_postgresql``)."""
    if store == "sqlite":
        return f"sqlite:///{tempfile.mkdtemp()}/comet.db"
    return {"memory": "memory:", "mysql": MYSQL, "postgresql": POSTGRESQL}[store]


def reset_mysql(drop_only=False):
    import pymysql
    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="")
    try:
        with conn.cursor() as cur:
            cur.execute("DROP DATABASE IF EXISTS comet_bench")
            if not drop_only:
                cur.execute("CREATE DATABASE comet_bench")
    finally:
        conn.close()


def reset_postgresql(drop_only=False):
    import psycopg
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS comet_bench WITH (FORCE)")
        if not drop_only:
            conn.execute("CREATE DATABASE comet_bench")


class Server:
    """``bench/serve.py`` in a subprocess; ``pid`` is the process serving requests."""

    def __init__(self, server, app, store=None, env=None, logdir=None, profile=None,
                 notify=True, cpu=None):
        self.server, self.app, self.store = server, app, store
        self.notify = notify
        self.port = free_port()
        self.env = env
        self.profile = profile
        self.cpu = cpu
        self.log = open(os.path.join(logdir or tempfile.gettempdir(),
                                     f"serve-{server}-{app}-{self.port}.log"), "w+")
        self.proc = None
        self.pid = None
        self.stats = {}

    def start(self, timeout=30):
        args = [sys.executable, os.path.join(HERE, "serve.py"), "--server", self.server,
                "--app", self.app, "--port", str(self.port)]
        if self.store:
            args += ["--store", self.store]
        if self.profile:
            args += ["--profile", self.profile]
        if self.cpu:
            args += ["--cpu", self.cpu]
        if not self.notify:
            args += ["--no-notify"]
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(OSError, ValueError):
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/_bench/stats")
                self.stats = json.loads(conn.getresponse().read())
                conn.close()
                self.pid = self.stats["pid"]
                expected = (self.env or {}).get("COMET_BENCH_MD5")
                if expected and self.stats.get("comet_md5", expected) != expected:
                    self.stop()
                    raise RuntimeError(f"{self.server} served {self.stats['comet']}"
                                       f" (md5 {self.stats['comet_md5']}), not {expected}")
                return self
            time.sleep(0.1)
        tail = self.tail()
        self.stop()
        raise RuntimeError(f"{self.server}/{self.app} did not start:\n{tail}")

    def target(self):
        return load.Target(self.app, self.port, self.pid)

    def tail(self, lines=20):
        self.log.seek(0)
        return "".join(self.log.readlines()[-lines:])

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.pid and self.pid != self.proc.pid:    # gunicorn's worker, if it outlived its master
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class Stores:
    """A fresh store URL for each launch: a new SQLite file, an emptied MySQL or
    PostgreSQL database."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="comet-bench-")
        self.count = 0

    def url(self, app):
        if app == "comet-memory":
            return "memory:"
        if app == "comet-sqlite":
            self.count += 1
            return f"sqlite:///{self.dir}/bench-{self.count}.db"
        if app == "comet-mysql":
            reset_mysql()
            return MYSQL
        if app.startswith("comet-postgresql"):
            reset_postgresql()
            return POSTGRESQL
        return None

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def served_env(directory=None):
    """The environment of the servers: ``directory``'s comet.py (the repository's by
    default) first on their path, before any comet.py installed in site-packages."""
    env = dict(os.environ)
    served = os.path.abspath(directory or os.path.dirname(HERE))
    env["PYTHONPATH"] = served + os.pathsep + env.get("PYTHONPATH", "")
    env["COMET_BENCH_MD5"] = comet_md5(directory)
    return env


def comet_md5(directory=None):
    """Which comet.py a run served (the repository's changes while it runs)."""
    import hashlib
    path = os.path.join(directory or os.path.dirname(HERE), "comet.py")
    with open(path, "rb") as source:
        return hashlib.md5(source.read()).hexdigest()[:12]


def settings(args):
    """The sizes of every workload, full or quick."""
    if args.quick:
        return dict(fanout=[20, 100], rounds=2, channel_rounds=1, idle=2.0, subscribers=20,
                    publishers=[1, 4],
                    duration=1.0, warmup=0.3, pushes=50, hold=1000, hold_step=500, cross=10,
                    channel=500)
    return dict(fanout=[int(n) for n in args.fanout.split(",")], rounds=args.rounds,
                channel_rounds=args.channel_rounds, idle=args.idle, subscribers=100,
                publishers=[int(n) for n in args.publishers.split(",")], duration=args.duration,
                warmup=0.5, pushes=args.pushes, hold=args.hold, hold_step=1000, cross=args.cross,
                channel=args.channel)


def headline(s, app):
    """The settings of a repetition after the first: only the cells the targets judge."""
    return dict(s, fanout=[max(s["fanout"])], publishers=[max(s["publishers"])],
                idle=s["idle"] if app.startswith("comet-") else 0)


async def timed(coroutine):
    started = time.monotonic()
    result = await coroutine
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


async def main_cell(target, s, workloads):
    """Every workload of one (server, app) launch, in a fixed order."""
    results = []
    if "push_latency" in workloads:
        results.append(await timed(load.push_latency(target, count=s["pushes"])))
    if target.app == "hello":
        return results
    if "fanout" in workloads:
        for n in s["fanout"]:
            idle = s["idle"] if n == max(s["fanout"]) and "idle" in workloads else 0
            results.append(await timed(load.fanout(target, n, rounds=s["rounds"], idle=idle)))
    if "throughput" in workloads:
        for publishers in s["publishers"]:
            results.append(await timed(load.throughput(
                target, s["subscribers"], publishers, duration=s["duration"], warmup=s["warmup"])))
    return results


def app_args(app):
    return ("comet", app.split("-")[1]) if app.startswith("comet-") else (app, None)


def cell_rooms(kind, rooms):
    """What a room is in a cell: ``--rooms`` for the main cells (push latency, fan-out,
    idle, throughput); the listener elsewhere (held polls, the channel cell and
    cross-process address no room, and would only enrol thousands of members)."""
    return rooms if kind == "main" else "listener"


def run_cell(kind, server, app, s, stores, env, logdir, workloads):
    """Launch what one cell needs, run its workloads; a list of result dicts."""
    name, _ = app_args(app)
    load.ROOMS = env["COMET_BENCH_ROOMS"]
    load.STAMPS = env.get("COMET_BENCH_STAMPS") == "1"
    notify = not app.endswith("-nonotify")      # comet-postgresql-nonotify: tailing alone
    if kind == "cross":
        url = stores.url(app)
        with Server(server, name, url, env, logdir, notify=notify) as a, \
                Server(server, name, url, env, logdir, notify=notify) as b:
            return [asyncio.run(timed(load.cross_process(a.target(), b.target(), count=s["cross"])))]
    with Server(server, name, stores.url(app), env, logdir, notify=notify) as srv:
        if kind == "hold":
            return [asyncio.run(timed(load.hold(srv.target(), peak=s["hold"], step=s["hold_step"])))]
        if kind == "channel":
            return [asyncio.run(timed(load.channel(srv.target(), s["channel"],
                                                   rounds=s["channel_rounds"])))]
        return asyncio.run(main_cell(srv.target(), s, workloads))


def plan(args, rep):
    """The cells of one repetition: (kind, server, app, settings).

    Every repetition runs the cells the targets judge: push latency, fan-out
    to the largest N (with comet's idle CPU), the most publishers, polls held
    under gevent (floor, socketio, comet-memory), cross-process.  The first
    adds ``--once-servers``, the other sizes and idle CPU of every app on
    ``--extra-servers``, held polls for the durable stores, and the channel
    of ``--channel`` members under gevent (the durable stores and the floor).
    """
    s = settings(args)
    first = rep == 1
    cells = []
    main = {"push_latency", "fanout", "idle", "throughput"} & set(args.workloads)
    for server in (args.servers + (args.once_servers if first else [])) if main else []:
        for app in args.apps:
            extra = first and server in args.extra_servers
            cells.append(("main", server, app, s if extra else headline(s, app)))
    if "hold" in args.workloads and "gevent" in args.servers:
        cells += [("hold", "gevent", app, s) for app in args.apps if app != "hello"
                  and (first or app in ("floor", "socketio", "comet-memory"))]
    if "channel" in args.workloads and "gevent" in args.servers and first:
        cells += [("channel", "gevent", app, s) for app in args.apps if app in CHANNEL_APPS]
    if "cross" in args.workloads:
        cells += [("cross", server, app, s) for server in args.cross_servers for app in args.apps
                  if app in DURABLE]
    # Rotate the order each repetition, so no app always follows the same one.
    shift = (rep - 1) % max(1, len(cells))
    return cells[shift:] + cells[:shift]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run of every workload")
    parser.add_argument("--report", action="store_true", help="only rewrite RESULTS.md from the JSON lines")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--servers", default="wsgiref,cheroot,gevent,gthread",
                        help="servers of every repetition")
    parser.add_argument("--once-servers", default="",
                        help="servers of the first repetition only")
    parser.add_argument("--extra-servers", default="wsgiref,gevent",
                        help="where the first repetition also runs the other sizes and idle CPU of every app")
    parser.add_argument("--cross-servers", default="wsgiref,gevent")
    parser.add_argument("--apps", default=",".join(APPS))
    parser.add_argument("--workloads", default="push_latency,fanout,idle,throughput,hold,channel,cross")
    parser.add_argument("--fanout", default="100,500,1000")
    parser.add_argument("--rounds", type=int, default=7,
                        help="rounds of each fan-out cell (its median and its best are kept)")
    parser.add_argument("--channel-rounds", type=int, default=3,
                        help="rounds of the channel cell")
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=3.0, help="throughput window, seconds")
    parser.add_argument("--publishers", default="1,4",
                        help="publishers of the throughput cells (later repetitions: the most)")
    parser.add_argument("--pushes", type=int, default=200)
    parser.add_argument("--hold", type=int, default=10000)
    parser.add_argument("--cross", type=int, default=30)
    parser.add_argument("--channel", type=int, default=10000,
                        help="members of the channel cell (its floor: a fan-out to as many)")
    parser.add_argument("--rooms", choices=["listener", "channel"], default="channel",
                        help="what a room is to comet.py in the main cells: a channel its"
                             " clients join (as a socketio client enters its room), or the"
                             " listener 'room' (the app's memory names its clients)")
    parser.add_argument("--stamps", action="store_true",
                        help="every package pushed with a fresh _stamp, as the browser"
                             " client sends each push (comet.py then claims each)")
    parser.add_argument("--comet", help="a directory holding the comet.py to serve")
    parser.add_argument("--out", default=HERE, help="where RESULTS.md and results.jsonl go")
    parser.add_argument("--time-limit", type=float, default=32 * 60,
                        help="start no cell after this many seconds")
    args = parser.parse_args(argv)
    for name in ("servers", "once_servers", "extra_servers", "cross_servers", "apps", "workloads"):
        setattr(args, name, [x for x in getattr(args, name).split(",") if x])
    if args.quick:                          # one repetition of everything, everywhere, small
        args.reps = 1
        args.servers, args.once_servers, args.extra_servers = SERVERS, [], SERVERS
    return args


def run(args):
    """The whole matrix; the result dicts, also written as JSON lines as they come."""
    env = served_env(args.comet)
    stores = Stores()
    logdir = tempfile.mkdtemp(prefix="comet-bench-logs-")
    run_id = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    started = time.monotonic()
    results = []
    jsonl = os.path.join(args.out, "results.jsonl")
    with open(jsonl, "w") as out:
        try:
            for rep in range(1, args.reps + 1):
                for kind, server, app, s in plan(args, rep):
                    if time.monotonic() - started > args.time_limit:
                        print("time limit reached: no more cells", flush=True)
                        break
                    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
                    rooms = cell_rooms(kind, args.rooms)
                    try:
                        lines = run_cell(kind, server, app, s, stores,
                                         dict(env, COMET_BENCH_ROOMS=rooms,
                                              COMET_BENCH_STAMPS="1" if args.stamps else ""),
                                         logdir, args.workloads)
                    except Exception as error:          # one broken cell must not end the run
                        lines = [{"workload": kind, "failed": repr(error)}]
                    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
                    for line in lines:
                        line.update(run=run_id, rep=rep, server=server, app=app, rooms=rooms,
                                    comet=args.comet or "repo", comet_md5=comet_md5(args.comet))
                        if args.stamps:
                            line["stamps"] = True
                        results.append(line)
                        out.write(json.dumps(line) + "\n")
                        out.flush()
                    client = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
                    print(f"rep {rep} {kind:5} {server:8} {app:13} {time.monotonic() - t0:6.1f}s"
                          f" (load generator cpu {client:5.1f}s) "
                          + "; ".join(report.brief(line) for line in lines), flush=True)
        finally:
            stores.close()
            if "comet-mysql" in args.apps:
                with contextlib.suppress(Exception):
                    reset_mysql(drop_only=True)
            if any(app.startswith("comet-postgresql") for app in args.apps):
                with contextlib.suppress(Exception):
                    reset_postgresql(drop_only=True)
            shutil.rmtree(logdir, ignore_errors=True)
    print(f"matrix done in {time.monotonic() - started:.0f}s", flush=True)
    return results


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))    # stop the servers on the way out
    jsonl = os.path.join(args.out, "results.jsonl")
    if args.report:
        with open(jsonl) as file:
            results = [json.loads(line) for line in file if line.strip()]
    else:
        load.raise_open_files()             # 10,000 client sockets
        results = run(args)
    machine = f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} cores"
    command = "python bench/run.py" + (" --quick" if args.quick else "")
    with open(os.path.join(args.out, "RESULTS.md"), "w") as file:
        file.write(report.markdown(results, machine=machine, command=command))
    print(f"wrote {os.path.join(args.out, 'RESULTS.md')} and {jsonl}")


if __name__ == "__main__":
    main()
