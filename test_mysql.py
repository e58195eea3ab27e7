"""The MySQL store against the real MariaDB on 127.0.0.1:3306 (SPEC sections 2-4).

Every test runs in one throwaway database ``comet_test_<hex>``, made for this
module and dropped after it; client ids carry a fresh tag, so tests do not see
each other's packages.  Without a reachable MariaDB the module skips loudly
(and fails under CI=true).

The helpers at the top (``MariaDB``, ``run_traffic``, ``assert_no_cursor_skipped``)
are shared with test_multiprocess.py.
"""

import collections
import contextlib
import os
import random
import secrets
import shutil
import sqlite3
import subprocess
import threading
import time
import urllib.parse

import pytest
import webtest

import comet

from conftest import Client, GroupCommit, ServerProcess, ThreadedServer, make_app, need, wait_until

HOST, PORT, USER = "127.0.0.1", 3306, "root"


# --------------------------------------------------------------------------
# The database server
# --------------------------------------------------------------------------

def _connect(database=None):
    import pymysql
    return pymysql.connect(host=HOST, port=PORT, user=USER, password="", database=database,
                           autocommit=True, connect_timeout=2)


class MariaDB:
    """The local MariaDB as root: throwaway databases, queries, a stop and a start."""

    def __init__(self):
        self.databases = []

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

    def drop_databases(self):
        for name in self.databases:
            self._run(None, f"DROP DATABASE IF EXISTS `{name}`")
        self.databases = []

    def query(self, url, sql, args=()):
        """Rows of ``sql`` run in the database of store ``url``."""
        return self._run(urllib.parse.urlsplit(url).path.lstrip("/"), sql, args)

    def _run(self, database, sql, args=()):
        with contextlib.closing(_connect(database)) as conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()

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


@pytest.fixture(scope="module")
def mysql_url(mariadb):
    """This module's database: created now, dropped with the module."""
    return mariadb.create_database()


def positions_in_store(url, mariadb=None):
    """``{stamp: position}`` of every package in the store at ``url`` (sqlite or mysql)."""
    if url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(url[len("sqlite:///"):])) as conn:
            rows = conn.execute("SELECT pos, stamp FROM comet_packages").fetchall()
    else:
        rows = mariadb.query(url, "SELECT pos, stamp FROM comet_packages")
    return {comet._text(stamp): pos for pos, stamp in rows}    # MySQL keeps stamps as bytes


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


# --------------------------------------------------------------------------
# In-process helpers
# --------------------------------------------------------------------------

def new_ids(*names):
    tag = secrets.token_hex(3)
    return [f"{name}-{tag}" for name in names]


def push(web, client, package, status=200):
    return web.post_json("/comet/push", package, headers={"X-Client": client}, status=status).json


def poll(web, client, cursor=None):
    query = "" if cursor is None else "?cursor=" + urllib.parse.quote(cursor)
    return web.get("/comet/poll" + query, headers={"X-Client": client}).json


@pytest.fixture
def app(mysql_url):
    app = make_app(store=mysql_url, poll_timeout=1)
    app.web = webtest.TestApp(app)
    yield app
    app.close()


def _now_ms():
    return int(time.time() * 1000)


# --------------------------------------------------------------------------
# Tables and the round trip
# --------------------------------------------------------------------------

def test_tables_are_created_on_first_use(mariadb):
    url = mariadb.create_database()
    assert not mariadb.query(url, "SHOW TABLES")

    app = make_app(store=url)
    try:
        tables = {row[0] for row in mariadb.query(url, "SHOW TABLES")}
    finally:
        app.close()

    assert tables == {"comet_meta", "comet_packages", "comet_deliveries", "comet_purged",
                      "comet_members", "comet_clients"}


def test_push_then_poll_round_trip_through_webtest(app):
    sender, recipient = new_ids("sender", "recipient")
    cursor = poll(app.web, recipient)["cursor"]

    accepted = push(app.web, sender, {"type": "message", "listeners": ["to"],
                                      "to": [recipient], "text": "h\u00e9llo \U0001f600"})
    answer = poll(app.web, recipient, cursor)

    [package] = answer["packages"]
    assert package["_stamp"] == accepted["accepted"][0]
    assert (package["text"], package["sender"], answer["reset"]) == \
        ("h\u00e9llo \U0001f600", sender, False)


def test_cursor_from_another_database_is_reset(app, mariadb):
    other = make_app(store=mariadb.create_database())
    try:
        foreign = other.store.id + ".1"
    finally:
        other.close()
    [client] = new_ids("client")

    answer = poll(app.web, client, foreign)

    assert answer["reset"] is True and answer["packages"] == []


def test_same_stamp_pushed_twice_is_accepted_once_and_delivered_once(app, mariadb, mysql_url):
    sender, recipient = new_ids("sender", "recipient")
    cursor = poll(app.web, recipient)["cursor"]
    package = {"type": "message", "listeners": ["to"], "to": [recipient],
               "_stamp": "twice" + secrets.token_hex(8)}

    first = push(app.web, sender, package)
    second = push(app.web, sender, package)

    assert first["accepted"] == second["accepted"] == [package["_stamp"]]
    assert [p["_stamp"] for p in poll(app.web, recipient, cursor)["packages"]] == [package["_stamp"]]
    assert mariadb.query(mysql_url, "SELECT COUNT(*) FROM comet_packages WHERE stamp = %s",
                         (package["_stamp"],)) == ((1,),)


def test_same_stamp_pushed_concurrently_is_stored_once(app, mariadb, mysql_url):
    [recipient] = new_ids("recipient")
    package = {"type": "message", "listeners": ["to"], "to": [recipient],
               "_stamp": "racing" + secrets.token_hex(8)}
    start = threading.Barrier(6)
    stamps = []

    def race():
        start.wait(5)
        stamps.append(app.push(dict(package)))

    threads = [threading.Thread(target=race) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert stamps == [package["_stamp"]] * 6
    assert mariadb.query(mysql_url, "SELECT COUNT(*) FROM comet_packages WHERE stamp = %s",
                         (package["_stamp"],)) == ((1,),)


def test_ids_differing_in_case_accents_or_trailing_spaces_are_different_recipients(app):
    tag = secrets.token_hex(3)
    recipient, lookalikes = f"bob-{tag}", [f"Bob-{tag}", f"b\u00f6b-{tag}", f"bob-{tag} "]
    cursor = poll(app.web, recipient)["cursor"]
    for lookalike in lookalikes:
        push(app.web, "sender", {"type": "private", "listeners": ["to"], "to": [lookalike]})
    marker = push(app.web, "sender", {"type": "marker", "listeners": ["to"], "to": [recipient]})

    answer = poll(app.web, recipient, cursor)

    assert [p["_stamp"] for p in answer["packages"]] == marker["accepted"], \
        [p["to"] for p in answer["packages"]]


def test_package_for_ids_differing_only_in_case_is_accepted(app):
    upper, lower = new_ids("Bob", "bob")

    push(app.web, "sender", {"type": "message", "listeners": ["to"], "to": [lower, upper]})


def test_stamps_differing_only_in_case_are_different_packages(app):
    [recipient] = new_ids("recipient")
    cursor = poll(app.web, recipient)["cursor"]
    stamp = "CaseStamp" + secrets.token_hex(6)
    for variant in (stamp, stamp.lower()):
        push(app.web, "sender", {"type": "message", "listeners": ["to"], "to": [recipient],
                                 "_stamp": variant})

    answer = poll(app.web, recipient, cursor)

    assert [p["_stamp"] for p in answer["packages"]] == [stamp, stamp.lower()]


def test_single_listener_of_256_characters_is_delivered(app):
    recipient = new_ids("r")[0].ljust(256, "x")
    cursor = poll(app.web, recipient)["cursor"]

    accepted = push(app.web, "sender", {"type": "message", "listeners": recipient})

    assert [p["_stamp"] for p in poll(app.web, recipient, cursor)["packages"]] == \
        accepted["accepted"]


# --------------------------------------------------------------------------
# Hooks share the transaction
# --------------------------------------------------------------------------

@pytest.fixture
def notes_app(app, mariadb, mysql_url):
    """The app with a ``note`` action whose on_submit writes to the app's own table;
    its on_emit refuses packages marked ``refuse``, after the note was written."""
    import comet
    mariadb.query(mysql_url, "CREATE TABLE IF NOT EXISTS app_notes"
                             " (stamp VARCHAR(64) PRIMARY KEY, note TEXT) ENGINE=InnoDB")
    note = app.action("note")
    app.hook_dbs = []

    @note.on_submit
    def write_note(package, private, db, environ):
        app.hook_dbs.append(db)
        with db.cursor() as cur:
            cur.execute("INSERT INTO app_notes (stamp, note) VALUES (%s, %s)",
                        (package["_stamp"], package["text"]))

    @note.on_emit
    def refuse_marked(package, recipient, private, db):
        if package.get("refuse"):
            raise comet.Reject("refused after the note was written")
        return package

    app.notes = lambda stamps: {row[0] for row in mariadb.query(
        mysql_url, "SELECT stamp FROM app_notes WHERE stamp IN %s", (tuple(stamps),))}
    return app


def note(recipient, refuse=False):
    return {"type": "note", "listeners": ["to"], "to": [recipient], "text": "noted",
            "refuse": refuse, "_stamp": "note" + secrets.token_hex(8)}


def test_hooks_get_a_pymysql_connection(notes_app):
    import pymysql
    [recipient] = new_ids("recipient")

    push(notes_app.web, "sender", note(recipient))

    assert len(notes_app.hook_dbs) == 1
    assert isinstance(notes_app.hook_dbs[0], pymysql.connections.Connection)


def test_what_on_submit_writes_commits_with_the_package(notes_app):
    [recipient] = new_ids("recipient")
    package = note(recipient)

    push(notes_app.web, "sender", package)

    assert notes_app.notes([package["_stamp"]]) == {package["_stamp"]}


def test_what_on_submit_writes_is_rolled_back_when_a_later_hook_rejects(notes_app, mariadb, mysql_url):
    [recipient] = new_ids("recipient")
    package = note(recipient, refuse=True)

    answer = push(notes_app.web, "sender", package, status=403)

    assert answer["error"] == "rejected"
    assert notes_app.notes([package["_stamp"]]) == set()
    assert mariadb.query(mysql_url, "SELECT COUNT(*) FROM comet_packages WHERE stamp = %s",
                         (package["_stamp"],)) == ((0,),)


def test_rejected_package_in_a_batch_keeps_what_the_packages_before_it_wrote(notes_app):
    [recipient] = new_ids("recipient")
    kept, refused = note(recipient), note(recipient, refuse=True)

    answer = push(notes_app.web, "sender", [kept, refused], status=403)

    assert (answer["index"], answer["accepted"]) == (1, [kept["_stamp"]])
    assert notes_app.notes([kept["_stamp"], refused["_stamp"]]) == {kept["_stamp"]}


# --------------------------------------------------------------------------
# Retention
# --------------------------------------------------------------------------

@pytest.fixture
def group(mariadb):
    url = mariadb.create_database()        # its own: bob's inbox holds only this test's
    group = GroupCommit(url, "%s")
    mariadb.query(url, "CREATE TABLE log (text VARCHAR(64)) ENGINE=InnoDB")
    group.log = lambda: sorted(row[0] for row in mariadb.query(url, "SELECT text FROM log"))
    yield group
    group.app.close()


def test_pushes_queued_behind_a_transaction_share_its_commit(group):
    results = group.run("hold", "kept", "refused", "also kept")
    assert results["refused"] == 403
    assert all(isinstance(results[text], str) for text in ("hold", "kept", "also kept"))
    assert group.flushes == [3]
    assert group.log() == ["also kept", "hold", "kept"]
    assert sorted(group.delivered()) == ["also kept", "hold", "kept"]


def test_a_slow_hook_holds_up_four_pushes_and_the_fifth_commits_in_another_batch(group):
    threads = [group.push("hold")]
    assert group.held.wait(10)
    threads += [group.push(f"queued {n}") for n in range(4)]
    wait_until(lambda: sum(batch.queued for batch in group.app.store._open) == 4)
    threads.append(group.push("fifth"))
    wait_until(lambda: "fifth" in group.results)
    assert isinstance(group.results["fifth"], str) and len(group.results) == 1
    group.released.set()
    for thread in threads:
        thread.join(10)
    assert len(group.results) == 6 and all(isinstance(r, str) for r in group.results.values())
    assert group.flushes == [1, 5]
    assert group.delivered()[0] == "fifth" and len(group.delivered()) == 6


def test_a_first_part_that_fails_is_rolled_back_alone(group):
    results = group.run("hold-refused", "kept", "also kept")
    assert results["hold-refused"] == 403
    assert group.log() == ["also kept", "kept"]
    assert sorted(group.delivered()) == ["also kept", "kept"]


def test_a_failed_commit_fails_every_part_and_keeps_nothing(group, monkeypatch):
    import pymysql

    def broken(batch):
        raise pymysql.err.OperationalError(2013, "Lost connection to MySQL server during query")
    monkeypatch.setattr(group.app.store, "_flush", broken)
    assert group.run("hold", "kept", "also kept") == {"hold": 503, "kept": 503, "also kept": 503}
    assert group.log() == [] and group.delivered() == []
    monkeypatch.undo()
    assert isinstance(group.app.push({"type": "note", "listeners": "bob", "text": "after"}), str)
    assert group.log() == ["after"]


def test_a_stamp_claimed_by_an_open_transaction_elsewhere_waits_for_it_and_is_stored_once(group):
    """Two processes (two Comets on one database): the second push of a stamp waits
    on the first's claim and, once that commits, answers it accepted without its hooks."""
    other = make_app(store=group.url, poll_timeout=0.2)
    try:
        stamp = "claimed" + secrets.token_hex(8)
        package = {"type": "note", "listeners": ["to"], "to": ["bob"], "text": "hold", "_stamp": stamp}
        first = threading.Thread(target=lambda: group.results.update(first=group.app.push(dict(package))))
        first.start()
        assert group.held.wait(10)
        second = threading.Thread(target=lambda: group.results.update(second=other.push(dict(package))))
        second.start()
        wait_until(lambda: _lock_waits(group.url) > 0)
        group.released.set()
        first.join(10)
        second.join(10)
        assert group.results == {"first": stamp, "second": stamp}
        assert group.log() == ["hold"] and group.delivered() == ["hold"]
    finally:
        other.close()


def _lock_waits(url):
    return MariaDB().query(url, "SELECT COUNT(*) FROM information_schema.INNODB_TRX"
                                " WHERE trx_state = 'LOCK WAIT'")[0][0]


def test_cursor_older_than_what_is_retained_is_reset(app):
    [recipient] = new_ids("recipient")
    cursor = poll(app.web, recipient)["cursor"]
    push(app.web, "sender", {"type": "message", "listeners": ["to"], "to": [recipient]})
    app.store.purge(_now_ms() + 1)

    answer = poll(app.web, recipient, cursor)

    assert (answer["reset"], answer["packages"]) == (True, [])
    assert answer["cursor"] == poll(app.web, recipient)["cursor"]     # the head


def test_client_whose_packages_were_not_purged_is_not_reset(app):
    purged, kept = new_ids("purged", "kept")
    cursors = {client: poll(app.web, client)["cursor"] for client in (purged, kept)}
    push(app.web, "sender", {"type": "message", "listeners": ["to"], "to": [purged]})
    cutoff = _now_ms() + 1                  # after the first package, at or before the second
    wait_until(lambda: _now_ms() >= cutoff)
    later = push(app.web, "sender", {"type": "message", "listeners": ["to"], "to": [kept]})
    app.store.purge(cutoff)
    assert poll(app.web, purged, cursors[purged])["reset"] is True

    answer = poll(app.web, kept, cursors[kept])

    assert answer["reset"] is False
    assert [p["_stamp"] for p in answer["packages"]] == later["accepted"]


# --------------------------------------------------------------------------
# Durability: kill -9 and a store outage
# --------------------------------------------------------------------------

def test_package_answered_200_survives_kill_9_of_the_server(mysql_url):
    sender, recipient = new_ids("sender", "recipient")
    with ServerProcess(mysql_url, poll_timeout=1) as server:
        old_cursor = Client(server.url, recipient).poll()["cursor"]
        status, _, body = Client(server.url, sender).push(
            {"type": "message", "listeners": ["to"], "to": [recipient]})
        assert status == 200
        server.kill()
        server.start()

        answer = Client(server.url, recipient).poll(cursor=old_cursor)

    assert [p["_stamp"] for p in answer["packages"]] == body["accepted"]


class Outage:
    """A server process under push and poll load while MariaDB is stopped and started."""

    def __init__(self, url):
        self.url = url
        self.requests = []          # (kind, sent, answered, status, retry_after, stamp, to)
        self.stopped = self.started = None
        self.alive = self.recovered = None
        self.expected = {}          # recipient -> stamps answered 200
        self.delivered = {}         # recipient -> stamps polled back after the outage
        self.errors = []

    def count(self, kind, status, after):
        return sum(1 for r in list(self.requests)
                   if r[0] == kind and r[3] == status and r[1] > after)

    def run(self, mariadb):
        senders, recipients = new_ids("sender0", "sender1"), new_ids("recipient0", "recipient1")
        with ServerProcess(self.url, poll_timeout=1, tail_interval=0.1) as server:
            cursors = {r: Client(server.url, r).poll()["cursor"] for r in recipients}
            stop = threading.Event()
            threads = [threading.Thread(target=self._pushing, args=(server, s, recipients, stop))
                       for s in senders]
            threads += [threading.Thread(target=self._polling, args=(server, r, cursors[r], stop))
                        for r in recipients]
            for thread in threads:
                thread.start()
            try:
                wait_until(lambda: self.count("push", 200, 0) >= 10, timeout=10)
                try:
                    mariadb.stop()
                    self.stopped = time.monotonic()
                    _wait(lambda: self.count("push", 503, self.stopped) >= 3
                          and self.count("poll", 503, self.stopped) >= 3, timeout=10)
                finally:
                    mariadb.start()
                    self.started = time.monotonic()
                self.recovered = _wait(lambda: self.count("push", 200, self.started) >= 3
                                       and self.count("poll", 200, self.started) >= 1, timeout=15)
                self.alive = server.proc.poll() is None
            finally:
                stop.set()
                for thread in threads:
                    thread.join(20)
            self._drain(server, cursors)

    def _pushing(self, server, sender, recipients, stop):
        client, n = Client(server.url, sender), 0
        while not stop.is_set() and n < 5000:
            to = recipients[n % len(recipients)]
            package = {"type": "load", "listeners": ["to"], "to": [to],
                       "_stamp": f"{sender}-{n:05d}"}
            self._request("push", lambda: client.push(package, timeout=15), package["_stamp"], to)
            n += 1
            stop.wait(0.01)                 # pace the load; not a synchronisation

    def _polling(self, server, recipient, cursor, stop):
        client, n = Client(server.url, recipient), 0
        while not stop.is_set() and n < 5000:
            query = "?cursor=" + urllib.parse.quote(cursor)
            status, _, body = self._request(
                "poll", lambda: client.request("GET", "/comet/poll" + query, timeout=15))
            if status == 200:
                cursor = body["cursor"]
            n += 1
            stop.wait(0.01)

    def _request(self, kind, send, stamp=None, to=None):
        sent = time.monotonic()
        try:
            status, headers, body = send()
        except Exception as error:          # no answer at all: recorded as status None
            self.errors.append(error)
            status, headers, body = None, {}, None
        self.requests.append((kind, sent, time.monotonic(), status,
                              headers.get("Retry-After"), stamp, to))
        return status, headers, body

    def _drain(self, server, cursors):
        for recipient, cursor in cursors.items():
            self.expected[recipient] = {r[5] for r in self.requests
                                        if r[0] == "push" and r[3] == 200 and r[6] == recipient}
            client, got = Client(server.url, recipient), set()
            client.cursor = cursor
            end = time.monotonic() + 15
            while not self.expected[recipient] <= got and time.monotonic() < end:
                got.update(p["_stamp"] for p in client.poll(timeout=10)["packages"])
            self.delivered[recipient] = got


def _wait(predicate, timeout):
    """``wait_until`` that answers False instead of raising."""
    try:
        wait_until(predicate, timeout=timeout)
    except AssertionError:
        return False
    return True


@pytest.fixture(scope="module")
def outage(mariadb, mysql_url):
    """One MariaDB outage under load, shared by the tests below (a restart costs seconds)."""
    need(mariadb.can_restart(), "cannot stop and start MariaDB here (needs root, "
                                "start-stop-daemon and /usr/sbin/mariadbd)")
    record = Outage(mysql_url)
    record.run(mariadb)
    return record


def test_store_outage_answers_503_with_retry_after_within_10_s_never_500(outage):
    during = [r for r in outage.requests if outage.stopped <= r[1] < outage.started]
    first_503 = {kind: min((r[2] for r in during if r[0] == kind and r[3] == 503), default=None)
                 for kind in ("push", "poll")}

    assert collections.Counter(r[3] for r in outage.requests).keys() <= {200, 503}, \
        collections.Counter(r[3] for r in outage.requests)
    assert all(r[4] is not None and int(r[4]) >= 1 for r in outage.requests if r[3] == 503)
    assert all(t is not None and t - outage.stopped <= 10 for t in first_503.values()), first_503
    assert max(r[2] - r[1] for r in outage.requests) <= 10


def test_server_process_stays_up_through_a_store_outage(outage):
    assert outage.alive is True


def test_pushes_and_polls_succeed_again_when_the_store_is_back_without_restart(outage):
    assert outage.recovered is True


def test_every_push_answered_200_around_a_store_outage_is_delivered(outage):
    assert all(outage.expected.values())
    for recipient, stamps in outage.expected.items():
        assert stamps - outage.delivered[recipient] == set(), recipient


# --------------------------------------------------------------------------
# Never skip: concurrent writers, real positions
# --------------------------------------------------------------------------

def test_concurrent_pushers_on_one_store_never_make_a_cursor_skip(mariadb, mysql_url):
    clients = new_ids(*(f"c{i}" for i in range(6)))
    packages = plan_packages(clients, 480, seed=1)
    app = make_app(store=mysql_url, poll_timeout=0.5, rate=(10000, 10000))
    try:
        with ThreadedServer(app) as server:
            traffic = run_traffic([server.url], [server.url], clients, packages,
                                  pushers=6, poll_timeout=0.5)
    finally:
        app.close()

    assert_no_cursor_skipped(traffic, packages, positions_in_store(mysql_url, mariadb))


def test_concurrent_pushers_on_two_processes_never_make_a_cursor_skip(mariadb, mysql_url):
    clients = new_ids(*(f"c{i}" for i in range(6)))
    packages = plan_packages(clients, 480, seed=2)
    with ServerProcess(mysql_url, poll_timeout=0.5, tail_interval=0.1) as a, \
            ServerProcess(mysql_url, poll_timeout=0.5, tail_interval=0.1) as b:
        traffic = run_traffic([a.url, b.url], [b.url, a.url], clients, packages,
                              pushers=6, poll_timeout=0.5)

    assert_no_cursor_skipped(traffic, packages, positions_in_store(mysql_url, mariadb))
