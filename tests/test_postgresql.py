"""What only the PostgreSQL store does, against the real PostgreSQL on 127.0.0.1:5432:
NOTIFY at each commit, a LISTEN connection per process, psycopg under gevent.

What every SQL server store does (byte-for-byte ids, hooks in the transaction,
the outage) is in test_sql_servers.py, run on MariaDB and PostgreSQL alike;
two processes on one database in test_multiprocess.py.  Each test makes its
own database; without a reachable PostgreSQL the module skips loudly (and
fails under CI=true).
"""

import json
import subprocess
import sys
import threading
import time

import pytest
import webtest

import comet
from support import (ROOT, Client, ThreadedServer, close_apps, fresh_store, make_app,  # noqa: F401
                     need, need_gevent, new_ids, open_group, wait_until)


@pytest.fixture
def url(postgres):
    return postgres.create_database()


class Listener:
    """A LISTEN on the store's channel from a connection of the test's own."""

    def __init__(self, url):
        import psycopg
        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute("LISTEN comet")

    def heard(self, count=0, quiet=0.3):
        """The heads notified (the first word of each payload): ``count`` of them, waited
        for up to 10 s, then any more that come within ``quiet`` seconds."""
        heads = [n.payload.split()[0] for n in self.conn.notifies(timeout=10, stop_after=count)] \
            if count else []
        return heads + [n.payload.split()[0] for n in self.conn.notifies(timeout=quiet)]

    def close(self):
        self.conn.close()


@pytest.fixture
def listen():
    """``listen(url)``: a ``Listener`` on that store's database, closed after the test."""
    listeners = []

    def open_listener(url):
        listeners.append(Listener(url))
        return listeners[-1]
    yield open_listener
    for listener in listeners:
        listener.close()


# --------------------------------------------------------------------------
# Opening the store
# --------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_both_url_schemes_open_a_postgresql_store_whose_url_hides_the_password(url, scheme):
    with_password = url.replace("postgresql://postgres@", f"{scheme}://postgres:secret@")

    store = comet.open_store(with_password)
    store.close()

    assert isinstance(store, comet.PostgreSQLStore)
    assert "secret" not in store.url and store.url.startswith("postgresql://postgres@")


def test_without_psycopg_opening_the_store_says_what_to_install(url, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)       # import psycopg fails

    with pytest.raises(ImportError, match=r'pip install "comet-py\[postgresql\]"'):
        comet.open_store(url)


def test_processes_opening_a_new_database_at_once_create_the_tables_once(url):
    start, errors, stores = threading.Barrier(6), [], []

    def open_at_once():
        start.wait(10)
        try:
            stores.append(comet.PostgreSQLStore(url))
        except Exception as error:
            errors.append(error)
    threads = [threading.Thread(target=open_at_once) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for store in stores:
        store.close()

    assert errors == [] and len(stores) == 6
    assert len({store.id for store in stores}) == 1


def test_processes_opening_the_store_while_others_push_neither_wait_nor_deadlock(url):
    app = make_app(store=url)
    stop, failed, pushed = threading.Event(), [], []

    def push():
        while not stop.is_set() and len(pushed) < 5000:
            try:
                pushed.append(app.push({"type": "m", "listeners": "bob"}))
            except comet.CometError as error:
                failed.append(error.message)
    pushers = [threading.Thread(target=push) for _ in range(4)]
    for thread in pushers:
        thread.start()
    try:
        wait_until(lambda: len(pushed) >= 20)
        stores = []
        for _ in range(8):                  # one after another, each while the pushes go on
            stores.append(comet.PostgreSQLStore(url))
            stores[-1].close()
    finally:
        stop.set()
        for thread in pushers:
            thread.join(30)

    assert failed == [] and {store.id for store in stores} == {app.store.id}


# --------------------------------------------------------------------------
# Ids PostgreSQL cannot hold
# --------------------------------------------------------------------------

@pytest.fixture
def group(request, postgres, tmp_path):
    group = open_group("postgresql", request, tmp_path)
    yield group
    group.app.close()


def test_a_package_for_an_id_holding_nul_is_400_and_its_batch_commits_without_it(group):
    failed = {}

    def push_nul():
        try:
            group.app.push({"type": "note", "listeners": "bob\x00", "text": "nul"})
        except comet.CometError as error:
            failed["status"], failed["code"] = error.status, error.code
    threads = [group.push("hold")]
    assert group.held.wait(10)
    threads += [threading.Thread(target=push_nul, name="push nul"), group.push("kept")]
    threads[1].start()
    group.wait_queued(thread.name for thread in threads[1:])
    group.released.set()
    for thread in threads:
        thread.join(10)

    assert failed == {"status": 400, "code": "bad_package"}
    assert isinstance(group.results["hold"], str) and isinstance(group.results["kept"], str)
    assert group.flushes == [2] and sorted(group.delivered()) == ["hold", "kept"]
    assert group.log() == ["hold", "kept"]                  # the refused one's write undone


@pytest.mark.parametrize("store", ["postgresql", "mysql", "sqlite", "memory"])
def test_a_channel_name_or_a_client_id_holding_nul_is_refused_where_it_cannot_be_stored(
        request, tmp_path, store):
    """PostgreSQL: a package to a channel whose name holds U+0000 is 400 and a
    request from a client id holding it 403, before either reaches the database:
    psycopg refuses such text, which would make a 500 of the request, and of the
    presence sweep that records every client seen in one statement.  The other
    stores hold them as any other text."""
    app = make_app(store=fresh_store(store, request, tmp_path))
    try:
        web = webtest.TestApp(app)
        head = app.store.head()
        answers = [web.post_json("/comet/push", {"type": kind, "listeners": ["room:a\x00b"]},
                                 headers={"X-Client": "ann"}, expect_errors=True)
                   for kind in ("join", "msg", "leave")]
        poll = web.get("/comet/poll", headers={"X-Client": "nul\x00"}, expect_errors=True)
        if store != "postgresql":
            assert [answer.status_int for answer in answers] == [200, 200, 200]
            assert poll.status_int == 200
            return
        assert [(a.status_int, a.json["error"]) for a in answers] == [(400, "bad_package")] * 3
        assert poll.status_int == 403 and poll.json["error"] == "forbidden"
        assert app.store.head() == head and app.store.members("room:a\x00b") == {}
        assert "nul\x00" not in app._seen
        app._sweep_presence()                       # every client seen, in one statement
        with pytest.raises(comet.CometError) as refused:
            app.push({"type": "note", "listeners": ["room:a\x00b"]})
        assert refused.value.status == 400
    finally:
        app.close()


def record_round_trips(monkeypatch, app):
    """What this thread sends to ``app``'s PostgreSQL from now on (``app`` started
    first: its first request reads the head once, to start its window), a list of
    round trips: the first word of each statement, or "COMMIT", through psycopg or
    held (``_HeldPQCursor``, whose round trip carries what waits to go with its
    statement, and may carry a COMMIT after it: "BEGIN+WITH+COMMIT").  The app's
    tail and housekeeping send on threads of their own."""
    import psycopg
    app._start()
    sent, waiting = [], {}                  # held cursor -> first words to go with the next
    commit = psycopg.Connection.commit

    def main():
        return threading.current_thread() is threading.main_thread()

    def recorded(execute):
        def executed(cur, sql, *args, **kwargs):
            if main():
                sent.append("+".join(waiting.pop(cur, []) + [str(sql).split()[0]]
                                     + (["COMMIT"] if kwargs.get("commit") else [])).upper())
            return execute(cur, sql, *args, **kwargs)
        return executed

    def later(cur, sql, *args):
        if main():
            waiting.setdefault(cur, []).append(sql.split()[0])
        return held_later(cur, sql, *args)

    def sent_later(cur):
        if main() and waiting.get(cur):
            sent.append("+".join(waiting.pop(cur)).upper())
        return held_send_later(cur)

    def committed(conn):
        if main():
            sent.append("COMMIT")
        return commit(conn)
    held_later, held_send_later = comet._HeldPQCursor.later, comet._HeldPQCursor.send_later
    monkeypatch.setattr(psycopg.Cursor, "execute", recorded(psycopg.Cursor.execute))
    monkeypatch.setattr(comet._HeldPQCursor, "execute", recorded(comet._HeldPQCursor.execute))
    monkeypatch.setattr(comet._HeldPQCursor, "later", later)
    monkeypatch.setattr(comet._HeldPQCursor, "send_later", sent_later)
    monkeypatch.setattr(psycopg.Connection, "commit", committed)
    return sent


@pytest.mark.parametrize("path", ["held", "psycopg"])
def test_a_commit_sends_its_packages_and_deliveries_in_one_statement(url, monkeypatch, path):
    """After BEGIN and the hooks: the positions, the packages and every delivery
    (the package's own body and a tailored one) in one statement, then COMMIT.
    Under gevent each round trip waits for every ready greenlet.  Held, the BEGIN
    goes with the first statement after it and the COMMIT with the last (a listener
    and an on_emit are handed the connection, and make no statement on it)."""
    app = make_app(store=url)
    if path == "psycopg":                   # as under gevent
        monkeypatch.setattr(app.store, "_library", None)
    sent = record_round_trips(monkeypatch, app)
    try:
        app.action("note").on_emit(
            lambda package, recipient, private, db: dict(package, to=recipient)
            if recipient == "bob" else package)
        cursor = app.store.head()
        expected = {"held": [["BEGIN+WITH+COMMIT"],
                             ["BEGIN+INSERT", "DELETE+WITH+COMMIT"],   # the stamp's claim
                             ["BEGIN+WITH+COMMIT"]],
                    "psycopg": [["BEGIN", "WITH", "COMMIT"],
                                ["BEGIN", "INSERT", "DELETE", "WITH", "COMMIT"],
                                ["BEGIN", "WITH", "COMMIT"]]}[path]
        del sent[:]
        app.push({"type": "note", "listeners": ["to"], "to": ["bob", "carol", "dave"]})
        assert sent == expected[0]
        del sent[:]
        stamp = app.push({"type": "x", "listeners": "bob", "_stamp": "s" * 16})
        assert sent == expected[1]
        del sent[:]
        app.push({"type": "y", "listeners": "bob"})
        assert sent == expected[2]
        head, bob, _ = app.store.read("bob", cursor, 10)
        _, carol, _ = app.store.read("carol", cursor, 10)
        assert head == cursor + 3 and [json.loads(body).get("to") for _, _, body in bob] == [
            "bob", None, None]
        assert [json.loads(body)["to"] for _, _, body in carol] == [["bob", "carol", "dave"]]
        assert [position for position, _, _ in bob] == [cursor + 1, cursor + 2, cursor + 3]
        assert app.push({"type": "x", "listeners": "bob", "_stamp": "s" * 16}) == stamp
        assert app.store.head() == cursor + 3                    # accepted once
    finally:
        app.close()


@pytest.mark.parametrize("path", ["held", "psycopg"])
def test_a_join_or_leave_sends_its_spans_with_the_commit(url, monkeypatch, path):
    """The statements writing a join's or leave's span (and the count of changes)
    are not read: held, they go with the COMMIT, in its round trip."""
    app = make_app(store=url)
    if path == "psycopg":
        monkeypatch.setattr(app.store, "_library", None)
    web = webtest.TestApp(app)
    sent = record_round_trips(monkeypatch, app)
    web.post_json("/comet/push", {"type": "join", "listeners": ["room"]},
                  headers={"X-Client": "a"})
    joined = sent[:]
    del sent[:]
    web.post_json("/comet/push", {"type": "leave", "listeners": ["room"]},
                  headers={"X-Client": "a"})
    if path == "held":
        assert joined == ["BEGIN+INSERT", "SELECT", "WITH", "INSERT+UPDATE+COMMIT"]
        assert sent == ["BEGIN+SELECT", "DELETE", "WITH", "DELETE+UPDATE+UPDATE+COMMIT"]
    else:
        assert joined == ["BEGIN", "INSERT", "SELECT", "WITH", "INSERT", "UPDATE", "COMMIT"]
        assert sent == ["BEGIN", "SELECT", "DELETE", "WITH", "DELETE", "UPDATE", "UPDATE",
                        "COMMIT"]
    assert app.store.members("room") == {}
    spans = app.store._query("SELECT client, from_pos, to_pos FROM comet_spans")
    # A member from its join's package to its leave's, both included.
    assert [(comet._text(client), end - start) for client, start, end in spans] == [("a", 2)]


def say(web, client, kind="m", status=200, **fields):
    """A push of ``kind`` by ``client`` to the channel ``room``; its answer's JSON."""
    return web.post_json("/comet/push", {"type": kind, "listeners": ["room"], **fields},
                         headers={"X-Client": client}, status=status).json


def bodies(store, client, after):
    """The types and senders of what ``client`` has after ``after``."""
    return [(json.loads(body)["type"], json.loads(body)["sender"])
            for _, _, body in store.read(client, after, 50)[1]]


def test_a_broadcast_to_members_read_before_is_one_round_trip(url, monkeypatch):
    """A push to a channel whose members this process read before, none changed
    since, takes them as read: its statement (a savepoint before it, checking at
    the commit that they are still so) is its one round trip, or two with a
    stamp's claim.  A push with a hook per recipient, or of several packages,
    reads them."""
    app = make_app(store=url)
    web = webtest.TestApp(app)
    app.action("tailored").on_emit(lambda package, recipient, private, db: package)
    try:
        for client in ("a", "b"):
            say(web, client, "join")
        cursor = app.store.head()
        sent = record_round_trips(monkeypatch, app)
        say(web, "a")
        say(web, "a")
        say(web, "b")
        assert sent == ["BEGIN+SELECT", "WITH+COMMIT"] + ["BEGIN+SAVEPOINT+WITH+COMMIT"] * 2
        del sent[:]
        say(web, "a", _stamp="s" * 16)      # the stamp's claim is read: two
        assert sent == ["BEGIN+INSERT", "DELETE+SAVEPOINT+WITH+COMMIT"]
        del sent[:]
        say(web, "a", "tailored")
        web.post_json("/comet/push", [{"type": "m", "listeners": ["room"]}] * 2,
                      headers={"X-Client": "b"})
        assert sent == ["BEGIN+SELECT", "WITH+COMMIT", "BEGIN+SELECT", "SELECT", "WITH+COMMIT"]
        assert bodies(app.store, "b", cursor) == bodies(app.store, "a", cursor) == [
            ("m", "a"), ("m", "a"), ("m", "b"), ("m", "a"), ("tailored", "a"), ("m", "b"),
            ("m", "b")]
    finally:
        app.close()


def test_a_join_committed_by_another_process_makes_the_next_broadcast_read_again(
        url, monkeypatch):
    """The members taken as read are checked at the commit: a join another process
    committed since fails the statement (nothing of it ran), and the push reads
    the members again and goes to them all, the joiner included."""
    one, other = make_app(store=url), make_app(store=url)
    web, elsewhere = webtest.TestApp(one), webtest.TestApp(other)
    try:
        for client in ("a", "b"):
            say(web, client, "join")
        say(web, "a")                       # read: taken as read from now on
        cursor = one.store.head()
        say(elsewhere, "c", "join")
        sent = record_round_trips(monkeypatch, one)
        say(web, "a")
        assert sent == ["BEGIN+SAVEPOINT+WITH+COMMIT", "ROLLBACK", "SELECT", "WITH+COMMIT"]
        for client in ("a", "b", "c"):
            assert bodies(one.store, client, cursor)[-1] == ("m", "a")
        assert bodies(one.store, "c", cursor) == [("join", "c"), ("m", "a")]
        del sent[:]
        say(web, "b")                       # read again: taken as read once more
        assert sent == ["BEGIN+SAVEPOINT+WITH+COMMIT"]
        assert bodies(other.store, "c", cursor)[-1] == ("m", "b")
    finally:
        one.close()
        other.close()


def test_a_sender_who_left_in_another_process_is_refused_at_the_commit(url):
    """A member who left in another process, pushing to the channel through one
    whose members were taken as read before, is refused as a non-member, and
    nothing of the push is stored; its stamp stays free."""
    one, other = make_app(store=url), make_app(store=url)
    web, elsewhere = webtest.TestApp(one), webtest.TestApp(other)
    try:
        for client in ("a", "b"):
            say(web, client, "join")
        say(web, "a")
        say(elsewhere, "a", "leave")
        head = one.store.head()

        answer = say(web, "a", status=403, _stamp="t" * 16)

        assert answer["error"] == "not_member" and answer["accepted"] == []
        assert one.store.head() == head and bodies(one.store, "b", head) == []
        say(web, "a", "join")
        assert say(web, "a", _stamp="t" * 16)["accepted"] == ["t" * 16]
        assert bodies(one.store, "b", head) == [("join", "a"), ("m", "a")]
    finally:
        one.close()
        other.close()


def test_in_a_batch_only_the_part_whose_sender_left_is_refused(url):
    """Two pushes committed together (group commit), both taking the members as
    read: one sender left in another process since.  Its push is refused, the
    other's is committed and delivered, to the members as they are now."""
    entered, release = threading.Event(), threading.Event()

    def sender(environ, db):                # b's push holds its batch open for a
        if environ["HTTP_X_CLIENT"] == "b":
            entered.set()
            release.wait(10)
        return environ["HTTP_X_CLIENT"]
    one, other = make_app(store=url, sender=sender), make_app(store=url)
    web, elsewhere = webtest.TestApp(one), webtest.TestApp(other)
    answers = {}

    def push(client):
        answers[client] = web.post_json("/comet/push", {"type": "m", "listeners": ["room"]},
                                        headers={"X-Client": client}, expect_errors=True)
    try:
        for client in ("a", "b", "c"):
            say(web, client, "join")
        say(web, "c")
        say(elsewhere, "a", "leave")
        say(elsewhere, "d", "join")
        head = one.store.head()
        first = threading.Thread(target=push, args=("b",))
        first.start()
        assert entered.wait(10)
        second = threading.Thread(target=push, args=("a",))
        second.start()
        wait_until(lambda: one.store._open and one.store._open[0].queued == 1)
        release.set()
        first.join(10)
        second.join(10)

        assert answers["b"].status_int == 200, answers["b"].text
        assert answers["a"].status_int == 403 and answers["a"].json["error"] == "not_member"
        assert one.store.head() == head + 1
        for client in ("b", "c", "d"):
            assert bodies(one.store, client, head) == [("m", "b")]
        assert bodies(one.store, "a", head) == []
    finally:
        release.set()
        one.close()
        other.close()


@pytest.mark.parametrize("way", ["execute", "cursor", "transaction"])
def test_a_hook_that_writes_finds_the_push_begun_and_commits_or_rolls_back_with_it(
        url, monkeypatch, way):
    """Held, the BEGIN waits to go with the push's first statement, and a hook is
    handed the connection: whatever the hook first makes on it (a statement, a
    cursor, a transaction block) sends the BEGIN first, so that what it writes is
    the push's, committed with the package or rolled back with it."""
    app = make_app(store=url)
    try:
        with app.store._connection() as conn:
            conn.execute("CREATE TABLE app_notes (n INT)")

        def write(db, n):
            if way == "execute":
                db.execute("INSERT INTO app_notes VALUES (%s)", (n,))
            elif way == "cursor":
                with db.cursor() as cur:
                    cur.execute("INSERT INTO app_notes VALUES (%s)", (n,))
            else:
                with db.transaction():
                    db.execute("INSERT INTO app_notes VALUES (%s)", (n,))

        def on_emit(package, recipient, private, db):
            write(db, package["n"])
            if package.get("refuse"):
                raise comet.Reject("written, then refused")
            return package
        app.action("note").on_emit(on_emit)
        sent = record_round_trips(monkeypatch, app)
        app.push({"type": "note", "listeners": "bob", "n": 1})
        assert sent[:1] == ["BEGIN"] and sent[-1] == "WITH+COMMIT"
        with pytest.raises(comet.CometError):
            app.push({"type": "note", "listeners": "bob", "n": 2, "refuse": True})
        assert sorted(app.store._query("SELECT n FROM app_notes")) == [(1,)]
        assert app.store.head() == 1
    finally:
        app.close()


# --------------------------------------------------------------------------
# NOTIFY: one per commit, the new head, nothing on a rollback
# --------------------------------------------------------------------------

def test_each_commit_notifies_its_new_head_once(url, listen):
    listener = listen(url)
    app = make_app(store=url)

    app.push({"type": "m", "listeners": "bob"})
    app.push({"type": "m", "listeners": "bob"})

    assert listener.heard(2) == ["1", "2"]


def test_a_batch_of_the_group_commit_notifies_once(group, listen):
    listener = listen(group.url)
    results = group.run("hold", "kept", "also kept")

    assert all(isinstance(stamp, str) for stamp in results.values())
    assert group.flushes == [3] and listener.heard(1) == ["3"]


def test_a_rolled_back_push_notifies_nothing(group, listen):
    listener = listen(group.url)

    with pytest.raises(comet.Reject):
        group.app.push({"type": "note", "listeners": "bob", "text": "refused"})

    assert listener.heard() == [] and group.app.store.head() == 0


def commit_one(store):
    """A package to bob committed through ``store`` alone, as another process would."""
    with store.transaction() as tx:
        tx.append(comet._new_stamp(), 0, "{}", [("bob", None)])


def test_the_listener_calls_back_for_the_other_processes_commits_only(url, postgres):
    mine, other = comet.PostgreSQLStore(url), comet.PostgreSQLStore(url)
    heard = []
    mine.listen(heard.append)
    wait_until(lambda: listening_sessions(postgres, url) == 1)

    for store in (mine, mine, other):       # other's NOTIFY comes after mine's
        commit_one(store)
    wait_until(lambda: heard)
    mine.close(), other.close()

    assert heard == [3]


def test_a_process_makes_its_notify_token_once(url, postgres, monkeypatch):
    # Each token is a system call that lets the GIL go: none at a push, nor at each
    # notification the listening thread reads, once the first is made.
    mine, other = comet.PostgreSQLStore(url), comet.PostgreSQLStore(url)
    heard = []
    mine.listen(heard.append)
    wait_until(lambda: listening_sessions(postgres, url) == 1)
    for store in (mine, other):
        commit_one(store)
    wait_until(lambda: heard == [2])
    token = mine._origin()
    made = []
    monkeypatch.setattr(comet.secrets, "token_hex", lambda n: made.append(n) or "00000000")

    for store in (mine,) * 5 + (other,):    # other's NOTIFY comes after mine's
        commit_one(store)
    wait_until(lambda: heard == [2, 8])
    mine.close(), other.close()

    assert made == [] and mine._origin() == token


def test_notify_false_neither_notifies_nor_listens(url, listen, postgres):
    listener = listen(url)
    app = make_app(store=comet.PostgreSQLStore(url, notify=False))

    app.push({"type": "m", "listeners": "bob"})

    assert listener.heard() == []
    assert listening_sessions(postgres, url) == 1           # the test's own
    assert app.store.head() == 1


def listening_sessions(postgres, url):
    return postgres.query(url, "SELECT COUNT(*) FROM pg_stat_activity WHERE"
                               " datname = current_database() AND query = 'LISTEN comet'")[0][0]


# --------------------------------------------------------------------------
# The listener: wakes this process's polls, reconnects, catches up
# --------------------------------------------------------------------------

def deliver_across(a, b, before_push=lambda: None):
    """Seconds from ``b``'s 200 for a push to the answer of a poll parked on ``a``
    for it; ``before_push()`` runs once the poll is parked."""
    receiver, sender = new_ids("receiver", "sender")
    cursor = Client(a.url, receiver).poll()["cursor"]
    answered, result = threading.Event(), {}

    def park():
        result["answer"] = Client(a.url, receiver).poll(cursor=cursor, timeout=20)
        result["at"] = time.monotonic()
        answered.set()
    threading.Thread(target=park, daemon=True).start()
    wait_until(lambda: a.app.stats()["parked"] == 1)
    before_push()
    status, _, body = Client(b.url, sender).push({"type": "m", "listeners": ["to"],
                                                  "to": [receiver]})
    pushed = time.monotonic()
    assert status == 200, body
    assert answered.wait(15), "the poll on A did not answer"
    assert [p["_stamp"] for p in result["answer"]["packages"]] == body["accepted"]
    return result["at"] - pushed


@pytest.fixture
def two(url, postgres):
    """Two apps on one database, each on a server of its own, tailing only every
    10 s: what reaches the other sooner went by NOTIFY."""
    apps = [make_app(store=url, poll_timeout=15, tail_interval=10) for _ in range(2)]
    with ThreadedServer(apps[0]) as a, ThreadedServer(apps[1]) as b:
        a.app, b.app = apps
        Client(a.url, "warm").poll(), Client(b.url, "warm").poll()     # each starts listening
        wait_until(lambda: listening_sessions(postgres, url) == 2)
        yield a, b


def terminate_listeners(postgres, url):
    """The server ends every LISTEN session of the store's database (and waits until
    they are gone); returns how many."""
    return len(postgres.query(url, "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
                                   " WHERE datname = current_database()"
                                   " AND query = 'LISTEN comet'"))


def test_a_poll_parked_on_one_process_is_woken_by_a_commit_of_the_other_at_once(two):
    a, b = two

    seconds = [deliver_across(a, b) for _ in range(3)]

    assert max(seconds) < 1, seconds        # the tail would take up to 10 s


def test_listeners_killed_by_the_server_reconnect_and_wake_polls_again(two, postgres, url):
    a, b = two
    assert terminate_listeners(postgres, url) == 2
    wait_until(lambda: listening_sessions(postgres, url) == 2, timeout=10)

    seconds = deliver_across(a, b)

    assert seconds < 1


def test_a_commit_made_while_the_listeners_were_away_wakes_the_poll_when_they_are_back(
        two, postgres, url):
    a, b = two
    missed = []

    def away():
        assert terminate_listeners(postgres, url) == 2
        missed.append(listening_sessions(postgres, url))

    seconds = deliver_across(a, b, before_push=away)

    assert missed == [0]                    # nobody heard this commit's NOTIFY
    assert seconds < 5                      # caught up at reconnection (1 s), not by tailing (10 s)


# --------------------------------------------------------------------------
# gevent: psycopg waits on the hub, the listener is a greenlet
# --------------------------------------------------------------------------

GEVENT_CHECK = """
from gevent import monkey
monkey.patch_all()
import sys, time, threading
import gevent
sys.path.insert(0, sys.argv[2])
import comet

store, other = comet.open_store(sys.argv[1]), comet.open_store(sys.argv[1])
ticks = []
ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(1000)])
heard = threading.Event()
store.listen(lambda head: heard.set())
gevent.sleep(0.2)                                   # the listener greenlet connects
before = len(ticks)
store._query("SELECT pg_sleep(0.5)")                # 0.5 s in the server
during = len(ticks) - before
with other.transaction() as tx:                     # another store's commit NOTIFYs;
    tx.append("gevent-check-1", 0, "{}", [("bob", None)])     # the listener hears it
print(during, heard.wait(5))
ticker.kill()
store.close(), other.close()
"""


def test_under_gevent_a_query_and_the_listener_leave_the_hub_running(url):
    need_gevent()

    out = subprocess.run([sys.executable, "-c", GEVENT_CHECK, url, ROOT], capture_output=True,
                         text=True, timeout=60)

    assert out.returncode == 0, out.stderr
    ticks, heard = out.stdout.split()
    assert int(ticks) >= 20, out.stdout     # 10 ms ticks went on while the query waited 0.5 s
    assert heard == "True", out.stdout


# --------------------------------------------------------------------------
# An outage: the listeners come back with the server (the rest of the outage
# is test_sql_servers.py's, on MariaDB and PostgreSQL)
# --------------------------------------------------------------------------

def answers(server, status):
    """Whether a push to nobody through ``server`` is answered ``status`` now."""
    return Client(server.url, "probe").push({"type": "probe", "listeners": "nobody"})[0] == status


@pytest.mark.outage
def test_after_the_server_is_back_notify_wakes_polls_again_without_a_restart(two, postgres, url):
    need(postgres.can_restart(), f"cannot stop and start PostgreSQL here ({postgres.restart_needs})")
    a, b = two
    try:
        postgres.stop()
        wait_until(lambda: answers(a, 503) and answers(b, 503), timeout=10)
    finally:
        postgres.start()
    wait_until(lambda: answers(a, 200) and answers(b, 200), timeout=30)
    wait_until(lambda: listening_sessions(postgres, url) == 2, timeout=15)

    seconds = [deliver_across(a, b), deliver_across(b, a)]

    assert max(seconds) < 1, seconds        # NOTIFY, not the tail (10 s)
