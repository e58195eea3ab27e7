"""The MySQL store's push statements read and write PyMySQL's socket holding the GIL
(libc's recv, send and poll through ctypes): what goes and comes back, that no
other thread runs while the server answers quickly, that a statement the server
keeps waiting (another transaction's lock) lets the GIL go, a lost connection,
and the store without them."""

import random
import socket
import threading

import pytest

import comet
from support import Counted, Spinner, make_app, push_kept_waiting


@pytest.fixture
def url(mariadb):
    return mariadb.create_database()


@pytest.fixture
def store(url):
    store = comet.MySQLStore(url)
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
    assert isinstance(cursor, store._held[1]) and isinstance(conn._rfile, comet._HeldReader)
    return cursor


def test_the_socket_calls_load_here(store, conn):
    # Linux and CPython with a GIL: the tests below must not pass by falling back.
    assert comet._HeldIO.load() is not None and store._held is not None
    assert isinstance(conn._rfile, comet._HeldReader) and not conn._rfile.held


def test_a_held_statement_lets_no_other_thread_run_and_pymysqls_does(store, conn):
    def ticks_beside(cursor):
        with Spinner() as spinner:
            before = spinner.ticks
            cursor.execute("SELECT SLEEP(0.003), 7")
            assert cursor.fetchone()[1] == 7
            return spinner.ticks - before
    beside_held = min(ticks_beside(held(store, conn)) for _ in range(3))
    beside_pymysql = min(ticks_beside(conn.cursor()) for _ in range(3))
    # Held, the spinner runs at most around the call; through PyMySQL's socket it
    # runs all the while the server sleeps.
    assert beside_held * 5 < beside_pymysql, (beside_held, beside_pymysql)
    assert not conn._rfile.held             # only while the store's own statement runs


def test_a_held_cursor_sends_and_reads_what_pymysqls_does(store, conn):
    cursor, plain = held(store, conn), conn.cursor()
    big = "é中\U0001F600" * 100_000          # larger than a read, or a send, at once
    statements = [
        ("SELECT %s, %s, %s, %s, %s", (0, -1, 2 ** 63 - 1, -2 ** 63, None)),
        ("SELECT %s, %s, %s", ("", "plain 'q' \"d\" \\b", "é中\U0001F600")),
        ("SELECT CHAR_LENGTH(%s), %s", (big, big)),
        ("SELECT REPEAT('x', 300000), 1.5, CAST(2.25 AS DECIMAL(5, 2))", ()),
        ("SELECT seq, CONCAT('v', seq) FROM seq_1_to_3000", ()),
        ("SELECT 1 FROM DUAL WHERE FALSE", ()),
    ]
    for sql, args in statements:
        cursor.execute(sql, args)
        plain.execute(sql, args)
        assert cursor.fetchall() == plain.fetchall()
        assert cursor.rowcount == plain.rowcount, sql
    cursor.execute("CREATE TEMPORARY TABLE t (k BIGINT PRIMARY KEY, v LONGTEXT)"
                   " CHARACTER SET utf8mb4")
    assert cursor.execute("INSERT INTO t VALUES (%s, %s), (%s, %s)", (1, "a", 2, big)) == 2
    assert cursor.execute("UPDATE t SET v = %s WHERE k > %s", ("w", 1)) == 1
    plain.execute("SELECT k, v FROM t ORDER BY k")
    assert plain.fetchall() == ((1, "a"), (2, "w"))


def test_a_held_cursor_raises_as_pymysqls_does_and_goes_on(store, conn):
    pymysql = store._pymysql
    cursor = held(store, conn)
    cursor.execute("CREATE TEMPORARY TABLE u (k BIGINT PRIMARY KEY)")
    cursor.execute("INSERT INTO u VALUES (%s)", (1,))
    for sql, args, kind, match in [
            ("INSERT INTO u VALUES (%s)", (1,), pymysql.err.IntegrityError, "Duplicate"),
            ("SELEC 1", (), pymysql.err.ProgrammingError, "syntax"),
            ("SELECT * FROM nowhere", (), pymysql.err.ProgrammingError, "nowhere")]:
        with pytest.raises(kind, match=match):
            cursor.execute(sql, args)
        with pytest.raises(kind, match=match):
            conn.cursor().execute(sql, args)
    assert not conn._rfile.held
    assert cursor.execute("INSERT INTO u VALUES (%s)", (2,)) == 1
    cursor.execute("SELECT k FROM u ORDER BY k")
    assert cursor.fetchall() == ((1,), (2,))


def test_a_connection_lost_raises_an_operational_error_and_the_store_goes_on(url, mariadb):
    pymysql = pytest.importorskip("pymysql")
    app = make_app(store=url, poll_timeout=0.2)
    try:
        app.push({"type": "note", "listeners": ["to"], "to": ["bob"], "text": "first"})
        conn = app.store._checkout()
        cursor = held(app.store, conn)
        mariadb.query(url, f"KILL {conn.thread_id()}")
        with pytest.raises(pymysql.err.OperationalError):
            cursor.execute("SELECT 1")
        app.store._drop(conn)
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
    assert type(store._cursor(batch)) is store._pymysql.cursors.Cursor


def test_under_green_threads_a_push_batch_runs_through_pymysql(store, conn, monkeypatch):
    monkeypatch.setattr(store, "_green", True)      # one thread: no GIL to hand over
    batch = comet._Batch()
    batch.conn = conn
    assert type(store._cursor(batch)) is store._pymysql.cursors.Cursor
    green = store._connect()                # PyMySQL's own connection and socket file
    try:
        assert type(green) is store._pymysql.connections.Connection
        assert not isinstance(green._rfile, comet._HeldReader)
    finally:
        green.close()


def test_a_push_waiting_for_another_transactions_lock_lets_the_gil_go_and_goes_through(
        url, store):
    app = make_app(store=url, poll_timeout=0.2)
    try:
        app.push({"type": "note", "listeners": ["to"], "to": ["bob"], "text": "first"})
        other = store._connect()
        other.cursor().execute("START TRANSACTION")
        other.cursor().execute("UPDATE comet_meta SET changes = changes + 0")   # its row lock
        push_kept_waiting(app, "_fill", other.commit)
        other.close()
    finally:
        app.close()


def test_the_store_runs_without_the_socket_calls(url, monkeypatch):
    monkeypatch.setattr(comet._HeldIO, "load", classmethod(lambda cls: None))
    app = make_app(store=url, poll_timeout=0.2)
    try:
        assert app.store._held is None
        conn = app.store._checkout()
        assert type(conn) is app.store._pymysql.connections.Connection
        assert not isinstance(conn._rfile, comet._HeldReader)
        app.store._checkin(conn)
        app.push({"type": "note", "listeners": ["to"], "to": ["bob"], "text": "hi"})
        assert app.store.head() == 1
    finally:
        app.close()


@pytest.mark.parametrize("server", ["near", "far"])
def test_a_wait_holds_the_gil_while_the_server_answers_quickly_and_lets_it_go_if_not(
        url, monkeypatch, server):
    app = make_app(store=url, poll_timeout=0.2)
    try:
        conn = app.store._checkout()
        io = conn._rfile._io
        app.store._checkin(conn)
        # Every round trip times as quick, or as slow, as the limit makes it.
        monkeypatch.setattr(io.waits, "limit", 1e9 if server == "near" else 0.0)
        if server == "near":                # and no commit outlasts the hold
            monkeypatch.setattr(io, "budget", 60_000)
        polled = Counted(io._poll)
        monkeypatch.setattr(io, "_poll", polled)
        released = []
        recv = comet._HeldReader._fill

        def fill(reader):
            data = recv(reader)
            released.append(reader.held and polled.calls == polls[0])
            polls[0] = polled.calls
            return data
        polls = [polled.calls]
        monkeypatch.setattr(comet._HeldReader, "_fill", fill)
        timed = Counted(io.waits.took)
        monkeypatch.setattr(io.waits, "took", timed)
        for n in range(50):
            app.push({"type": "note", "listeners": ["to"], "to": ["bob"], "text": str(n)})
        assert app.store.head() == 50
        if server == "near":
            assert polled.calls > 50 and timed.calls >= 150
        else:                               # one in 64 held, the rest let go at once
            assert polled.calls <= timed.calls <= 5 and sum(released) >= 100
    finally:
        app.close()


@pytest.mark.parametrize("held_reads", [True, False])
def test_the_reader_hands_back_every_byte_in_order_whatever_the_sizes(held_reads):
    io = comet._HeldIO.load()
    near, far = socket.socketpair()
    near.settimeout(5)
    try:
        reader = comet._HeldReader(near, io)
        reader.held = held_reads
        sent = bytes(random.Random(7).getrandbits(8) for _ in range(300_000))
        writer = threading.Thread(target=lambda: [far.sendall(sent[at:at + 7_001])
                                                  for at in range(0, len(sent), 7_001)])
        writer.start()
        sizes = random.Random(8)
        got = []
        while sum(map(len, got)) < len(sent):
            size = min(sizes.choice([1, 4, 100, 65_535, 65_536, 65_537, 140_000]),
                       len(sent) - sum(map(len, got)))
            got.append(reader.read(size))
            assert len(got[-1]) == size     # all of it: PyMySQL takes a short read for the end
        writer.join()
        assert b"".join(got) == sent
        far.close()
        assert reader.read(4) == b""        # the end: short, as PyMySQL finds a lost connection
    finally:
        near.close()
        far.close()
