"""Shared test support: real servers on 127.0.0.1, in a thread or in a process.

``python tests/support.py --store URL --port N [--poll-timeout S] ...`` serves the
standard test application in its own process (for kill -9 and multi-process
tests).  The standard application:

- the client id is the ``X-Client`` header (so a test can be any client);
- listener ``to``: the recipients are the package's own ``to`` list;
- channel ``room``;
- namespace ``room:``: every ``room:NAME`` is a channel, which a client whose id
  starts with ``guest`` may not join (403 ``rejected``, "guests may not join
  room:NAME");
- ``GET /members?channel=room:NAME``: that channel's members, as this process reads them;
- ``GET /stats``: ``stats()`` of this process, as JSON.

Also here: ``GroupCommit`` (pushes queued behind a held transaction) and the
MariaDB and PostgreSQL helpers.  The fixtures defined here are registered for the modules
under tests/ by tests/conftest.py, and for test_comet.py by its own import.
"""

import argparse
import collections
import contextlib
import http.client
import importlib.util
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import socketserver
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)                # the repository: comet.py, demo.py, examples/
sys.path.insert(0, ROOT)

import comet  # noqa: E402

IN_CI = os.environ.get("CI") == "true"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]


def need(condition, reason):
    """Skip loudly when a real part is missing locally; under CI=true, fail."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(f"SKIPPED LOUDLY: {reason}")


def need_gevent():
    need(importlib.util.find_spec("gevent") is not None,
         "gevent is not installed (pip install '.[test]')")


@contextlib.contextmanager
def chromium():
    """Debian's headless Chromium, driven by playwright (never its own browser download);
    a missing one skips loudly, or fails under CI=true."""
    need(os.access(CHROMIUM, os.X_OK), f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need(False, "the playwright package is not installed")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def wait_until(predicate, timeout=10.0, interval=0.01):
    """Poll ``predicate`` until it returns a true value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        time.sleep(interval)


class Spinner:
    """A thread counting as fast as it can: how much it ran says whether it had the GIL."""

    def __init__(self):
        self.ticks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self):
        while not self._stop.is_set():
            self.ticks += 1

    def __enter__(self):
        self._thread.start()
        wait_until(lambda: self.ticks > 0)
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class Counted:
    """A library function that counts its calls."""

    def __init__(self, function):
        self.function = function
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return self.function(*args)


def inside(thread, function):
    """True while ``thread`` runs inside a function named ``function``."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None and frame.f_code.co_name != function:
        frame = frame.f_back
    return frame is not None


def push_kept_waiting(app, waiting_in, release):
    """A second push to ``app`` (one push stored, its store kept busy by another
    transaction) waits inside the function ``waiting_in`` letting the other threads
    run, and goes through once ``release()`` ends the other transaction."""
    results = []
    pusher = threading.Thread(target=lambda: results.append(app.push(
        {"type": "note", "listeners": ["to"], "to": ["bob"], "text": "second"})))
    with Spinner() as spinner:
        started = time.monotonic()
        pusher.start()
        wait_until(lambda: inside(pusher, waiting_in))
        # Waiting, the push lets the others run: a wait holding the GIL would stop
        # the spinner, and this thread, until the store gave up (SQLite's busy
        # timeout, 5 s) or the other transaction ended (never).
        before = spinner.ticks
        wait_until(lambda: spinner.ticks > before + 100000, timeout=10)
        assert time.monotonic() - started < 1
        # Still waiting there: seen inside it again (between two of its waits, or
        # after the first round trip of a few, the pusher may be just outside it).
        wait_until(lambda: inside(pusher, waiting_in), timeout=5)
        assert results == [] and pusher.is_alive()
        release()
        pusher.join(10)
    assert len(results) == 1 and isinstance(results[0], str)
    assert app.store.head() == 2

def make_app(**options):
    """The standard test application as a ``Comet``."""
    options.setdefault("id", lambda environ: environ.get("HTTP_X_CLIENT"))

    def members(environ, start_response):
        """``GET /members?channel=room:NAME``: that channel's ``{client: sender}``;
        ``GET /stats``: the app's ``stats()``."""
        if environ["PATH_INFO"] == "/stats":
            start_response("200 OK", [("Content-Type", "application/json")])
            return [json.dumps(app.stats()).encode()]
        name = urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).get("channel", [""])[0]
        if environ["PATH_INFO"] != "/members" or name not in rooms:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found"]
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(rooms[name].members()).encode()]

    app = comet.Comet(members, **options)

    @app.listener("to")
    def to(environ, package, db):
        return package.get("to", [])

    def no_guests(environ, db, channel):
        if environ["comet.id"].startswith("guest"):
            raise comet.Reject(f"guests may not join {channel}")
        return True

    app.channel("room")
    rooms = app.channels("room:", may_join=no_guests)
    return app


@pytest.fixture(autouse=True)
def close_apps(monkeypatch):
    """Close every ``Comet`` the test made (its threads, connections and LISTEN), so
    that none goes on working against a database dropped after the test."""
    made = []
    init = comet.Comet.__init__

    def recorded(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)
    monkeypatch.setattr(comet.Comet, "__init__", recorded)
    yield
    for app in made:
        app.close()


class CountedTurn:
    """A batch's turn (its lock) that notes the name of every thread that waits for it:
    a part that waits has joined the batch, and takes its turn in it."""

    def __init__(self, lock):
        self.lock = lock
        self.waited = set()

    def enter(self):
        self.waited.add(threading.current_thread().name)

    def acquire(self, blocking=True, timeout=-1):
        self.enter()
        return self.lock.acquire(blocking, timeout)

    def release(self):
        self.lock.release()


class GroupCommit:
    """Pushes queued behind one held in its hook, on a durable store (SQLite, MySQL
    or PostgreSQL).

    The application has an action ``note`` whose submit hook writes the
    package's ``text`` into the table ``log`` through ``db`` (``mark`` is the
    driver's placeholder), holds the push whose text starts with ``hold`` until
    ``release()``, and refuses the texts ``refused`` and ``hold-refused``.
    ``flushes`` lists how many packages each commit wrote (those that wrote none
    left out), ``commits`` the positions each call of the store's ``on_commit``
    named.  ``batch`` is the held push's batch, ``turn`` its ``CountedTurn``: ``wait_queued(names)``
    waits until the threads of those names joined the held batch, whatever else
    (housekeeping) joins it or not.
    """

    def __init__(self, url, mark):
        self.url = url
        self.app = make_app(store=url, poll_timeout=0.2)
        self.held, self.released = threading.Event(), threading.Event()
        self.batch = self.turn = None
        self.results = {}
        self.flushes = []
        store = self.app.store
        flush = store._flush

        def counted(batch):
            if batch.pending:               # not the housekeeping's own transactions
                self.flushes.append(len(batch.pending))
            return flush(batch)
        store._flush = counted
        self.commits = []                   # the positions each on_commit call named
        on_commit = store.on_commit

        def recorded(appended):
            self.commits.append([position for position, _, _ in appended])
            return on_commit(appended)
        store.on_commit = recorded

        @self.app.action("note").on_submit
        def submit(package, private, db, environ):
            db.cursor().execute(f"INSERT INTO log (text) VALUES ({mark})", (package["text"],))
            if package["text"].startswith("hold"):
                self.batch = store._local.batch     # the parts behind wait for its turn
                self.turn = self.batch.turn = CountedTurn(self.batch.turn)
                self.held.set()
                assert self.released.wait(10)
            if package["text"] in ("refused", "hold-refused"):
                raise comet.Reject("no")

    def push(self, text):
        """Push ``text`` to bob in a thread; its outcome lands in ``results[text]``."""
        def run():
            try:
                self.results[text] = self.app.push(
                    {"type": "note", "listeners": ["to"], "to": ["bob"], "text": text})
            except comet.CometError as error:
                self.results[text] = error.status
        thread = threading.Thread(target=run, name=f"push {text}")
        thread.start()
        return thread

    def wait_queued(self, names):
        """Wait until the threads named ``names`` wait for their turn in the held batch."""
        names = set(names)
        wait_until(lambda: names <= self.turn.waited)

    def run(self, first, *queued):
        """``first`` holds its transaction open until ``queued`` wait behind it; then all go."""
        threads = [self.push(first)]
        assert self.held.wait(10)
        threads += [self.push(text) for text in queued]
        self.wait_queued(thread.name for thread in threads[1:])
        self.released.set()
        for thread in threads:
            thread.join(10)
        return self.results

    def delivered(self):
        answer = self.app.store.read("bob", 0, 100)[1]
        return [json.loads(body)["text"] for _, _, body in answer]


def open_group(kind, request, tmp_path):
    """A ``GroupCommit`` on a fresh SQLite file, MariaDB or PostgreSQL database, with its
    ``log`` table, ``log()`` (its texts, sorted) and ``driver_error`` (one meaning
    "unavailable")."""
    if kind == "sqlite":
        path = f"{tmp_path}/comet.db"
        group = GroupCommit(f"sqlite:///{path}", "?")
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("CREATE TABLE log (text TEXT)")

        def log():
            with contextlib.closing(sqlite3.connect(path)) as db:
                return sorted(row[0] for row in db.execute("SELECT text FROM log"))
        group.driver_error = sqlite3.OperationalError("disk I/O error")
    elif kind == "postgresql":
        import psycopg
        postgres = request.getfixturevalue("postgres")
        url = postgres.create_database()
        postgres.query(url, "CREATE TABLE log (text VARCHAR(64))")
        group = GroupCommit(url, "%s")

        def log():
            return sorted(row[0] for row in postgres.query(url, "SELECT text FROM log"))
        group.driver_error = psycopg.OperationalError("server closed the connection unexpectedly")
    else:
        import pymysql
        mariadb = request.getfixturevalue("mariadb")
        url = mariadb.create_database()    # its own: bob's inbox holds only this test's
        group = GroupCommit(url, "%s")
        mariadb.query(url, "CREATE TABLE log (text VARCHAR(64)) ENGINE=InnoDB")

        def log():
            return sorted(row[0] for row in mariadb.query(url, "SELECT text FROM log"))
        group.driver_error = pymysql.err.OperationalError(
            2013, "Lost connection to MySQL server during query")
    group.log = log
    return group


@pytest.fixture(params=["sqlite", "mysql", "postgresql"])
def group(request, tmp_path):
    group = open_group(request.param, request, tmp_path)
    yield group
    group.app.close()


def hooked_traffic(group, pushers=8, each=25, deadline=60.0):
    """``pushers`` real HTTP clients pushing ``each`` notes at once to bob through a
    threaded server on ``group``'s app, every fifth refused by its hook (after the
    hook wrote to ``log``), then one package of type ``end``.  Returns ``(statuses,
    received)``: each note's status, and the labels of what bob received, in order,
    over a cursor that never goes back, until the ``end`` package (``"end"``) and one
    poll after it."""
    statuses = {}
    with ThreadedServer(group.app) as server:
        bob = Client(server.url, "bob")
        bob.poll()

        def push_all(k):
            client = Client(server.url, f"pusher{k}")
            for i in range(each):
                text = f"{k}-{i}" if i % 5 else f"refused {k}-{i}"
                statuses[text] = client.push({"type": "note", "listeners": ["to"], "to": ["bob"],
                                              "text": "refused" if i % 5 == 0 else text,
                                              "label": text})[0]
        threads = [threading.Thread(target=push_all, args=(k,)) for k in range(pushers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(deadline)
        status, _, _ = Client(server.url, "closer").push({"type": "end", "listeners": ["to"],
                                                        "to": ["bob"]})
        assert status == 200
        received = []
        limit = time.monotonic() + deadline
        while "end" not in received and time.monotonic() < limit:
            received += [p.get("label", p["type"]) for p in bob.poll(timeout=10)["packages"]]
        received += [p.get("label", p["type"]) for p in bob.poll(timeout=10)["packages"]]
    return statuses, received


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 1024


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


class ThreadedServer:
    """A WSGI app on a real threaded wsgiref server on 127.0.0.1, in this process."""

    def __init__(self, app):
        self.httpd = make_server("127.0.0.1", 0, app, server_class=_ThreadingServer,
                                 handler_class=_QuietHandler)
        self.port = self.httpd.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class Client:
    """A real HTTP client speaking the comet protocol as one client id."""

    def __init__(self, base_url, client_id, prefix="/comet"):
        parts = urllib.parse.urlsplit(base_url)
        self.host, self.port = parts.hostname, parts.port
        self.id = client_id
        self.prefix = prefix
        self.cursor = None

    def request(self, method, path, body=None, headers=(), timeout=30):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            all_headers = {"X-Client": self.id, **dict(headers)}
            if body is not None:
                body = json.dumps(body).encode()
                all_headers.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=body, headers=all_headers)
            response = conn.getresponse()
            data = response.read()
            return response.status, dict(response.getheaders()), json.loads(data) if data else None
        finally:
            conn.close()

    def push(self, package, **kwargs):
        return self.request("POST", self.prefix + "/push", package, **kwargs)

    def poll(self, cursor=None, timeout=30):
        cursor = self.cursor if cursor is None else cursor
        query = "" if cursor is None else "?cursor=" + urllib.parse.quote(cursor)
        status, _, answer = self.request("GET", self.prefix + "/poll" + query, timeout=timeout)
        assert status == 200, (status, answer)
        self.cursor = answer["cursor"]
        return answer


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python tests/support.py`` serving the standard test app in its own process."""

    def __init__(self, store, port=None, **options):
        self.store = store
        self.port = port or free_port()
        self.options = options
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self):
        args = [sys.executable, os.path.join(HERE, "support.py"),
                "--store", self.store, "--port", str(self.port)]
        for name, value in self.options.items():
            args += ["--" + name.replace("_", "-"), str(value)]
        self.proc = subprocess.Popen(args, cwd=ROOT)
        wait_until(self._answers, timeout=15)
        return self

    def _answers(self):
        assert self.proc.poll() is None, "the server process died"
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def kill(self):
        """kill -9: no cleanup, no flush."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# --------------------------------------------------------------------------
# MariaDB (test_sql_servers.py, and the fixtures over every durable store)
# --------------------------------------------------------------------------

HOST, PORT, USER = "127.0.0.1", 3306, "root"


def _connect(database=None):
    import pymysql
    return pymysql.connect(host=HOST, port=PORT, user=USER, password="", database=database,
                           autocommit=True, connect_timeout=2)


class MariaDB:
    """The local MariaDB as root: throwaway databases, queries, a stop and a start."""

    kind = "mysql"
    restart_needs = "root, start-stop-daemon and /usr/sbin/mariadbd"

    def __init__(self):
        self.databases = []
        self.users = []

    @staticmethod
    def reachable():
        try:
            _connect().close()
        except Exception:
            return False
        return True

    def create_database(self):
        """A fresh empty database; returns its ``mysql://`` store URL."""
        name = "comet_test_" + secrets.token_hex(6)
        self._run(None, f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        self.databases.append(name)
        return f"mysql://{USER}@{HOST}:{PORT}/{name}"

    def with_password(self, url):
        """``(url, password)``: the store ``url`` as a new user of its own, who logs in
        with a fresh password only (dropped with the databases)."""
        parts = urllib.parse.urlsplit(url)
        user, password = "comet_user_" + secrets.token_hex(4), "pw-" + secrets.token_hex(8)
        self._run(None, f"CREATE USER '{user}'@'{HOST}' IDENTIFIED BY %s", (password,))
        self.users.append(user)
        self._run(None, f"GRANT ALL ON `{parts.path.lstrip('/')}`.* TO '{user}'@'{HOST}'")
        return f"mysql://{user}:{password}@{HOST}:{PORT}{parts.path}", password

    def drop_databases(self):
        with contextlib.closing(_connect()) as conn, conn.cursor() as cur:
            # A transaction a failed test left open fails the drop, instead of hanging it.
            cur.execute("SET SESSION lock_wait_timeout = 30")
            for name in self.databases:
                cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
            for user in self.users:
                cur.execute(f"DROP USER IF EXISTS '{user}'@'{HOST}'")
        self.databases = []
        self.users = []

    def query(self, url, sql, args=()):
        """Rows of ``sql`` run in the database of store ``url``."""
        return self._run(urllib.parse.urlsplit(url).path.lstrip("/"), sql, args)

    def _run(self, database, sql, args=()):
        with contextlib.closing(_connect(database)) as conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()

    def tables(self, url):
        return {row[0] for row in self.query(url, "SHOW TABLES")}

    def lock_waits(self, url):
        """Transactions waiting for a lock now."""
        return self.query(url, "SELECT COUNT(*) FROM information_schema.INNODB_TRX"
                               " WHERE trx_state = 'LOCK WAIT'")[0][0]

    @staticmethod
    def connection_type():
        import pymysql
        return pymysql.connections.Connection

    # Stopping the server: by the pid in its own pid file, never by name.

    def can_restart(self):
        return os.geteuid() == 0 and bool(shutil.which("start-stop-daemon")) \
            and os.access("/usr/sbin/mariadbd", os.X_OK)

    def stop(self):
        """Stop mariadbd and wait until its process is gone."""
        pid_file = self._run(None, "SELECT @@pid_file")[0][0]
        with open(pid_file) as file:
            pid = file.read().strip()
        subprocess.run(["start-stop-daemon", "--stop", "--oknodo", "--retry", "10",
                        "--pid", pid, "--exec", "/usr/sbin/mariadbd"], check=True, timeout=30)

    def start(self):
        """Start mariadbd and wait until it accepts connections."""
        subprocess.run(["start-stop-daemon", "--start", "--oknodo", "--background",
                        "--exec", "/usr/sbin/mariadbd"], check=True, timeout=30)
        wait_until(self.reachable, timeout=30, interval=0.05)


@pytest.fixture(scope="module")
def mariadb():
    if not MariaDB.reachable():
        need(False, "MariaDB not reachable on 127.0.0.1:3306")
    server = MariaDB()
    yield server
    server.drop_databases()


def query_store(url, sql, mariadb=None):
    """Rows of ``sql`` (no parameters) in the store at ``url`` (sqlite, mysql or postgresql)."""
    if url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(url[len("sqlite:///"):],
                                                isolation_level=None)) as conn:
            return conn.execute(sql).fetchall()
    if url.startswith("postgresql://"):
        return PostgreSQL().query(url, sql)
    return (mariadb or MariaDB()).query(url, sql)


def positions_in_store(url, mariadb=None):
    """``{stamp: position}`` of every package in the store at ``url`` (sqlite, mysql
    or postgresql)."""
    rows = query_store(url, "SELECT pos, stamp FROM comet_packages", mariadb)
    return {comet._text(stamp): pos for pos, stamp in rows}    # MySQL keeps stamps as bytes


# --------------------------------------------------------------------------
# PostgreSQL (test_postgresql.py, and the fixtures over every durable store)
# --------------------------------------------------------------------------

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"


class PostgreSQL:
    """The local PostgreSQL as postgres: throwaway databases, queries, a stop and a
    start; the methods of ``MariaDB``."""

    kind = "postgresql"
    restart_needs = "root and pg_ctlcluster"

    def __init__(self):
        self.databases = []

    @staticmethod
    def _connect(database="postgres"):
        import psycopg
        return psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=database,
                               autocommit=True, connect_timeout=2)

    @classmethod
    def reachable(cls):
        try:
            cls._connect().close()
        except Exception:
            return False
        return True

    def create_database(self):
        """A fresh empty database; returns its ``postgresql://`` store URL."""
        name = "comet_test_" + secrets.token_hex(6)
        self._run("postgres", f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"

    def with_password(self, url):
        """``(url, password)``: the store ``url`` with a fresh password in it (the local
        server trusts 127.0.0.1 and takes any)."""
        password = "pw-" + secrets.token_hex(8)
        return url.replace(f"//{PG_USER}@", f"//{PG_USER}:{password}@", 1), password

    def drop_databases(self):
        for name in self.databases:
            self._run("postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.databases = []

    def query(self, url, sql, args=()):
        """Rows of ``sql`` run in the database of store ``url`` ([] when it returns none)."""
        return self._run(urllib.parse.urlsplit(url).path.lstrip("/"), sql, args)

    def _run(self, database, sql, args=()):
        with contextlib.closing(self._connect(database)) as conn:
            cur = conn.execute(sql, args)
            return cur.fetchall() if cur.description else []

    def tables(self, url):
        return {row[0] for row in self.query(
            url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}

    def lock_waits(self, url):
        """Sessions of the store's database waiting for a lock now."""
        return self.query(url, "SELECT COUNT(*) FROM pg_stat_activity WHERE"
                               " datname = current_database() AND wait_event_type = 'Lock'")[0][0]

    @staticmethod
    def connection_type():
        import psycopg
        return psycopg.Connection

    # Stopping the server: pg_ctlcluster, the cluster named in /etc/postgresql.

    @staticmethod
    def _cluster():
        """pg_ctlcluster's command line for the newest cluster ``main``, or None."""
        if not os.path.isdir("/etc/postgresql"):
            return None
        versions = sorted(os.listdir("/etc/postgresql"), key=float)     # "9.6", "15"
        if not versions:
            return None
        return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main"]

    def can_restart(self):
        return os.geteuid() == 0 and bool(shutil.which("pg_ctlcluster")) and bool(self._cluster())

    def stop(self, mode="immediate"):
        """Stop the server (``immediate``: as a crash would, recovered from the WAL at start)."""
        subprocess.run(self._cluster() + ["stop", "--mode", mode], check=True, timeout=60)

    def start(self):
        """Start the server and wait until it accepts connections."""
        if not self.reachable():
            subprocess.run(self._cluster() + ["start"], check=True, timeout=60)
        wait_until(self.reachable, timeout=60, interval=0.05)


@pytest.fixture(scope="module")
def postgres():
    if not PostgreSQL.reachable():
        need(False, "PostgreSQL not reachable on 127.0.0.1:5432 as postgres"
                    " (pg_ctlcluster --skip-systemctl-redirect 15 main start; pip install psycopg)")
    server = PostgreSQL()
    yield server
    server.drop_databases()


def answer_from_the_window(monkeypatch):
    """Every ``Comet`` the test makes from now on starts its housekeeping at once and
    is returned only once its window is started, so that its polls are answered from
    the window (as a long-running process's are), not by ``Store.read``."""
    init = comet.Comet.__init__

    def started(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self._window is not None:
            self._start()
            wait_until(lambda: self._window.horizon is not None)
    monkeypatch.setattr(comet.Comet, "__init__", started)


def fresh_store(kind, request, tmp_path):
    """The URL of a new, empty store: ``memory``, ``sqlite``, ``mysql`` or ``postgresql``."""
    if kind == "memory":
        return "memory:"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/comet.db"
    return request.getfixturevalue("mariadb" if kind == "mysql" else "postgres").create_database()


def cursor_position(cursor):
    """The position in a cursor as comet.py writes it, ``<store id>.<position>``."""
    return int(cursor.rpartition(".")[2])


# --------------------------------------------------------------------------
# Traffic: concurrent pushers and pollers against real servers
# --------------------------------------------------------------------------

def plan_packages(clients, count, seed):
    """``count`` packages for listener ``to``, each for 1 to 3 of ``clients``, with stamps."""
    rng = random.Random(seed)
    tag = secrets.token_hex(4)
    return [{"type": "load", "listeners": ["to"], "to": rng.sample(clients, rng.randint(1, 3)),
             "n": n, "_stamp": f"load{n:05d}x{tag}"} for n in range(count)]


class Traffic:
    """What happened: each client's poll answers, and each push's final status."""

    def __init__(self, clients):
        self.answers = {client: [] for client in clients}   # client -> [(after, answer)]
        self.push_status = {}                               # stamp -> last status
        self.retries = collections.Counter()                # status -> retries after it
        self.errors = []                                    # exceptions in threads
        self.seconds = 0.0


def run_traffic(push_urls, poll_urls, clients, packages, pushers, poll_timeout, deadline=30.0):
    """Push ``packages`` from ``pushers`` threads spread over ``push_urls`` while
    every client polls, alternating over ``poll_urls``, until it has all of its
    packages (then once more, to catch any extra); bounded by ``deadline`` s."""
    traffic = Traffic(clients)
    end = time.monotonic() + deadline
    pushed = threading.Event()
    expected = collections.Counter(r for package in packages for r in package["to"])
    cursors = {client: Client(poll_urls[0], client).poll()["cursor"] for client in clients}

    def guarded(work):
        def run(*args):
            try:
                work(*args)
            except BaseException as error:      # reported by the main thread
                traffic.errors.append(error)
        return run

    def push(index):
        sender = Client(push_urls[index % len(push_urls)], f"pusher{index}")
        for package in packages[index::pushers]:
            for _ in range(50):
                status, _, _ = sender.push(package, timeout=20)
                traffic.push_status[package["_stamp"]] = status
                if status not in (429, 503) or time.monotonic() > end:
                    break
                traffic.retries[status] += 1
                time.sleep(0.05)                # back off before the retry, as the client does

    def poll(client):
        after, received, turn = cursors[client], 0, 0
        while time.monotonic() < end:
            done = pushed.is_set() and received >= expected[client]
            poller = Client(poll_urls[turn % len(poll_urls)], client)
            answer = poller.poll(cursor=after, timeout=poll_timeout + 20)
            traffic.answers[client].append((after, answer))
            after, received, turn = answer["cursor"], received + len(answer["packages"]), turn + 1
            if done:
                return

    started = time.monotonic()
    pollers = [threading.Thread(target=guarded(poll), args=(c,)) for c in clients]
    senders = [threading.Thread(target=guarded(push), args=(i,)) for i in range(pushers)]
    for thread in pollers + senders:
        thread.start()
    for thread in senders:
        thread.join(max(0.0, end - time.monotonic()) + 25)
    pushed.set()
    for thread in pollers:
        thread.join(max(0.0, end - time.monotonic()) + poll_timeout + 25)
    traffic.seconds = time.monotonic() - started
    return traffic


def _first_difference(got, expected):
    for index, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            return f"at index {index}: got position {a}, expected {b}"
    return f"got {len(got)} positions, expected {len(expected)}"


def assert_no_cursor_skipped(traffic, packages, positions):
    """Each client received exactly the positions addressed to it, in increasing
    order, each once, and every answer's packages lie after C and at or before C2."""
    assert not traffic.errors, traffic.errors
    refused = {s: status for s, status in traffic.push_status.items() if status != 200}
    assert not refused and len(traffic.push_status) == len(packages), refused
    lost = [p["_stamp"] for p in packages if p["_stamp"] not in positions]
    assert not lost, f"{len(lost)} packages answered 200 are not in the store: {lost[:5]}"
    for client, answers in traffic.answers.items():
        expected = sorted(positions[p["_stamp"]] for p in packages if client in p["to"])
        got = []
        for after, answer in answers:
            assert answer["reset"] is False, (client, answer)
            window = [positions.get(package["_stamp"]) for package in answer["packages"]]
            low, high = cursor_position(after), cursor_position(answer["cursor"])
            assert all(p is not None and low < p <= high for p in window), \
                (client, after, answer["cursor"], window)
            got += window
        assert got == expected, (client, _first_difference(got, expected))


def new_ids(*names):
    tag = secrets.token_hex(3)
    return [f"{name}-{tag}" for name in names]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--poll-timeout", type=float, default=25.0)
    parser.add_argument("--tail-interval", type=float, default=0.1)
    parser.add_argument("--presence-timeout", type=float, default=60.0)
    args = parser.parse_args()
    app = make_app(store=args.store, poll_timeout=args.poll_timeout,
                   tail_interval=args.tail_interval, presence_timeout=args.presence_timeout,
                   rate=(10000, 10000), address_rate=(10000, 10000))
    httpd = make_server("127.0.0.1", args.port, app, server_class=_ThreadingServer,
                        handler_class=_QuietHandler)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    httpd.serve_forever(poll_interval=0.05)


if __name__ == "__main__":
    main()


def purge(app, before):
    """Purge what ``app`` stored before ``before`` as housekeeping does: its window
    first (else a poll could still be answered from it), then every store step."""
    if app._window is not None:
        app._window.forget(before)
    return purge_all(app.store, before)


def purge_all(store, before):
    """Every purge step for ``before``, until the store has nothing more to do."""
    steps = 0
    while store.purge(before):
        steps += 1
        assert steps < 100_000
    return steps


def record_queries(monkeypatch, app=None):
    """What this thread sends to MySQL from now on (``app``, when given, started
    first: its first request reads the head once, to start its window), a list of
    round trips: the first word of each statement of a query, joined by "+", or
    "COMMIT" for the connection's commit; not a new connection's settings (SET).
    The app's tail and housekeeping send on threads of their own."""
    import pymysql
    if app is not None:
        app._start()
    sent = []
    query, commit = pymysql.connections.Connection.query, pymysql.connections.Connection.commit

    def main():
        return threading.current_thread() is threading.main_thread()

    def recorded(conn, sql, *args, **kwargs):
        text = sql.decode() if isinstance(sql, bytes) else sql
        if main() and not text.startswith("SET "):
            sent.append("+".join(statement.split()[0].upper()
                                 for statement in re.split(r"; (?=[A-Z])", text)))
        return query(conn, sql, *args, **kwargs)

    def committed(conn):
        if main():
            sent.append("COMMIT")
        return commit(conn)
    monkeypatch.setattr(pymysql.connections.Connection, "query", recorded)
    monkeypatch.setattr(pymysql.connections.Connection, "commit", committed)
    return sent
