"""The SQLite store runs a push's own statements holding the GIL, through ctypes
on the libsqlite3 the sqlite3 module loaded: what they bind and read back, that
no other thread runs meanwhile, that a statement the file makes wait lets the
GIL go, that their prepared statements go with the connection, and the store
without them."""

import contextlib
import gc
import os
import sqlite3

import pytest

import comet
from support import Counted, Spinner, make_app, push_kept_waiting

pytestmark = pytest.mark.alone     # its tests time the GIL's hand-overs

SLOW = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1500000)"
        " SELECT count(*) FROM n")


@pytest.fixture
def store(tmp_path):
    store = comet.SQLiteStore(str(tmp_path / "comet.db"))
    yield store
    store.close()


@pytest.fixture
def conn(store):
    conn = store._checkout()
    yield conn
    store._checkin(conn)


def held(store, conn):
    cursor = conn.held(store._library, 5000)
    assert isinstance(cursor, comet._HeldCursor)
    return cursor


def test_the_library_loads_on_this_python(store):
    # CPython 3.8 to 3.14 with a GIL: the tests below must not pass by falling back.
    assert comet._HeldSQLite.load() is not None and store._library is not None


def test_a_held_statement_lets_no_other_thread_run_and_the_modules_does(store, conn):
    def ticks_beside(cursor):
        with Spinner() as spinner:
            before = spinner.ticks
            assert cursor.execute(SLOW).fetchone() == (1500000,)
            return spinner.ticks - before
    beside_held, beside_module = ticks_beside(held(store, conn)), ticks_beside(conn.cursor())
    # Held, the spinner runs at most around the call (a switch interval or two);
    # through the module it runs all the while SQLite counts.
    assert beside_held * 5 < beside_module, (beside_held, beside_module)


def test_a_statement_binding_many_values_goes_through_the_module(store, conn):
    # ctypes binds a value for several times the module's instructions: past 256
    # values a statement (a big push's delivery rows) lets the GIL go at its steps.
    many = SLOW + " WHERE 0 NOT IN (" + ", ".join(["?"] * 257) + ")"
    cursor = held(store, conn)

    def ticks_beside(sql, args):
        with Spinner() as spinner:
            before = spinner.ticks
            assert cursor.execute(sql, args).fetchall() == [(1500000,)]
            return spinner.ticks - before
    assert ticks_beside(SLOW, ()) * 5 < ticks_beside(many, list(range(1, 258)))
    cursor.execute("CREATE TEMP TABLE m (v)")
    for n in (256, 300):                # held, then through the module
        inserted = cursor.execute("INSERT INTO m VALUES " + ", ".join(["(?)"] * n), range(n))
        assert inserted.rowcount == n
    assert cursor.execute("SELECT count(*), sum(v) FROM m").fetchone() == (556, 32640 + 44850)


def test_a_held_cursor_binds_and_reads_what_the_module_does(store, conn):
    cursor = held(store, conn)
    values = [0, -1, 2 ** 63 - 1, -2 ** 63, 1.5, "", "plain", "é中\U0001F600", "nul\x00inside",
              None, b"\x00\xffbytes", b"", True]
    cursor.execute("CREATE TEMP TABLE t (v)")
    for value in values:
        assert cursor.execute("INSERT INTO t VALUES (?)", (value,)).rowcount == 1
    select = "SELECT v FROM t ORDER BY rowid"
    expected = [(1 if value is True else value,) for value in values]
    assert cursor.execute(select).fetchall() == conn.execute(select).fetchall() == expected
    assert cursor.execute("SELECT v FROM t WHERE v IS NULL").fetchone() == (None,)
    assert cursor.execute("SELECT v FROM t WHERE 0").fetchone() is None
    assert cursor.execute("UPDATE t SET v = 7 WHERE typeof(v) = 'integer'").rowcount == 5
    assert cursor.execute("SELECT 1").rowcount == -1
    assert cursor.execute("SELECT ?, ?", [3, "x"]).fetchall() == [(3, "x")]


def test_a_held_cursor_raises_as_the_module_does_and_goes_on(store, conn):
    cursor = held(store, conn)
    cursor.execute("CREATE TEMP TABLE u (k INTEGER PRIMARY KEY)")
    cursor.execute("INSERT INTO u VALUES (?)", (1,))
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        cursor.execute("INSERT INTO u VALUES (?)", (1,))
    with pytest.raises(sqlite3.OperationalError, match="syntax"):
        cursor.execute("SELEC 1")
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        cursor.execute("SELECT * FROM nowhere")
    with pytest.raises(sqlite3.ProgrammingError):
        cursor.execute("SELECT ?", ([1],))
    for value in (2 ** 63, -2 ** 63 - 1):   # the module's error, not a value wrapped round
        with pytest.raises(OverflowError):
            conn.execute("SELECT ?", (value,))
        with pytest.raises(OverflowError):
            cursor.execute("SELECT ?", (value,))
    assert cursor.execute("INSERT INTO u VALUES (?)", (2,)).rowcount == 1
    assert cursor.execute("SELECT k FROM u ORDER BY k").fetchall() == [(1,), (2,)]


def test_a_held_cursor_keeps_64_statements_prepared_and_runs_the_rest_once(store, conn):
    cursor = held(store, conn)
    for turn in range(2):
        assert [cursor.execute(f"SELECT {i} + ?", (turn,)).fetchone()[0] for i in range(100)] \
            == [i + turn for i in range(100)]
    assert len(cursor._statements) == 64


def open_files(path):
    """This process's descriptors open on ``path``."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == path:
                found.append(fd)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc (Linux)")
@pytest.mark.parametrize("how", ["closed", "dropped"])
def test_a_connection_closed_or_dropped_closes_its_file_with_its_held_statements(
        tmp_path, how):
    path = str(tmp_path / "comet.db")
    store = comet.SQLiteStore(path)
    store.close()
    assert open_files(path) == []
    conn = store._connect()
    cursor = held(store, conn)
    assert cursor.execute("SELECT head FROM comet_meta").fetchone() == (0,)
    assert cursor._statements and open_files(path)
    if how == "closed":
        conn.close()
        for call in (lambda: cursor.execute("SELECT 1"), cursor.commit):
            with pytest.raises(sqlite3.ProgrammingError, match="closed"):
                call()                      # not the freed handle
    else:
        del conn, cursor
        gc.collect()
    # A statement left prepared would keep the database, and its file, open.
    assert open_files(path) == []


def test_a_push_batch_holds_the_gil_and_a_purge_step_does_not(store, conn):
    batch = comet._Batch()
    batch.conn = conn
    assert isinstance(store._cursor(batch), comet._HeldCursor)
    batch = comet._Batch(alone=True)
    batch.conn = conn
    assert type(store._cursor(batch)) is sqlite3.Cursor


def test_under_green_threads_a_push_batch_runs_through_the_module(store, conn, monkeypatch):
    monkeypatch.setattr(store, "_green", True)      # one thread: no GIL to hand over
    batch = comet._Batch()
    batch.conn = conn
    assert type(store._cursor(batch)) is sqlite3.Cursor


def test_a_push_the_file_keeps_waiting_lets_the_gil_go_and_goes_through(tmp_path):
    path = str(tmp_path / "comet.db")
    app = make_app(store=f"sqlite:///{path}", poll_timeout=0.2)
    try:
        app.push({"type": "note", "listeners": ["to"], "to": ["bob"], "text": "first"})
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")   # another process's transaction, say
        push_kept_waiting(app, "_step_all", lambda: other.execute("COMMIT"))
        other.close()
    finally:
        app.close()


def test_the_store_runs_without_the_library(tmp_path, monkeypatch):
    monkeypatch.setattr(comet._HeldSQLite, "load", classmethod(lambda cls: None))
    app = make_app(store=f"sqlite:///{tmp_path}/comet.db", poll_timeout=0.2)
    try:
        assert app.store._library is None
        conn = app.store._checkout()
        assert type(conn.held(None, 5000)) is sqlite3.Cursor
        app.store._checkin(conn)
        app.push({"type": "note", "listeners": ["to"], "to": ["bob"], "text": "hi"})
        assert app.store.head() == 1
    finally:
        app.close()


def test_a_connection_whose_handle_does_not_answer_as_it_does_is_not_held(store, monkeypatch):
    monkeypatch.setattr(store._library, "total_changes", lambda db: -1)
    conn = store._connect()
    try:
        assert type(conn.held(store._library, 5000)) is sqlite3.Cursor
    finally:
        conn.close()


@pytest.mark.parametrize("disk", ["fast", "slow"])
def test_a_commit_holds_the_gil_on_a_disk_that_syncs_fast_and_lets_it_go_on_a_slow_one(
        tmp_path, monkeypatch, disk):
    app = make_app(store=f"sqlite:///{tmp_path}/comet.db", poll_timeout=0.2)
    try:
        library = app.store._library
        # Every commit times as fast, or as slow, as the threshold makes it.
        monkeypatch.setattr(library.syncs, "limit", 1e9 if disk == "fast" else 0.0)
        released = Counted(library.step_released)
        monkeypatch.setattr(library, "step_released", released)
        commits = library.syncs.calls
        for n in range(130):
            app.push({"type": "note", "listeners": ["to"], "to": ["bob"], "text": str(n)})
        commits = library.syncs.calls - commits
        assert commits == 130 and app.store.head() == 130
        # Slow: held one commit in 64, to time the disk again.
        calls = library.syncs.calls
        timed = sum(1 for n in range(calls - 130, calls) if (n + 1) % 64 == 0)
        assert released.calls == (0 if disk == "fast" else 130 - timed)
    finally:
        app.close()
