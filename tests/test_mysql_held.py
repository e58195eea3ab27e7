"""The MySQL store's push statements read and write PyMySQL's socket holding the GIL
(libc's recv, send and poll through ctypes): what goes and comes back, that no
other thread runs while the server answers quickly, that a statement the server
keeps waiting (another transaction's lock) lets the GIL go, a lost connection,
and the store without them.  Statements whose results are not read go with the
next one, several to a query: the round trips of a push, a failure among them,
and a hook's connection, which takes one statement a query; a server that takes
one statement a query."""

import json
import random
import socket
import threading

import pytest

import comet
from support import Counted, Spinner, make_app, push_kept_waiting, record_queries

pytestmark = pytest.mark.alone     # its tests time the GIL's hand-overs


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


def test_a_held_statement_lets_no_other_thread_run_and_pymysqls_does(store, conn, monkeypatch):
    # Held throughout, whatever this machine makes of the server's answer times.
    monkeypatch.setattr(conn._rfile._io.waits, "limit", 1e9)
    monkeypatch.setattr(conn._rfile._io, "budget", 60_000)
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


def test_under_green_threads_a_push_batch_runs_through_pymysqls_socket(store, monkeypatch):
    monkeypatch.setattr(store, "_green", True)      # one thread: no GIL to hand over
    green = store._connect()                # PyMySQL's own socket file
    try:
        assert type(green) is store._several[0] and green.several
        assert not isinstance(green._rfile, comet._HeldReader)
        batch = comet._Batch()
        batch.conn = green
        cursor = store._cursor(batch)           # its statements still kept for the next
        assert type(cursor) is store._several[1]
        cursor.later("DO 1")
        assert cursor.execute("SELECT 2") == 1 and cursor.fetchone() == (2,)
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
        assert type(conn) is app.store._several[0]
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
            # One query a push (its START, the positions' UPDATE, its inserts and the
            # COMMIT), whose results come back in one read or several, each wait held
            # and timed: two or more a push (about four here).
            assert polled.calls > 50 and timed.calls >= 100
        else:                               # one in 64 held, the rest let go at once
            # Each push reads its answer once at least; in how many reads depends on how
            # far the server got before the first (fewer on a busy machine).
            assert polled.calls <= timed.calls <= 5 and sum(released) >= 50
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


def join(app, channel, client):
    with app.store.transaction() as tx:
        tx.add_member(channel, client, f'"{client}"', app.store.now())


@pytest.mark.parametrize("path", ["held", "green"])
def test_a_push_sends_its_start_with_its_first_statement_and_its_inserts_with_its_commit(
        url, monkeypatch, path):
    """Two round trips for a push to a channel (its members' count, then the
    positions with the package and the COMMIT), one for a push to a client, two
    with a stamp (its claim read); one a statement, a push was five to seven.
    The same under gevent, through PyMySQL's socket (here its connections made as
    there)."""
    if path == "green":
        monkeypatch.setattr(comet, "_green", lambda: True)
    app = make_app(store=url)
    if path == "green":
        conn = app.store._checkout()
        assert type(conn) is app.store._several[0] and conn.several
        app.store._checkin(conn)
    join(app, "room", "a")
    cursor = app.store.head()
    sent = record_queries(monkeypatch, app)
    app.push({"type": "note", "listeners": ["room"], "n": 1})
    # The UPDATE fails (an overflow) only if the members changed since read.
    assert sent == ["START+SELECT", "UPDATE+INSERT+COMMIT"]
    del sent[:]
    app.push({"type": "note", "listeners": ["room"], "n": 2})     # the members known: a count
    assert sent == ["START+SELECT", "UPDATE+INSERT+COMMIT"]
    del sent[:]
    app.push({"type": "note", "listeners": "bob", "n": 3})
    assert sent == ["START+UPDATE+INSERT+INSERT+COMMIT"]          # the package, its delivery
    del sent[:]
    app.push({"type": "note", "listeners": "bob", "n": 4, "_stamp": "s" * 16})
    # The stamp's claim and whether a package has the stamp, in one round trip; the
    # claim row's delete goes with the COMMIT.
    assert sent == ["START+INSERT+SELECT", "DELETE+UPDATE+INSERT+INSERT+COMMIT"]
    head, rows, _ = app.store.read("a", cursor, 10)
    assert head == cursor + 4 and [json.loads(body)["n"] for _, _, body in rows] == [1, 2]
    _, rows, _ = app.store.read("bob", cursor, 10)
    assert [json.loads(body)["n"] for _, _, body in rows] == [3, 4]


def test_a_hooks_statements_go_one_a_query_and_a_hook_making_none_costs_no_round_trip(
        url, monkeypatch):
    """A hook handed the connection has it take one statement a query before the
    hook's first (its kept START sent first); the flush's inserts still go with the
    COMMIT, and a hook that makes no statement changes nothing of the push's."""
    import pymysql
    app = make_app(store=url)
    stacked, told = [], []

    @app.listener("stacked")
    def two_at_once(environ, package, db):
        with db.cursor() as cur:
            try:
                cur.execute("SELECT 1; SELECT 2")
                stacked.append("several")
            except pymysql.err.ProgrammingError:
                stacked.append("one")
            cur.execute("SELECT @@in_transaction")      # the push's transaction, begun
            stacked.append(cur.fetchone()[0])
        return ["bob"]

    @app.listener("quiet")
    def quiet(environ, package, db):        # handed the connection, and no statement
        return ["bob"]

    app.push({"type": "note", "listeners": "bob"})     # the pool's connection made
    connection = app.store._classes()[0]
    allow = connection.allow_several
    monkeypatch.setattr(connection, "allow_several",
                        lambda conn, several: told.append(several) or allow(conn, several))
    head = app.store.head()
    sent = record_queries(monkeypatch, app)
    app.push({"type": "note", "listeners": ["stacked"]})
    assert stacked == ["one", 1] and told == [False, True]
    assert sent == ["START+DO", "SELECT+SELECT", "SELECT", "UPDATE+INSERT+INSERT+COMMIT"]
    for _ in range(2):
        del sent[:], told[:]
        app.push({"type": "note", "listeners": ["quiet"]})
        assert sent == ["START+UPDATE+INSERT+INSERT+COMMIT"] and told == []
    app.push({"type": "note", "listeners": ["stacked"]})
    assert stacked == ["one", 1, "one", 1]
    assert app.store.head() == head + 4


def test_a_statement_sent_with_the_commit_that_fails_leaves_nothing_committed(
        url, monkeypatch):
    """The server runs none of a query's statements after one that fails: the COMMIT
    does not run, the push is a 503, the connection (its transaction, holding the
    positions' row) is dropped, and the next push goes through."""
    app = make_app(store=url)
    head = app.store.head()
    cursor = app.store._classes()[1]
    commit_now = cursor.commit_now

    def after_a_failing_one(cur):
        cur.later("INSERT INTO comet_nosuch VALUES (1)")
        return commit_now(cur)
    monkeypatch.setattr(cursor, "commit_now", after_a_failing_one)
    sent = record_queries(monkeypatch, app)
    with pytest.raises(comet.CometError) as error:
        app.push({"type": "note", "listeners": "bob"})
    assert error.value.status == 503
    assert sent == ["START+UPDATE+INSERT+INSERT+INSERT+COMMIT"]
    assert app.store.head() == head
    assert app.store._query("SELECT COUNT(*) FROM comet_packages")[0][0] == 0
    monkeypatch.setattr(cursor, "commit_now", commit_now)
    app.push({"type": "note", "listeners": "bob"})
    assert app.store.head() == head + 1


def test_statements_too_long_to_go_together_go_one_a_query(store, conn, monkeypatch):
    """A query's text is at most the server's packet (``most_bytes``): statements
    kept that would make it longer go one at a time, and the cursor reads the last."""
    cur = held(store, conn)
    cur.most_bytes = 100
    sent = record_queries(monkeypatch)
    cur.later("DO %s", ("x" * 40,))
    cur.later("DO %s", ("y" * 40,))
    cur.execute("SELECT %s", ("z" * 10,))
    assert sent == ["DO", "DO", "SELECT"] and cur.fetchone() == ("z" * 10,)
    cur.later("DO %s", ("x" * 40,))
    cur.execute("SELECT %s", ("z" * 10,))
    assert sent[3:] == ["DO+SELECT"] and cur.fetchone() == ("z" * 10,)


def test_a_start_not_sent_when_its_part_is_rolled_back_is_never_sent(store, conn, monkeypatch):
    # The part failed before its first statement; the batch's next part begins again.
    batch = comet._Batch()
    batch.conn, batch.cur = conn, held(store, conn)
    store._begin(batch.cur)
    store._rollback(batch)
    store._begin(batch.cur)
    sent = record_queries(monkeypatch)
    batch.cur.execute("SELECT 1")
    batch.cur.commit()
    assert sent == ["START+SELECT", "COMMIT"]


def test_the_pools_connections_share_one_tls_context(store):
    # PyMySQL makes an SSL context for each connection, to use TLS where the server
    # offers it; loading the CA certificates took ~35 ms of CPU each time the pool grew.
    first, second = store._checkout(), store._checkout()
    try:
        assert first is not second and first.open and second.open
        assert getattr(first, "ctx", None) is getattr(second, "ctx", None)
        with second.cursor() as cur:
            cur.execute("SELECT 7")
            assert cur.fetchone() == (7,)
    finally:
        store._checkin(first)
        store._checkin(second)


def test_a_server_taking_one_statement_a_query_stores_and_hands_on_the_same_positions(
        url, mariadb, monkeypatch):
    """Where the server refuses several statements a query (told at connect), each
    goes alone, and the positions the flush hands on (to wake the parked polls)
    are still the ones stored; a push whose channel's members changed after it
    read them (its positions' UPDATE failing) still goes through."""
    import pymysql
    app = make_app(store=url)
    connection = app.store._classes()[0]

    @app.action("bumped").on_emit
    def bumped(package, recipient, private, db):
        # A membership change committed elsewhere since the push read the members.
        mariadb.query(url, "UPDATE comet_meta SET changes = changes + 1")
        return package

    def refused(conn, several):
        raise pymysql.err.NotSupportedError(1235, "not with this server")
    monkeypatch.setattr(connection, "allow_several", refused)
    with app.store._pool_lock:              # the pool's connections were told: new ones
        pooled, app.store._pool = app.store._pool, []
    for conn in pooled:
        conn.close()
    handed = []
    commit = app.store.on_commit
    app.store.on_commit = lambda appended: handed.extend(appended) or commit(appended)
    join(app, "room", "a")
    head = app.store.head()
    sent = record_queries(monkeypatch, app)
    stamps = [app.push({"type": "note", "listeners": ["room"], "n": 1}),
              app.push({"type": "note", "listeners": "bob", "n": 2}),
              app.push({"type": "note", "listeners": "bob", "n": 3, "_stamp": "t" * 16}),
              app.push({"type": "bumped", "listeners": ["room"], "n": 4})]
    assert sent and not any("+" in query for query in sent)
    positions = [head + 1, head + 2, head + 3, head + 4]
    assert [position for position, _, _ in handed[-4:]] == positions
    rows = app.store._query("SELECT pos, stamp, channel FROM comet_packages WHERE pos > %s"
                            " ORDER BY pos", (head,))
    assert [(position, comet._text(stamp)) for position, stamp, _ in rows] == \
        list(zip(positions, stamps))
    assert [comet._text(channel) for *_, channel in rows] == ["room", None, None, None]
    _, read, _ = app.store.read("a", head, 10)
    assert [json.loads(body)["n"] for _, _, body in read] == [1, 4]
