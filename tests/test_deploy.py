"""Real deployments on 127.0.0.1 (gunicorn, gevent, nginx), and the package as pip installs it.

- gunicorn ``-k gthread``, 3 workers sharing one SQLite file, then one MySQL
  and one PostgreSQL database: 10 clients, 500 packages pushed while they
  poll, every request on a new connection so the workers take turns (no
  sticky sessions); every client receives exactly its packages, once each, in
  the store's one order.
- gunicorn ``-k gevent``, on SQLite and PostgreSQL: 2,000 polls parked at
  once in one worker, then one push answers all of them; the time and the
  worker's RSS are reported.
- nginx in front of gunicorn: the same delivery, through the proxy.
- a fresh venv: the wheel and ``pip install`` of the repository serve
  ``/scripts/comet.js`` from the installed package.

The application is examples/deploy_app.py (the standard test app's
conventions, so support's ``Client`` speaks to it).  Missing gunicorn, gevent,
nginx, MariaDB or PostgreSQL skip loudly, and fail under CI=true.
"""
import contextlib
import hashlib
import importlib.util
import json
import os
import random
import resource
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import zipfile

import pytest

import comet
from support import (Client, cursor_position, free_port, fresh_store, need, need_gevent,
                     positions_in_store, query_store, wait_until)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository
EXAMPLES = os.path.join(ROOT, "examples")
NGINX = "/usr/sbin/nginx"
POLL_TIMEOUT = 5.0                  # what deploy_app holds a poll for in the delivery tests


class _Lines(list):
    def append(self, line):
        print("test_deploy: " + line)
        super().append(line)


@pytest.fixture(scope="module")
def report(request):
    """Lines for the end of the run: the figures measured here.  Each is printed by
    its test too, shown with its output (-rA) where no terminal is at hand (pytest-xdist)."""
    lines = _Lines()
    yield lines
    plugins = request.config.pluginmanager
    terminal, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if terminal and capture and lines:
        with capture.global_and_fixture_disabled():
            terminal.write_line("")
            for line in lines:
                terminal.write_line("test_deploy: " + line)


# --------------------------------------------------------------------------
# Servers: gunicorn and nginx as processes of this test
# --------------------------------------------------------------------------

class Gunicorn:
    """``gunicorn deploy_app:application`` on a free port of 127.0.0.1."""

    def __init__(self, directory, store, worker_class, workers, *options,
                 poll_timeout=POLL_TIMEOUT):
        need(importlib.util.find_spec("gunicorn") is not None,
             "gunicorn is not installed (pip install '.[test]')")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.log_path = os.path.join(directory, f"gunicorn-{self.port}.log")
        self.args = [sys.executable, "-m", "gunicorn", "deploy_app:application",
                     "--bind", f"127.0.0.1:{self.port}", "-k", worker_class,
                     "--workers", str(workers), "--chdir", EXAMPLES,
                     "--graceful-timeout", "2", "--log-level", "info", *options]
        from gunicorn.config import KNOWN_SETTINGS
        if any(setting.name == "control_socket_disable" for setting in KNOWN_SETTINGS):
            self.args.append("--no-control-socket")     # gunicorn 24+: one shared socket path
        self.env = dict(os.environ, PYTHONPATH=ROOT, COMET_STORE=store,
                        COMET_POLL_TIMEOUT=str(poll_timeout))
        self.proc = None

    def start(self):
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=log)
        wait_until(self._booted, timeout=30, interval=0.05)
        wait_until(self._answers, timeout=30, interval=0.05)
        return self

    def _booted(self):
        assert self.proc.poll() is None, "gunicorn exited:\n" + self.log()
        return self.log().count("Booting worker with pid") >= self.workers

    def _answers(self):
        try:
            return self.stats()
        except OSError:
            return None

    def log(self):
        with open(self.log_path, errors="replace") as file:
            return file.read()

    def stats(self):
        """``/stats`` of whichever worker takes the connection."""
        status, _, answer = Client(self.url, "stats").request("GET", "/stats", timeout=5)
        assert status == 200, (status, answer)
        return answer

    def stop(self):
        served = self.log()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)        # quick shutdown, parked polls too
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        assert "Traceback" not in served, served
        # Shutting down, a gevent worker may log its own exit (gunicorn's SystemExit met in
        # gevent's thread shutdown); a traceback through the application still fails.
        stopping = self.log()[len(served):]
        assert not any(name in stopping for name in ("comet.py", "deploy_app")), stopping

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


NGINX_CONF = """\
daemon off;
worker_processes 1;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_buffering off;
            proxy_read_timeout {read_timeout}s;
        }}
    }}
}}
"""


class Nginx:
    """nginx in the foreground with its config, pid, logs and temp files in ``directory``."""

    def __init__(self, directory, upstream_port, read_timeout):
        need(os.access(NGINX, os.X_OK), f"{NGINX} is missing (apt-get install nginx)")
        self.dir = os.path.join(directory, "nginx")
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.conf = os.path.join(self.dir, "nginx.conf")
        with open(self.conf, "w") as file:
            file.write(NGINX_CONF.format(
                dir=self.dir, port=self.port, upstream=upstream_port,
                read_timeout=int(read_timeout),
                # As root, nginx's workers would run as nobody and miss this private temp dir.
                user="user root;" if os.geteuid() == 0 else ""))
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([NGINX, "-p", self.dir, "-c", self.conf,
                                      "-e", os.path.join(self.dir, "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._listens, timeout=15, interval=0.05)
        return self

    def _listens(self):
        assert self.proc.poll() is None, "nginx exited: " + self.errors()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def errors(self):
        with contextlib.suppress(OSError), open(os.path.join(self.dir, "error.log")) as file:
            return file.read()
        return ""

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# --------------------------------------------------------------------------
# The stores
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('deploy')}/comet.db"


@pytest.fixture(scope="module")
def gthread_sqlite(sqlite_store, tmp_path_factory):
    """gunicorn -k gthread, 3 workers on one SQLite file, for the direct and nginx tests."""
    with Gunicorn(str(tmp_path_factory.mktemp("gunicorn")), sqlite_store, "gthread", 3,
                  "--threads", "32") as server:
        yield server


@pytest.fixture
def store(request, tmp_path):
    """A new store of the kind the test is parametrized with (a database of its own
    on MariaDB and PostgreSQL, dropped with the module)."""
    return fresh_store(request.param, request, tmp_path)


# --------------------------------------------------------------------------
# Delivery: 10 clients, 500 packages, every request a new connection
# --------------------------------------------------------------------------

class Delivery:
    """What a run of ``deliver`` saw."""

    def __init__(self, clients, packages):
        self.clients = clients
        self.packages = packages
        self.expected = {client: [p["_stamp"] for p in packages if client in p["to"]]
                         for client in clients}
        self.received = {client: [] for client in clients}     # stamps in arrival order
        self.windows = {client: [] for client in clients}      # (after, cursor, stamps, worker)
        self.refused = []                                      # (stamp, status, answer) given up
        self.retried = {}                                      # stamp -> statuses before its last
        self.accepted_by = {}                                  # stamp -> the worker that said 200
        self.workers = {"push": set(), "poll": set()}          # X-Worker pids seen
        self.errors = []
        self.seconds = 0.0


def deliver(url, clients=10, count=500, pushers=5, deadline=60.0, headers=()):
    """Push ``count`` packages, each to 1-3 of ``clients`` (listener ``to``), from
    ``pushers`` threads while every client polls with its latest cursor; then one
    last package to all, which must come alone: nothing is left over."""
    tag = secrets.token_hex(4)
    rng = random.Random(tag)
    ids = [f"c{n}-{tag}" for n in range(clients)]
    packages = [{"type": "load", "listeners": ["to"], "to": rng.sample(ids, rng.randint(1, 3)),
                 "n": n, "_stamp": f"p{n:04d}-{tag}"} for n in range(count)]
    run = Delivery(ids, packages)
    cursors = {client: Client(url, client).poll()["cursor"] for client in ids}
    end = time.monotonic() + deadline

    def guarded(work):
        def go(*args):
            try:
                work(*args)
            except BaseException as error:       # reported by the test's thread
                run.errors.append(error)
        return go

    def push(index):
        sender = Client(url, f"pusher{index}-{tag}")
        for package in packages[index::pushers]:
            for _ in range(20):                 # retry what the server says to retry
                status, answer_headers, answer = sender.push(package, headers=headers, timeout=20)
                run.workers["push"].add(answer_headers.get("X-Worker"))
                if status not in (429, 503) or time.monotonic() > end:
                    break
                run.retried.setdefault(package["_stamp"], []).append((status, answer))
                time.sleep(0.05)
            if status != 200:
                run.refused.append((package["_stamp"], status, answer))
            else:
                run.accepted_by[package["_stamp"]] = answer_headers.get("X-Worker")

    def poll(client):
        poller = Client(url, client)
        poller.cursor = cursors[client]
        while len(run.received[client]) < len(run.expected[client]) and time.monotonic() < end:
            after = poller.cursor
            query = "?cursor=" + urllib.parse.quote(after)
            status, answer_headers, answer = poller.request(
                "GET", "/comet/poll" + query, timeout=POLL_TIMEOUT + 20)
            assert status == 200 and not answer["reset"], (status, answer)
            run.workers["poll"].add(answer_headers.get("X-Worker"))
            poller.cursor = answer["cursor"]
            stamps = [package["_stamp"] for package in answer["packages"]]
            run.windows[client].append((after, answer["cursor"], stamps,
                                        answer_headers.get("X-Worker")))
            run.received[client] += stamps
        cursors[client] = poller.cursor

    started = time.monotonic()
    threads = [threading.Thread(target=guarded(poll), args=(c,)) for c in ids]
    threads += [threading.Thread(target=guarded(push), args=(i,)) for i in range(pushers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()) + POLL_TIMEOUT + 25)
    run.seconds = time.monotonic() - started
    assert not any(thread.is_alive() for thread in threads), "the delivery did not finish"
    last = {"type": "last", "listeners": ["to"], "to": ids, "_stamp": f"last-{tag}"}
    assert Client(url, f"pusher0-{tag}").push(last, headers=headers)[0] == 200
    for client in ids:
        answer = Client(url, client).poll(cursor=cursors[client], timeout=POLL_TIMEOUT + 20)
        run.received[client] += [package["_stamp"] for package in answer["packages"]]
    return run


def assert_delivered(run, store, server_log=None):
    """Each client got exactly its packages, once each, in the store's order, and
    every answer held only packages after its cursor and at or before the next.
    ``server_log``: the gunicorn log, whose comet lines a failure report quotes."""
    assert not run.errors, run.errors
    assert not run.refused, run.refused[:5]
    position = positions_in_store(store)
    for client in run.clients:
        got = run.received[client]
        assert got and got[-1].startswith("last-") and got.count(got[-1]) == 1, \
            f"{client}: something was left over after its packages: {got[-3:]}"
        got = got[:-1]
        assert len(got) == len(set(got)), f"{client} received a package twice"
        assert sorted(got) == sorted(run.expected[client]), \
            lost_or_gained(run, client, position, store, server_log)
        order = [position[stamp] for stamp in got]
        assert order == sorted(order), f"{client} received packages out of the store's order"
        for after, cursor, stamps, _ in run.windows[client]:
            low, high = cursor_position(after), cursor_position(cursor)
            assert all(low < position[s] <= high for s in stamps), (client, after, cursor)


def lost_or_gained(run, client, position, store, server_log=None):
    """What a client lost or gained: each such package's position in the store (None:
    not stored) and the recipients of its delivery rows there, the worker that
    accepted it and the answers its push had before, and the poll answers whose
    windows hold or border it, with the worker of each; then the comet lines of
    the server's log."""
    got, expected = set(run.received[client][:-1]), set(run.expected[client])    # not last-
    lines = [f"{client} lost or gained packages"]
    for stamp in sorted((expected - got) | (got - expected)):
        at = position.get(stamp)
        windows = [(after, cursor, len(stamps), worker)
                   for after, cursor, stamps, worker in run.windows[client]
                   if at is not None
                   and cursor_position(after) - 2 <= at <= cursor_position(cursor) + 2]
        lines.append(f"  {'lost' if stamp in expected else 'gained'} {stamp} at {at};"
                     f" answers around it (after, cursor, packages, worker): {windows};"
                     f" delivery rows to {recipients(store, at)};"
                     f" accepted by {run.accepted_by.get(stamp)},"
                     f" answered before that: {run.retried.get(stamp, [])}")
    lines.append(f"  pushes retried: {len(run.retried)}")
    if server_log is not None:
        with open(server_log, errors="replace") as log:
            said = [line.rstrip() for line in log if line.startswith("comet:")]
        lines += ["  the server's log said:"] + [f"    {line}" for line in said[-20:]]
    return "\n".join(lines)


def recipients(store, at):
    """The recipients of the delivery rows at position ``at`` (None: no position)."""
    if at is None:
        return None
    rows = query_store(store, f"SELECT recipient FROM comet_deliveries WHERE pos = {int(at)}")
    return sorted(comet._text(row[0]) for row in rows)      # MySQL's are bytes


def test_gthread_workers_on_one_sqlite_file_deliver_each_package_once_in_order(
        gthread_sqlite, sqlite_store, report):
    run = deliver(gthread_sqlite.url)
    assert_delivered(run, sqlite_store, gthread_sqlite.log_path)
    assert len(run.workers["push"]) == len(run.workers["poll"]) == 3, run.workers
    report.append(f"gthread x3 on SQLite: 500 packages to 10 clients in {run.seconds:.1f} s")


@pytest.mark.parametrize("store", ["mysql", "postgresql"], indirect=True)
def test_gthread_workers_on_a_database_server_deliver_each_package_once_in_order(
        store, tmp_path, report):
    with Gunicorn(str(tmp_path), store, "gthread", 3, "--threads", "32") as server:
        run = deliver(server.url)
    assert_delivered(run, store, server.log_path)
    assert len(run.workers["push"]) == len(run.workers["poll"]) == 3, run.workers
    report.append(f"gthread x3 on {store.partition(':')[0]}: 500 packages to 10 clients"
                  f" in {run.seconds:.1f} s")


def test_nginx_in_front_of_gunicorn_delivers_each_package_once_in_order(
        gthread_sqlite, sqlite_store, tmp_path, report):
    with Nginx(str(tmp_path), gthread_sqlite.port, read_timeout=POLL_TIMEOUT + 30) as nginx:
        # A browser's push carries its Origin: nginx must pass the Host it was asked for.
        run = deliver(nginx.url, headers={"Origin": nginx.url})
        errors = nginx.errors()
    assert_delivered(run, sqlite_store, gthread_sqlite.log_path)
    assert len(run.workers["push"]) == 3, run.workers
    assert "upstream timed out" not in errors, errors
    report.append(f"nginx -> gthread x3 on SQLite: 500 packages to 10 clients"
                  f" in {run.seconds:.1f} s")


# --------------------------------------------------------------------------
# gevent: 2,000 parked polls in one worker
# --------------------------------------------------------------------------

PARKED = 2000


def raise_fd_limit(needed):
    """Let this process (and the gunicorn it starts) hold ``needed`` descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        need(os.geteuid() == 0, f"the fd limit {hard} is below {needed} and this is not root")
        hard = needed
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def rss_mib(pid):
    """``(VmRSS, VmHWM)`` of a process, in MiB."""
    with open(f"/proc/{pid}/status") as file:
        fields = dict(line.split(":", 1) for line in file)
    return tuple(int(fields[name].split()[0]) / 1024 for name in ("VmRSS", "VmHWM"))


def send_polls(port, ids, cursor):
    """A raw HTTP poll per id, each on its own connection; returns the sockets."""
    sockets = []
    for client in ids:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sockets.append(sock)
        sock.sendall((f"GET /comet/poll?cursor={cursor} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                      f"X-Client: {client}\r\nConnection: close\r\n\r\n").encode())
    return sockets


def read_answers(sockets, timeout):
    """``[(status, json body)]`` of each socket, read until the server closes it."""
    selector = selectors.DefaultSelector()
    data = {}
    for sock in sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        data[sock] = bytearray()
    deadline = time.monotonic() + timeout
    open_ = len(sockets)
    while open_ and time.monotonic() < deadline:
        for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
            chunk = key.fileobj.recv(65536)
            if chunk:
                data[key.fileobj] += chunk
            else:
                selector.unregister(key.fileobj)
                open_ -= 1
    selector.close()
    answers = []
    for sock in sockets:
        head, _, body = bytes(data[sock]).partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head else None
        answers.append((status, json.loads(body) if status == 200 else body))
    return answers


@pytest.mark.parametrize("store", ["sqlite", "postgresql"], indirect=True)
def test_one_gevent_worker_holds_2000_parked_polls_and_one_push_answers_all(
        store, tmp_path, report):
    need_gevent()
    raise_fd_limit(2 * PARKED + 1000)
    tag = secrets.token_hex(3)
    ids = [f"g{n}-{tag}" for n in range(PARKED)]
    with Gunicorn(str(tmp_path), store, "gevent", 1,
                  "--worker-connections", str(PARKED + 1000), poll_timeout=60) as server:
        pid = server.stats()["pid"]
        cursor = Client(server.url, "first").poll()["cursor"]   # the head: a start for anyone
        baseline = rss_mib(pid)[0]
        started = time.monotonic()
        sockets = send_polls(server.port, ids, cursor)
        try:
            wait_until(lambda: server.stats()["parked"] == PARKED, timeout=60, interval=0.1)
            parked_after = time.monotonic() - started
            parked_rss = rss_mib(pid)[0]
            pushed = time.monotonic()
            status, _, answer = Client(server.url, "pusher").push(
                {"type": "all", "listeners": ["to"], "to": ids, "_stamp": f"everyone-{tag}"})
            push_took = time.monotonic() - pushed
            answers = read_answers(sockets, timeout=30)
            answered_after = time.monotonic() - pushed
        finally:
            for sock in sockets:
                sock.close()
        peak_rss = rss_mib(pid)[1]
    assert status == 200, answer
    assert [(s, [p["_stamp"] for p in a["packages"]]) if s == 200 else (s, a) for s, a in answers] \
        == [(200, [f"everyone-{tag}"])] * PARKED
    kind = store.partition(":")[0]
    report.append(f"gevent, 1 worker, {kind}: {PARKED} polls parked in {parked_after:.1f} s;"
                  f" one push answered in {push_took:.2f} s and all {PARKED} polls had it "
                  f"{answered_after:.2f} s after it was sent")
    report.append(f"gevent worker RSS, {kind}: {baseline:.0f} MiB idle, {parked_rss:.0f} MiB with "
                  f"{PARKED} parked ({(parked_rss - baseline) * 1024 / PARKED:.0f} KiB a poll), "
                  f"peak {peak_rss:.0f} MiB")


# --------------------------------------------------------------------------
# Packaging: what pip installs carries the client script
# --------------------------------------------------------------------------

CHECK_INSTALLED = """\
import hashlib, comet
answer = []
body = b"".join(comet.Comet(None)({"PATH_INFO": "/scripts/comet.js", "REQUEST_METHOD": "GET"},
                                  lambda status, headers: answer.append(status)))
print(comet.__file__, answer[0], hashlib.sha256(body).hexdigest())
"""


def test_the_installed_package_serves_the_client_script(tmp_path):
    need(importlib.util.find_spec("ensurepip") is not None, "python has no ensurepip for a venv")
    venv, outside = tmp_path / "venv", tmp_path / "elsewhere"
    outside.mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "--disable-pip-version-check", "-q"]
    with open(os.path.join(ROOT, "comet_client.js"), "rb") as file:
        script_sha = hashlib.sha256(file.read()).hexdigest()

    def serves_the_script():
        out = subprocess.run([python, "-I", "-c", CHECK_INSTALLED], cwd=outside, check=True,
                             capture_output=True, text=True, timeout=60).stdout.split()
        assert out[0].startswith(str(venv)) and "site-packages" in out[0], out
        assert out[1:] == ["200", "OK", script_sha], out

    subprocess.run(pip + ["wheel", "--no-deps", "-w", str(tmp_path / "dist"), ROOT],
                   check=True, timeout=300, cwd=outside)
    [wheel] = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert {n for n in archive.namelist() if ".dist-info/" not in n} == \
            {"comet.py", "comet_client.js"}
    subprocess.run(pip + ["install", "--no-deps", str(wheel)], check=True, timeout=300, cwd=outside)
    serves_the_script()
    subprocess.run(pip + ["uninstall", "-y", "comet-py"], check=True, timeout=120, cwd=outside)
    subprocess.run(pip + ["install", "--no-deps", ROOT], check=True, timeout=300, cwd=outside)
    serves_the_script()
