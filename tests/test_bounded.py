"""Bounded for months: purge in short steps, a window bounded by bytes, nothing
kept per client after the client is gone, and one clock for times compared
across hosts.

The 600,000-row purge, and a soak of visitors coming and going, are in bench/
(``purge_backlog.py``, ``soak.py``); here the same purge runs on 100,000 rows.
"""

import contextlib
import os
import sys
import threading
import time
import tracemalloc

import pytest
import webtest

import comet
from support import fresh_store, make_app, purge, purge_all, wait_until

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

from purge_backlog import backlog  # noqa: E402

HOUR = 3_600_000


@pytest.fixture(params=["memory", "sqlite", "mysql", "postgresql"])
def any_store(request, tmp_path):
    return fresh_store(request.param, request, tmp_path)


@pytest.fixture(params=["sqlite", "mysql", "postgresql"])
def sql_store(request, tmp_path):
    return fresh_store(request.param, request, tmp_path)


@pytest.fixture(params=["mysql", "postgresql"])
def server(request):
    """The local MariaDB, then the local PostgreSQL: stores whose hosts share a clock."""
    return request.getfixturevalue("mariadb" if request.param == "mysql" else "postgres")


@pytest.fixture
def new_app():
    """``make_app``, each app closed after the test (its threads stop before the
    database is dropped)."""
    apps = []

    def new(**options):
        apps.append(make_app(**options))
        return apps[-1]
    yield new
    for app in apps:
        app.close()


def as_client(app, client_id):
    return webtest.TestApp(app, extra_environ={"HTTP_X_CLIENT": client_id})


def cursor_of(app, client_id):
    return as_client(app, client_id).get("/comet/poll").json["cursor"]


def poll(app, client_id, cursor):
    return as_client(app, client_id).get("/comet/poll", {"cursor": cursor}).json


def purge_everything(app):
    """Purge every package stored until now, as housekeeping would (the window
    first); return the number of steps.  The steps run after the cutoff, so the
    marks they write are kept (see ``Store.purge``)."""
    before = app.store.now() + 1
    wait_until(lambda: app.store.now() > before)
    return purge(app, before)


def count(store, table):
    return store._query(f"SELECT COUNT(*) FROM {table}")[0][0]


# --------------------------------------------------------------------------
# Purge: short steps, never in the way of a push or the tail
# --------------------------------------------------------------------------

def test_purging_a_backlog_holds_up_no_push_and_no_tail_turn_for_long(sql_store):
    store = comet.open_store(sql_store)
    last = backlog(store, rows=100_000, recipients=200, ts=comet._now_ms() - HOUR)
    app = make_app(store=store, retention=60, tail_interval=0.05)
    turns = []
    tail = app._tail
    app._tail = lambda: turns.append(time.monotonic()) or tail()
    latencies, done = [], threading.Event()

    def pushing():
        while not done.is_set() and len(latencies) < 20_000:
            sent = time.monotonic()
            app.push({"type": "note", "listeners": "bob"})
            latencies.append(time.monotonic() - sent)
            done.wait(0.005)
    pusher = threading.Thread(target=pushing)
    started = time.monotonic()
    pusher.start()
    try:
        wait_until(lambda: store._query("SELECT COUNT(*) FROM comet_deliveries WHERE pos <= ?",
                                        (last,))[0][0] == 0, timeout=120, interval=0.1)
    finally:
        purged_in = time.monotonic() - started
        done.set()
        pusher.join(30)
        app.close()
    gaps = [b - a for a, b in zip(turns, turns[1:]) if a <= started + purged_in]
    # The purge goes in short steps: no push, and no turn of the tail, waits for more
    # than a small part of it (one transaction for the whole backlog would be all of it).
    assert len(latencies) >= 10 and max(latencies) < purged_in / 4, (max(latencies), purged_in)
    assert gaps and max(gaps) < purged_in / 4, (max(gaps), purged_in)


def test_a_purge_in_steps_resets_exactly_the_recipients_that_lost_a_package(any_store, monkeypatch, new_app):
    monkeypatch.setattr(comet, "_PURGE_ROWS", 7)      # a package of 10 recipients takes two steps
    app = new_app(store=any_store, retention=3600, poll_timeout=0.05)
    many = [f"member{n}" for n in range(10)]
    cursors = {client: cursor_of(app, client) for client in many + ["solo", "carol"]}
    app.push({"type": "all", "listeners": ["to"], "to": many})
    app.push({"type": "one", "listeners": "solo"})
    app.push({"type": "again", "listeners": ["to"], "to": many[:3]})

    steps = purge_everything(app)

    assert steps >= 2
    assert all(poll(app, client, cursors[client])["reset"] for client in many + ["solo"])
    assert poll(app, "carol", cursors["carol"])["reset"] is False


def test_two_processes_purging_at_once_leave_each_mark_at_its_newest_position(sql_store):
    stores = [comet.open_store(sql_store) for _ in range(2)]
    last = backlog(stores[0], rows=20_000, recipients=200, ts=comet._now_ms() - HOUR)
    before = stores[0].now()

    def purging(store):
        with contextlib.suppress(comet.CometError):     # the other one took the slice
            purge_all(store, before)
    threads = [threading.Thread(target=purging, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    purge_all(stores[0], before)                        # whatever a refused slice left

    marks = {comet._text(r): p for r, p in stores[0]._query("SELECT recipient, pos FROM comet_purged")}
    assert len(marks) == 200 and set(marks.values()) == {last}
    assert count(stores[0], "comet_deliveries") == 0
    for store in stores:
        store.close()


def test_a_push_does_not_wait_for_a_purge_step_that_has_not_committed(server, new_app):
    # A purge step keeps the purged position locked until it commits (100 ms, for a
    # step of thousands of rows on a busy disk).  A push takes its positions from
    # comet_meta, a row of another table: it goes on meanwhile.
    store = comet.open_store(server.create_database())
    backlog(store, rows=400, recipients=200, ts=comet._now_ms() - HOUR)
    app = new_app(store=store, retention=2 * HOUR // 1000)     # its own purge waits
    with store._connection() as held:           # a purge step, its commit still to come
        cur = held.cursor()
        store._begin(cur)
        store._execute(cur, "UPDATE comet_purge SET purged = purged")
        try:
            step = threading.Thread(target=store.purge, args=(store.now(),))
            step.start()                        # the next step waits for that one
            sent = time.monotonic()
            app.push({"type": "note", "listeners": ["to"], "to": ["bob"]})
            took = time.monotonic() - sent
            assert step.is_alive()              # the position was held all along
        finally:
            held.rollback()
    step.join(30)
    assert took < 5, took                       # not until the lock wait times out
    assert not step.is_alive() and count(store, "comet_deliveries") == 1


def test_tables_made_before_the_purged_position_had_a_row_of_its_own_go_on_from_it(sql_store):
    store = comet.open_store(sql_store)
    last = backlog(store, rows=2_000, recipients=200, ts=comet._now_ms() - HOUR)
    with store._connection() as conn:           # as an earlier version left them, purged
        cur = conn.cursor()                     # through position 4
        for sql in ("DELETE FROM comet_deliveries WHERE pos <= 4",
                    "DELETE FROM comet_packages WHERE pos <= 4",
                    "UPDATE comet_meta SET purged = 4", "DROP TABLE comet_purge"):
            store._execute(cur, sql)
        conn.commit()
    store.close()

    store = comet.open_store(sql_store)
    try:
        assert list(store._query("SELECT purged FROM comet_purge")) == [(4,)]
        purge_all(store, store.now())
        assert list(store._query("SELECT purged FROM comet_purge")) == [(last,)]
        assert count(store, "comet_deliveries") == count(store, "comet_packages") == 0
    finally:
        store.close()


# --------------------------------------------------------------------------
# The window: one body per package, bounded by bytes
# --------------------------------------------------------------------------

def test_a_tailing_process_keeps_one_body_per_package_not_one_per_recipient(tmp_path, new_app):
    url = f"sqlite:///{tmp_path}/comet.db"
    pusher, tailer = new_app(store=url), new_app(store=url)
    tailer._tail()                                  # the first turn: the window starts at the head
    recipients = [f"member{n:03d}" for n in range(200)]
    for n in range(20):                             # 20 packages of 50 KB to 200 recipients
        pusher.push({"type": "file", "listeners": ["to"], "to": recipients, "data": "x" * 50_000})

    tracemalloc.start()
    try:
        tailer._tail()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 10_000_000                        # not 4,000 bodies (200 MB)
    assert len(tailer._window.read("member007", 0, 500)[1]) == 20
    assert tailer._window.bytes < 2_000_000         # 20 bodies of 50 KB, and 4,000 deliveries


def test_the_window_counts_a_shared_body_once_and_lets_the_oldest_go_past_its_bytes():
    body = "x" * 10_000
    window = comet._Window(max_bytes=25_000)
    window.start(0)
    window.add([(1, 0, [(f"member{n}", body) for n in range(10)])])
    assert window.read("member3", 0, 500) == (1, [(1, 0, body)])
    assert window.bytes < 12_000                    # one body of 10 KB, not ten

    window.add([(2, 0, [("bob", "y" * 10_000)]), (3, 0, [("bob", "z" * 10_000)])])

    assert window.bytes <= 25_000
    assert window.base == 1                         # the oldest went first
    assert window.read("member1", 0, 500) is None   # before the window: the store answers
    assert [row[0] for row in window.read("bob", 1, 500)[1]] == [2, 3]


def test_rows_the_window_let_go_leave_the_inboxes_an_eighth_of_its_bytes_later_at_most():
    one = comet._Window._DELIVERY + sys.getsizeof("1")      # one delivery of a one-byte body
    window = comet._Window(max_bytes=64 * one)
    window.start(0)
    rows = []
    for n in range(1, 1001):
        window.add([(n, n, [("bob" if n % 2 else "carol", "1")])])
        rows.append(sum(map(len, window._inbox.values())))

    assert window.base == 936 and max(rows) == 64 + 8       # the ninth let go cuts all nine
    assert max(rows[500:]) == 64 + 8                        # and again: not one cut a package
    assert [row[0] for row in window.read("carol", 936, 500)[1]] == list(range(938, 1001, 2))


def test_the_window_lets_go_of_what_retention_expired():
    window = comet._Window(max_bytes=1 << 20)
    window.start(0)
    window.add([(1, 1000, [("bob", "old")]), (2, 5000, [("bob", "new")])])

    window.forget(before=2000)

    assert window.base == 1 and window.read("bob", 1, 500) == (2, [(2, 5000, "new")])


# --------------------------------------------------------------------------
# Nothing kept per client after the client is gone
# --------------------------------------------------------------------------

def test_purge_marks_are_forgotten_retention_after_the_purge_and_old_cursors_still_reset(
        any_store, new_app, monkeypatch):
    monkeypatch.setattr(comet, "_MARKS_KEPT", 0)     # no floor: a retention is enough
    app = new_app(store=any_store, retention=3600, poll_timeout=0.05)
    cursors = {client: cursor_of(app, client) for client in ("bob", "carol")}
    app.push({"type": "old", "listeners": "bob"})
    purge_everything(app)                     # bob lost a package: a mark says so
    assert poll(app, "bob", cursors["bob"])["reset"] is True
    assert poll(app, "carol", cursors["carol"])["reset"] is False

    purge_everything(app)                     # a retention later: the mark goes

    marks = app.store._lost if any_store == "memory:" else app.store._query(
        "SELECT recipient FROM comet_purged")
    assert not marks
    # A cursor older than the forgotten marks is answered reset, whoever sends it;
    # a cursor from now on is not.
    assert poll(app, "bob", cursors["bob"])["reset"] is True
    assert poll(app, "carol", cursors["carol"])["reset"] is True
    assert poll(app, "carol", cursor_of(app, "carol"))["reset"] is False


def test_purge_marks_outlive_a_short_retention_by_minutes(any_store, new_app):
    app = new_app(store=any_store, retention=3600, poll_timeout=0.05)
    cursors = {client: cursor_of(app, client) for client in ("bob", "carol")}
    app.push({"type": "old", "listeners": "bob"})
    purge_everything(app)                     # bob lost a package: a mark says so

    purge_everything(app)                     # a retention later, but not minutes later

    assert poll(app, "bob", cursors["bob"])["reset"] is True
    assert poll(app, "carol", cursors["carol"])["reset"] is False


def test_clients_gone_longer_than_retention_are_forgotten_unless_they_are_members(any_store, new_app):
    app = new_app(store=any_store, retention=60)
    as_client(app, "bob").post_json("/comet/push", {"type": "join", "listeners": ["room"]})
    app.store.touch(["alice", "bob"], app.store.now() - HOUR)

    purge_all(app.store, app.store.now() - 60_000)

    if any_store == "memory:":
        seen = set(app.store._seen)
    else:
        seen = {comet._text(row[0]) for row in app.store._query("SELECT client FROM comet_clients")}
    assert seen == {"bob"}


def test_a_client_gone_leaves_nothing_in_the_per_process_maps(tmp_path, new_app):
    app = new_app(store=f"sqlite:///{tmp_path}/comet.db", poll_timeout=0.05, rate=(1000, 1))
    alice = as_client(app, "alice")
    alice.post_json("/comet/push", {"type": "note", "listeners": "bob"})
    poll(app, "alice", cursor_of(app, "alice"))
    assert "alice" in app._seen and "alice" in app._rate._buckets

    app._sweep_presence(sweep=False)                # the presence sweep after she left
    wait_until(lambda: app._rate.forget_idle() or "alice" not in app._rate._buckets)

    assert "alice" not in app._seen
    assert "alice" not in app._parking._waiters


# --------------------------------------------------------------------------
# Time across hosts: the database's clock
# --------------------------------------------------------------------------

def test_a_database_server_store_tells_time_by_the_database_clock(server, monkeypatch):
    url = server.create_database()
    real = comet._now_ms
    monkeypatch.setattr(comet, "_now_ms", lambda: real() + 30_000)   # this host is 30 s ahead

    store = comet.open_store(url)
    try:
        assert abs(store.now() - real()) < 2_000
    finally:
        store.close()


def test_a_process_whose_clock_is_30_s_ahead_neither_drops_members_nor_expires_early(
        server, monkeypatch):
    url = server.create_database()
    options = dict(store=url, retention=20, presence_timeout=20, poll_timeout=0.05)
    first = make_app(**options)                     # a host whose clock is right
    cursor = cursor_of(first, "bob")
    as_client(first, "alice").post_json("/comet/push", {"type": "join", "listeners": ["room"]})
    cursor_of(first, "alice")                       # alice polls
    first._sweep_presence(sweep=False)              # and it is recorded
    first.push({"type": "stale", "listeners": "carol"})
    first.push({"type": "fresh", "listeners": "bob"})
    first.close()
    server.query(url, "UPDATE comet_packages SET ts = ts - 60000 WHERE pos <= (SELECT pos FROM"
                      " comet_deliveries WHERE recipient = 'carol')")
    real = comet._now_ms
    monkeypatch.setattr(comet, "_now_ms", lambda: real() + 30_000)
    second = make_app(**options)                    # a host 30 s ahead of the first
    try:
        second._sweep_presence()
        second._start()                             # its housekeeping purges at once
        wait_until(lambda: not server.query(url, "SELECT 1 FROM comet_deliveries"
                                                 " WHERE recipient = 'carol'"), timeout=20)
        answer = poll(second, "bob", cursor)
    finally:
        second.close()

    assert set(second.channel("room").members()) == {"alice"}
    assert answer["reset"] is False and [p["type"] for p in answer["packages"]] == ["fresh"]
