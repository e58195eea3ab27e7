"""The PostgreSQL store runs a push's own statements holding the GIL, through ctypes
on the libpq psycopg loaded: what they send and read back, that no other thread
runs while the server answers quickly, that a statement the server keeps waiting
(another transaction's lock) lets the GIL go, errors and a lost connection as
psycopg raises them, and the store without the library."""

import json
import os
import select
import types

import pytest

import comet
from support import Counted, Spinner, make_app, push_kept_waiting

pytestmark = pytest.mark.alone     # its tests time the GIL's hand-overs


@pytest.fixture
def url(postgres):
    return postgres.create_database()


@pytest.fixture
def store(url):
    store = comet.PostgreSQLStore(url)
    yield store
    store.close()


@pytest.fixture
def conn(store):
    conn = store._checkout()
    yield conn
    store._checkin(conn)


def held(store, conn):
    batch = comet._Batch()
    batch.conn = conn
    cursor = store._cursor(batch)
    assert isinstance(cursor, comet._HeldPQCursor)
    return cursor


def test_the_library_loads_here(store):
    # Linux, CPython with a GIL and psycopg's libpq: the tests below must not pass by
    # falling back.
    assert comet._HeldPQ.load(store._psycopg) is not None and store._library is not None


def test_a_held_statement_lets_no_other_thread_run_and_psycopgs_does(store, conn, monkeypatch):
    # Held throughout, whatever this machine makes of the server's answer times.
    monkeypatch.setattr(store._library.io.waits, "limit", 1e9)
    monkeypatch.setattr(store._library.io, "budget", 60_000)
    def ticks_beside(cursor):
        with Spinner() as spinner:
            before = spinner.ticks
            cursor.execute("SELECT pg_sleep(0.003), 7")
            assert cursor.fetchone()[1] == 7
            return spinner.ticks - before
    beside_held = min(ticks_beside(held(store, conn)) for _ in range(3))
    beside_psycopg = min(ticks_beside(conn.cursor()) for _ in range(3))
    # Held, the spinner runs at most around the call; through psycopg it runs all the
    # while the server sleeps.
    assert beside_held * 5 < beside_psycopg, (beside_held, beside_psycopg)


def test_a_held_cursor_sends_and_reads_what_psycopgs_does(store, conn):
    cursor, plain = held(store, conn), conn.cursor()
    statements = [
        ("SELECT %s, %s, %s, %s, %s", (0, -1, 2 ** 63 - 1, -2 ** 63, None)),
        ("SELECT %s, %s, %s", ("", "plain", "é中\U0001F600 'q' \"d\" \\b")),
        ("SELECT %s::bigint[], %s::text[], %s::text[]", ([1, 2, 3], ["a", 'b"c', None], [])),
        ("SELECT %(a)s + %(b)s, %(a)s", dict(a=2, b=40)),
        ("SELECT true, false, 1.5::float8, 2.25::numeric, '{\"k\": [1]}'::json, 5::int2", ()),
        ("SELECT x, x::text FROM generate_series(1, 300) AS x", ()),
        ("SELECT 1 WHERE false", ()),
        ("SELECT 100 %% 7", ()),
    ]
    for sql, args in statements * 2:      # the second time, as prepared
        assert cursor.execute(sql, args).fetchall() == plain.execute(sql, args).fetchall()
        assert cursor.rowcount == plain.rowcount, sql
    assert cursor.execute("SELECT 1 WHERE false").fetchone() is None
    cursor.execute("CREATE TEMP TABLE t (k bigint PRIMARY KEY, v text)")
    assert cursor.rowcount == -1 and cursor.fetchall() == []
    assert cursor.execute("INSERT INTO t SELECT k, 'v' || k FROM unnest(%s::bigint[]) AS k",
                          ([1, 2, 3],)).rowcount == 3
    assert cursor.execute("UPDATE t SET v = %s WHERE k > %s", ("w", 1)).rowcount == 2
    assert cursor.execute("DELETE FROM t WHERE k = %s RETURNING v", (3,)).fetchall() == [("w",)]
    assert conn.execute("SELECT k, v FROM t ORDER BY k").fetchall() == [(1, "v1"), (2, "w")]


def prepared(conn):
    return dict(conn.execute("SELECT name, statement FROM pg_prepared_statements"
                             " WHERE name LIKE 'comet%%'").fetchall())


def test_a_statement_with_parameters_is_prepared_once_a_connection(store, conn):
    cursor = held(store, conn)
    for n in range(3):
        assert cursor.execute("SELECT %s + 1", (n,)).fetchone() == (n + 1,)
        assert cursor.execute("SELECT %s || 'x'", (str(n),)).fetchone() == (f"{n}x",)
        assert cursor.execute("SELECT 7").fetchone() == (7,)    # no parameters: sent as it is
    assert sorted(prepared(conn).values()) == ["SELECT $1 + 1", "SELECT $1 || 'x'"]
    # Another cursor of the same connection (the next batch's) finds them prepared.
    assert held(store, conn).execute("SELECT %s + 1", (41,)).fetchone() == (42,)
    assert len(prepared(conn)) == 2
    # The same text with a parameter of another type: a statement of its own.
    assert cursor.execute("SELECT %s + 1", (2 ** 40,)).fetchone() == (2 ** 40 + 1,)
    assert len(prepared(conn)) == 3
    # Beside a statement psycopg is told to prepare, under a name of its own.
    assert conn.execute("SELECT %s + 2", (1,), prepare=True).fetchone() == (3,)
    assert held(store, conn).execute("SELECT %s + 2", (1,)).fetchone() == (3,)


def test_at_most_64_statements_are_prepared_a_connection_and_the_rest_still_run(store, conn):
    cursor = held(store, conn)
    for n in range(70):
        assert cursor.execute(f"SELECT %s + {n}", (1,)).fetchone() == (n + 1,)
    assert len(prepared(conn)) == 64
    assert cursor.execute("SELECT %s + 69", (1,)).fetchone() == (70,)


def test_psycopg_prepares_nothing_of_its_own_whose_rollback_would_deallocate_the_stores(
        store, conn):
    assert conn.prepare_threshold is None
    cursor = held(store, conn)
    assert cursor.execute("SELECT %s + 1", (1,)).fetchone() == (2,)
    for n in range(8):                      # run often through psycopg: not prepared
        conn.execute("SELECT %s + 2", (n,))
    conn.execute("BEGIN")
    conn.rollback()
    assert list(prepared(conn).values()) == ["SELECT $1 + 1"]
    assert cursor.execute("SELECT %s + 1", (2,)).fetchone() == (3,)


def test_a_statement_deallocated_behind_the_stores_back_fails_once_then_is_prepared_again(
        store, conn):
    psycopg = store._psycopg
    cursor = held(store, conn)
    assert cursor.execute("SELECT %s + 1", (1,)).fetchone() == (2,)
    assert cursor.execute("SELECT %s + 2", (1,)).fetchone() == (3,)
    before = set(prepared(conn))
    conn.execute("DEALLOCATE ALL")
    with pytest.raises(store._errors) as raised:     # the store's: a 503
        cursor.execute("SELECT %s + 1", (1,))
    assert isinstance(raised.value.__cause__, psycopg.errors.InvalidSqlStatementName)
    assert cursor.execute("SELECT %s + 1", (1,)).fetchone() == (2,)
    assert cursor.execute("SELECT %s + 2", (1,)).fetchone() == (3,)
    # Under new names: one left behind could not collide.
    assert len(prepared(conn)) == 2 and not before & set(prepared(conn))


def test_a_statement_that_cannot_be_prepared_raises_and_the_next_is_prepared(store, conn):
    psycopg = store._psycopg
    cursor = held(store, conn)
    for _ in range(2):
        with pytest.raises(psycopg.errors.UndefinedTable):
            cursor.execute("SELECT * FROM nowhere WHERE x = %s", (1,))
    assert cursor.execute("SELECT %s", (5,)).fetchone() == (5,)
    assert list(prepared(conn).values()) == ["SELECT $1"]


def test_a_begin_goes_with_the_next_statement_and_a_commit_with_its_statement(
        store, conn, monkeypatch):
    monkeypatch.setattr(comet._HeldPQCursor, "_most_prepared", 0)   # a round trip each
    psycopg = store._psycopg
    status = psycopg.pq.TransactionStatus
    conn.execute("CREATE TABLE v (k bigint PRIMARY KEY)")
    cursor, waits = held(store, conn), store._library.io.waits
    cursor.later("BEGIN")
    assert conn.info.transaction_status == status.IDLE     # not sent yet
    calls = waits.calls
    assert cursor.execute("INSERT INTO v VALUES (%s) RETURNING k", (1,)).fetchall() == [(1,)]
    assert conn.info.transaction_status == status.INTRANS and waits.calls == calls + 1
    # The rows and count are the statement's, not the COMMIT's after it.
    assert cursor.execute("INSERT INTO v VALUES (%s), (%s) RETURNING k", (2, 3),
                          commit=True).fetchall() == [(2,), (3,)]
    assert cursor.rowcount == 2 and waits.calls == calls + 2
    assert conn.info.transaction_status == status.IDLE
    cursor.commit()                         # it went with the statement: nothing more
    assert waits.calls == calls + 2
    other = store._connect()
    assert other.execute("SELECT k FROM v ORDER BY k").fetchall() == [(1,), (2,), (3,)]
    # A statement that fails: the COMMIT after it does not run, the first error is raised.
    cursor.later("BEGIN")
    with pytest.raises(psycopg.errors.UniqueViolation):
        cursor.execute("INSERT INTO v VALUES (%s), (%s)", (4, 1), commit=True)
    assert conn.info.transaction_status == status.INERROR
    conn.rollback()                         # psycopg finds the connection as the cursor left it
    assert other.execute("SELECT count(*) FROM v").fetchone() == (3,)
    # A hook handed the connection finds the transaction begun.
    cursor.later("BEGIN")
    cursor.send_later()
    assert conn.info.transaction_status == status.INTRANS
    cursor.send_later()
    assert cursor.execute("SELECT %s", (5,), commit=True).fetchone() == (5,)
    assert conn.info.transaction_status == status.IDLE
    # A statement with parameters waits as well; one forgotten is never sent.
    cursor.later("BEGIN")
    cursor.later("DELETE FROM v WHERE k = %s", (1,))
    calls = waits.calls
    assert cursor.execute("SELECT count(*) FROM v", commit=True).fetchone() == (2,)
    assert waits.calls == calls + 1
    cursor.later("DELETE FROM v WHERE k = %s", (2,))
    cursor.forget_later()
    assert cursor.execute("SELECT count(*) FROM v").fetchone() == (2,)
    assert other.execute("SELECT k FROM v ORDER BY k").fetchall() == [(2,), (3,)]
    other.close()


def test_a_begin_not_sent_when_its_part_is_rolled_back_is_never_sent(store, conn):
    # The part failed before its first statement; the batch's next part begins again.
    notices = []
    conn.add_notice_handler(lambda diagnostic: notices.append(diagnostic.message_primary))
    batch = comet._Batch()
    batch.conn, batch.cur = conn, held(store, conn)
    store._begin(batch.cur)
    store._rollback(batch)
    store._begin(batch.cur)
    assert batch.cur.execute("SELECT %s", (1,), commit=True).fetchone() == (1,)
    assert conn.execute("SELECT 2").fetchone() == (2,) and notices == []


def test_a_held_cursor_sends_and_reads_a_large_statement(store, conn):
    # Larger than the socket takes at once: sent as the server drains it.
    cursor = held(store, conn)
    text = "é" * 3_000_000
    assert cursor.execute("SELECT length(%s), %s", (text, text)).fetchone() == (len(text), text)


def test_a_held_cursor_raises_as_psycopg_does_and_goes_on(store, conn):
    psycopg = store._psycopg
    cursor = held(store, conn)
    cursor.execute("CREATE TEMP TABLE u (k bigint PRIMARY KEY)")
    cursor.execute("INSERT INTO u VALUES (%s)", (1,))
    for sql, args, kind, match in [
            ("INSERT INTO u VALUES (%s)", (1,), psycopg.errors.UniqueViolation, "duplicate"),
            ("SELEC 1", (), psycopg.errors.SyntaxError, "syntax"),
            ("SELECT * FROM nowhere", (), psycopg.errors.UndefinedTable, "nowhere"),
            ("SELECT 1 / %s", (0,), psycopg.errors.DivisionByZero, "division")]:
        with pytest.raises(kind, match=match):
            cursor.execute(sql, args)
        with pytest.raises(kind, match=match):
            conn.cursor().execute(sql, args)
    with pytest.raises(psycopg.ProgrammingError):
        cursor.execute("SELECT %s, %s", (1,))   # psycopg's own check, before sending
    cursor.execute("BEGIN")
    with pytest.raises(psycopg.errors.UniqueViolation):
        cursor.execute("INSERT INTO u VALUES (%s)", (1,))
    with pytest.raises(psycopg.errors.InFailedSqlTransaction):
        cursor.execute("SELECT 1")
    conn.rollback()                         # psycopg finds the transaction as the cursor left it
    assert cursor.execute("INSERT INTO u VALUES (%s)", (2,)).rowcount == 1
    assert cursor.execute("SELECT k FROM u ORDER BY k").fetchall() == [(1,), (2,)]


def test_a_connection_lost_raises_an_operational_error_and_the_store_goes_on(url, postgres):
    psycopg = pytest.importorskip("psycopg")
    app = make_app(store=url, poll_timeout=0.2)
    try:
        app.push({"type": "note", "listeners": ["to"], "to": ["bob"], "text": "first"})
        conn = app.store._checkout()
        cursor = held(app.store, conn)
        postgres.query(url, "SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        with pytest.raises(psycopg.OperationalError):
            cursor.execute("SELECT 1")
        app.store._drop(conn)
        postgres.query(url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE datname = current_database() AND pid <> pg_backend_pid()")
        answers = []
        for n in range(3):                  # a pooled connection found dead fails a push
            try:
                answers.append(app.push({"type": "note", "listeners": ["to"], "to": ["bob"]}))
            except comet.CometError as error:
                assert error.status == 503
        assert answers and app.store.head() == 1 + len(answers)
    finally:
        app.close()


def test_a_push_batch_holds_the_gil_and_a_purge_step_does_not(store, conn):
    held(store, conn)
    batch = comet._Batch(alone=True)
    batch.conn = conn
    assert not isinstance(store._cursor(batch), comet._HeldPQCursor)


def test_under_green_threads_a_push_batch_runs_through_psycopg(store, conn, monkeypatch):
    monkeypatch.setattr(store, "_green", True)      # one thread: no GIL to hand over
    batch = comet._Batch()
    batch.conn = conn
    assert not isinstance(store._cursor(batch), comet._HeldPQCursor)


def test_a_push_waiting_for_another_transactions_lock_lets_the_gil_go_and_goes_through(
        url, store):
    app = make_app(store=url, poll_timeout=0.2)
    try:
        app.push({"type": "note", "listeners": ["to"], "to": ["bob"], "text": "first"})
        other = store._connect()
        other.execute("BEGIN")
        other.execute("UPDATE comet_meta SET changes = changes")  # its row lock, held
        push_kept_waiting(app, "_wait", lambda: other.execute("COMMIT"))
        other.close()
    finally:
        app.close()


def test_the_store_runs_without_the_library(url, monkeypatch):
    monkeypatch.setattr(comet._HeldPQ, "load", classmethod(lambda cls, psycopg: None))
    app = make_app(store=url, poll_timeout=0.2)
    try:
        assert app.store._library is None
        conn = app.store._checkout()
        batch = comet._Batch()
        batch.conn = conn
        assert not isinstance(app.store._cursor(batch), comet._HeldPQCursor)
        app.store._checkin(conn)
        app.push({"type": "note", "listeners": ["to"], "to": ["bob"], "text": "hi"})
        assert app.store.head() == 1
    finally:
        app.close()


def test_a_library_that_is_not_psycopgs_is_not_used(store, monkeypatch):
    monkeypatch.setattr(store._psycopg.pq, "version", lambda: 1)
    assert comet._HeldPQ.load(store._psycopg) is None


@pytest.mark.parametrize("server", ["near", "far"])
def test_a_wait_holds_the_gil_while_the_server_answers_quickly_and_lets_it_go_if_not(
        url, monkeypatch, server):
    app = make_app(store=url, poll_timeout=0.2)
    try:
        library = app.store._library
        # The flush's statement is prepared at the first push, a round trip more.
        app.push({"type": "note", "listeners": ["to"], "to": ["bob"], "text": "first"})
        # Every round trip times as quick, or as slow, as the limit makes it.
        monkeypatch.setattr(library.io.waits, "limit", 1e9 if server == "near" else 0.0)
        # The rule, for a budget that holds (a PostgreSQL wait holds none by default);
        # near, no commit's sync outlasts the hold.
        monkeypatch.setattr(library.io, "budget", 60_000 if server == "near" else 5)
        timed = Counted(library.io.waits.took)
        monkeypatch.setattr(library.io.waits, "took", timed)
        released = Counted(select.poll)
        monkeypatch.setattr(comet, "select", types.SimpleNamespace(poll=released))
        calls = library.io.waits.calls
        for n in range(50):
            app.push({"type": "note", "listeners": ["to"], "to": ["bob"], "text": str(n)})
        # One round trip a push: the BEGIN, the flush and the COMMIT (the listener is
        # handed the connection, and makes no statement).  Far, each waits with the
        # GIL let go but one in 64.
        assert library.io.waits.calls - calls == 50 and app.store.head() == 51
        holds = sum(1 for n in range(calls + 1, calls + 51) if n % 64 == 0)
        assert timed.calls == (50 if server == "near" else holds)
        assert (released.calls == 0) if server == "near" else released.calls >= 50 - holds
    finally:
        app.close()


def test_by_default_a_pushs_waits_for_postgresql_let_the_gil_go(url, monkeypatch):
    app = make_app(store=url, poll_timeout=0.2)
    try:
        library = app.store._library
        app.push({"type": "note", "listeners": ["to"], "to": ["bob"], "text": "first"})
        timed = Counted(library.io.waits.took)
        monkeypatch.setattr(library.io.waits, "took", timed)
        released = Counted(select.poll)
        monkeypatch.setattr(comet, "select", types.SimpleNamespace(poll=released))
        for n in range(20):
            app.push({"type": "note", "listeners": ["to"], "to": ["bob"], "text": str(n)})
        # A round trip a push, waiting with the GIL let go; none held.
        assert released.calls >= 20 and timed.calls == 0 and app.store.head() == 21
    finally:
        app.close()


def test_a_wait_letting_the_gil_go_works_on_a_descriptor_past_1024(store, monkeypatch):
    # A server holding thousands of polls has descriptors past select()'s FD_SETSIZE.
    spare = []
    try:
        while not spare or spare[-1] < 1100:
            spare.append(os.open(os.devnull, os.O_RDONLY))
        conn = store._connect()
        try:
            assert conn.fileno() > 1024
            monkeypatch.setattr(store._library.io, "budget", 0)    # every wait lets go
            cursor = held(store, conn)
            assert cursor.execute("SELECT pg_sleep(0.01), %s", (5,)).fetchone() == ("", 5)
        finally:
            conn.close()
    finally:
        for fd in spare:
            os.close(fd)


def test_a_channels_members_are_read_as_one_row(store, conn):
    tx = comet._PostgreSQLTransaction(store, comet._Batch())
    tx.cur = held(store, conn)
    assert tx._members("nobody")[0] == []
    ids = [f"c{i}é" for i in range(1000)]
    conn.execute("INSERT INTO comet_members SELECT 'room', c, 's', 0 FROM unnest(%s::text[]) c",
                 (ids,))
    members, changes = tx._members("room")
    assert sorted(members) == sorted(ids) and changes == 0
    assert json.dumps(members)                  # plain strs
