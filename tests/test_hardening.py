"""Input that fails every time is answered 4xx and fails nothing else; only a
transient store failure fails a batch.

Odd bodies, headers and cursors against the WSGI app (WebTest or direct WSGI
calls); what a hook makes that cannot be stored; interruptions (a
``BaseException``) inside a push, its group commit's flush and its commit;
limits keyed by the remote address; the SQL stores' statements (no syntax
newer than the documented SQLite, MySQL statements under
``max_allowed_packet``).  Group-commit cases run on SQLite and MariaDB
(``group`` in support.py).
"""

import contextlib
import io
import json
import logging
import sqlite3
import threading
import time

import pytest
import webtest

import comet
from support import (Client, ThreadedServer, make_app, open_group, wait_until)


@pytest.fixture(params=["memory", "sqlite"])
def store_url(request, tmp_path):
    return "memory:" if request.param == "memory" else f"sqlite:///{tmp_path}/comet.db"


@pytest.fixture
def app(store_url):
    app = make_app(store=store_url, poll_timeout=0.2)
    yield app
    app.close()


def as_client(app, client_id, **environ):
    return webtest.TestApp(app, extra_environ={"HTTP_X_CLIENT": client_id, **environ})


def error_of(response, status, code):
    assert response.status_int == status
    assert response.json["error"] == code
    assert isinstance(response.json["message"], str)
    return response.json


def raw_push(web, body, status=200, **headers):
    return web.post("/comet/push", body, headers=headers, content_type="application/json",
                    status=status)


def inbox(app, client):
    """What the store holds for ``client``, parsed."""
    return [json.loads(body) for _, _, body in app.store.read(client, 0, 500)[1]]


def wsgi(app, body=b"", method="POST", path="/comet/push", **environ):
    """Call ``app`` directly: ``(status, headers, parsed body)``.  ``environ`` adds
    to (or, with None, removes from) a push of ``body`` by client alice."""
    env = {"REQUEST_METHOD": method, "PATH_INFO": path, "CONTENT_TYPE": "application/json",
           "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body),
           "HTTP_X_CLIENT": "alice", "wsgi.url_scheme": "http", "SERVER_NAME": "x",
           "SERVER_PORT": "80", "QUERY_STRING": ""}
    env.update(environ)
    env = {key: value for key, value in env.items() if value is not None}
    answered = []
    data = b"".join(app(env, lambda status, headers: answered.append((status, dict(headers)))))
    (status, headers), = answered
    return int(status.split()[0]), headers, json.loads(data) if data else None


class Unreadable(io.BytesIO):
    def read(self, *args):
        raise AssertionError("the body was read")


class Interrupt(BaseException):
    """What gevent.Timeout and GreenletExit are: not an Exception."""


def queue_behind(group, *pushes):
    """``group``'s scenario with any pushes: a push held in its hook ("hold"),
    then ``pushes`` (callables) queued behind it in its batch (each has waited
    for its turn there), then all go.  Returns each one's result
    (its return value, a CometError's status, or the BaseException it raised),
    ``hold`` first; threads are daemons, so a batch that never commits fails
    the test instead of hanging it."""
    results = {}

    def run(index, push):
        try:
            results[index] = push()
        except comet.CometError as error:
            results[index] = error.status
        except BaseException as error:      # noqa: B036 -- the interruption under test
            results[index] = error
    threads = [threading.Thread(target=run, args=(0, note(group, "hold")), daemon=True)]
    threads[0].start()
    assert group.held.wait(10)
    for index, push in enumerate(pushes, 1):
        threads.append(threading.Thread(target=run, args=(index, push), name=f"part {index}",
                                        daemon=True))
        threads[-1].start()
    store = group.app.store
    group.wait_queued(thread.name for thread in threads[1:])
    group.released.set()
    deadline = time.monotonic() + 20
    for thread in threads:
        thread.join(max(0.1, deadline - time.monotonic()))
    if len(results) < len(threads):         # a batch hangs: free its locks for the teardown
        for batch in store._open:
            with contextlib.suppress(Exception):
                batch.conn.close()
    assert len(results) == len(threads), f"a push never returned: {results}"
    return [results[index] for index in range(len(threads))]


def note(group, text):
    """A push of ``group``'s note ``text`` to bob, to run later."""
    return lambda: group.app.push({"type": "note", "listeners": "bob", "text": text})


def pooled_in_transaction(store):
    """The pooled connections that have a transaction open (none should)."""
    def open_transaction(conn):
        if isinstance(conn, sqlite3.Connection):
            return conn.in_transaction
        if any(cls.__module__.startswith("psycopg") for cls in type(conn).__mro__):
            import psycopg
            return conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
        return bool(conn.server_status & 1)             # SERVER_STATUS_IN_TRANS
    return [conn for conn in store._pool if open_transaction(conn)]


# --------------------------------------------------------------------------
# Text that is not Unicode: a lone UTF-16 surrogate
# --------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    rb'{"type": "x", "listeners": "bob", "text": "cut \ud83d"}',
    rb'{"type": "x", "listeners": "bob", "\udc00": 1}',
    rb'{"type": "x", "listeners": "bob", "deep": [{"a": ["\udfff"]}]}',
    rb'[{"type": "x", "listeners": "bob"}, {"type": "x", "listeners": "bob", "t": "\uD800"}]',
], ids=["value", "key", "nested", "in-a-batch"])
def test_a_lone_surrogate_in_a_push_is_400_bad_json_and_the_recipient_polls_on(app, body):
    alice, bob = as_client(app, "alice"), as_client(app, "bob")
    cursor = bob.get("/comet/poll").json["cursor"]
    error_of(raw_push(alice, body, status=400), 400, "bad_json")
    raw_push(alice, rb'{"type": "x", "listeners": "bob", "pair": "\ud83d\ude00"}')
    answer = bob.get("/comet/poll", {"cursor": cursor}).json
    assert [p["pair"] for p in answer["packages"]] == ["\U0001f600"]


def test_a_lone_surrogate_in_a_server_push_is_400_bad_package(app):
    with pytest.raises(comet.CometError) as caught:
        app.push({"type": "x", "listeners": "bob", "text": "\ud83d"})
    assert (caught.value.status, caught.value.code) == (400, "bad_package")
    assert inbox(app, "bob") == []


@pytest.mark.parametrize("where", ["on_submit", "on_emit", "key"])
def test_a_lone_surrogate_a_hook_makes_is_that_packages_500_and_fails_nothing_else(group, where):
    action = group.app.action("note")
    if where == "on_emit":
        @action.on_emit
        def emit(package, recipient, private, db):
            if package["text"] == "bad":
                package["text"] = "\ud83d"
            return package
    else:
        submit = action.submit

        @action.on_submit
        def wrapped(package, private, db, environ):
            submit(package, private, db, environ)
            if package["text"] == "bad":
                package["\ud83d" if where == "key" else "text"] = "\ud83d"
    results = queue_behind(group, note(group, "kept"), note(group, "bad"), note(group, "also"))
    assert results[2] == 500
    assert all(isinstance(stamp, str) for stamp in (results[0], results[1], results[3]))
    assert sorted(group.delivered()) == ["also", "hold", "kept"]


@pytest.mark.parametrize("second", [{"type": "x", "listeners": ["to"], "to": ["bob"]},
                                    {"type": "join", "listeners": ["room"]}], ids=["to", "join"])
def test_a_sender_hook_returning_a_lone_surrogate_is_that_packages_500(store_url, second):
    app = make_app(store=store_url, poll_timeout=0.2,
                   sender=lambda environ, db: "\ud83d" if environ["HTTP_X_CLIENT"] == "cut" else "ok")
    bob = as_client(app, "bob")
    bob.post_json("/comet/push", {"type": "join", "listeners": ["room"]})
    cursor = bob.get("/comet/poll").json["cursor"]
    response = as_client(app, "cut").post_json("/comet/push", second, status=500)
    error_of(response, 500, "internal")
    as_client(app, "fine").post_json("/comet/push", {"type": "x", "listeners": "bob"})
    answer = bob.get("/comet/poll", {"cursor": cursor}).json
    assert [p["sender"] for p in answer["packages"]] == ["ok"]
    assert app.channel("room").members() == {"bob": "ok"}
    app.close()


def test_a_reject_message_that_is_not_valid_text_is_still_a_json_answer(app):
    @app.action("x").on_submit
    def submit(package, private, db, environ):
        raise comet.Reject("no \ud83d")
    status, _, body = wsgi(app, b'{"type": "x", "listeners": "bob"}')
    assert (status, body["error"]) == (403, "rejected")


def test_an_id_hook_returning_text_that_is_not_unicode_is_403_forbidden(store_url):
    app = make_app(store=store_url, poll_timeout=0.2, id=lambda environ: "bob\ud83d")
    web = webtest.TestApp(app)
    error_of(web.get("/comet/poll?cursor=" + f"{app.store.id}.0", status=403), 403, "forbidden")
    error_of(web.post_json("/comet/push", {"type": "x", "listeners": "a"}, status=403),
             403, "forbidden")


# --------------------------------------------------------------------------
# Content-Length
# --------------------------------------------------------------------------

@pytest.mark.parametrize("length", ["-1", "abc", "+5", " 5", "5 ", "1_0", "\u0663", "0x10",
                                    "5.0", "1e3", "٣٣"])
def test_a_push_with_a_content_length_that_is_not_digits_is_400_without_reading(app, length):
    status, _, body = wsgi(app, CONTENT_LENGTH=length, **{"wsgi.input": Unreadable()})
    assert (status, body["error"]) == (400, "bad_json")


@pytest.mark.parametrize("length", ["65537", "9" * 30, "9" * 5000, "0" * 40 + "65537"])
def test_a_push_with_a_content_length_over_max_body_is_413_without_reading(app, length):
    status, _, body = wsgi(app, CONTENT_LENGTH=length, **{"wsgi.input": Unreadable()})
    assert (status, body["error"]) == (413, "too_large")


@pytest.mark.parametrize("length", [None, ""])
def test_a_push_with_no_content_length_is_411_without_reading(app, length):
    status, _, body = wsgi(app, CONTENT_LENGTH=length, **{"wsgi.input": Unreadable()})
    assert (status, body["error"]) == (411, "length_required")


def test_a_chunked_push_the_server_ended_is_read_up_to_max_body(app):
    package = b'{"type": "x", "listeners": "bob"}'
    chunked = {"CONTENT_LENGTH": None, "wsgi.input_terminated": True}
    assert wsgi(app, package, **chunked, **{"wsgi.input": io.BytesIO(package)})[0] == 200
    big = b'{"type": "x", "listeners": "bob", "t": "' + b"x" * 70000 + b'"}'
    status, _, body = wsgi(app, **chunked, **{"wsgi.input": io.BytesIO(big)})
    assert (status, body["error"]) == (413, "too_large")
    assert len(inbox(app, "bob")) == 1


def test_a_content_length_with_leading_zeros_is_a_length(app):
    package = b'{"type": "x", "listeners": "bob"}'
    assert wsgi(app, package, CONTENT_LENGTH="000" + str(len(package)))[0] == 200


# --------------------------------------------------------------------------
# Listeners and ids
# --------------------------------------------------------------------------

@pytest.mark.parametrize("listeners", [10 ** 256, -(10 ** 255), int("9" * 4000)],
                         ids=["257-digits", "negative-257-chars", "4000-digits"])
def test_an_integer_listener_longer_than_256_characters_is_400_bad_package(app, listeners):
    alice = as_client(app, "alice")
    body = ('{"type": "x", "listeners": %d}' % listeners).encode()
    error_of(raw_push(alice, body, status=400), 400, "bad_package")
    assert app.store.head() == 0


def test_an_integer_listener_of_256_characters_is_that_client(app):
    alice = as_client(app, "alice")
    raw_push(alice, ('{"type": "x", "listeners": -%s}' % ("9" * 255)).encode())
    assert len(inbox(app, "-" + "9" * 255)) == 1


@pytest.mark.parametrize("listeners", [10 ** 5000, "x" * 257, "\ud83d"],
                         ids=["over-4300-digits", "too-long", "surrogate"])
def test_a_hook_setting_a_listener_that_is_no_client_id_is_400_not_500(app, listeners):
    @app.action("x").on_submit
    def submit(package, private, db, environ):
        package["listeners"] = listeners
    status, _, body = wsgi(app, b'{"type": "x", "listeners": "bob"}')
    assert (status, body["error"]) == (400, "bad_package")


@pytest.mark.parametrize("recipient", ["x" * 257, "", "\udc00", 10 ** 5000, True],
                         ids=["too-long", "empty", "surrogate", "over-4300-digits", "bool"])
def test_a_listener_naming_a_recipient_that_is_no_client_id_is_that_packages_400(group,
                                                                                 recipient):
    group.app.listener("named")(lambda environ, package, db: ["bob", recipient])
    bad = lambda: group.app.push({"type": "note", "listeners": ["named"], "text": "bad"})  # noqa: E731
    results = queue_behind(group, note(group, "kept"), bad, note(group, "also"))
    assert results[2] == 400
    assert sorted(group.delivered()) == ["also", "hold", "kept"]


# --------------------------------------------------------------------------
# Cursors
# --------------------------------------------------------------------------

@pytest.mark.parametrize("position", [
    "\u00b2", "\u0663", "+1", "-1", " 1", "1 ", "9" * 20, "9" * 19, str(2 ** 63), "9" * 5000,
    "", "1.2", ".1", "1\x00", "\x00", "0x1", "1e3", "1_0"])
def test_a_cursor_this_store_did_not_issue_is_reset_never_500(app, position):
    for _ in range(5):                                  # position 3, say, was issued
        app.push({"type": "x", "listeners": "carol"})
    bob = as_client(app, "bob")
    answer = bob.get("/comet/poll", {"cursor": f"{app.store.id}.{position}"}).json
    assert answer["reset"] is True and answer["packages"] == []
    assert answer["cursor"] == f"{app.store.id}.{app.store.head()}"


def test_a_repeated_cursor_parameter_is_reset(app):
    bob = as_client(app, "bob")
    cursor = bob.get("/comet/poll").json["cursor"]
    answer = bob.get(f"/comet/poll?cursor={cursor}&cursor={cursor}").json
    assert answer["reset"] is True


# --------------------------------------------------------------------------
# Nesting
# --------------------------------------------------------------------------

def nested(depth):
    """A package whose ``deep`` field makes it ``depth`` levels deep in all."""
    body = "1"
    for _ in range(depth - 1):
        body = "[" + body + "]"
    return ('{"type": "x", "listeners": "bob", "deep": %s}' % body).encode()


def copying(app):
    """An on_emit that returns its own copy, as the README's example does."""
    app.action("x").on_emit(lambda package, recipient, private, db: package)


@pytest.mark.parametrize("depth", [101, 600, 900])
def test_a_package_nested_deeper_than_100_levels_is_400_bad_json(app, depth):
    copying(app)
    error_of(raw_push(as_client(app, "alice"), nested(depth), status=400), 400, "bad_json")
    assert app.store.head() == 0


def test_a_package_nested_100_levels_goes_through_every_hook(app):
    copying(app)
    raw_push(as_client(app, "alice"), nested(100))
    assert len(inbox(app, "bob")) == 1


def test_a_batch_of_packages_nested_100_levels_is_accepted(app):
    body = b"[" + b",".join([nested(100)] * 3) + b"]"
    assert len(raw_push(as_client(app, "alice"), body).json["accepted"]) == 3


def test_a_server_push_nested_too_deep_is_400_bad_package(app):
    deep = 1
    for _ in range(150):
        deep = [deep]
    with pytest.raises(comet.CometError) as caught:
        app.push({"type": "x", "listeners": "bob", "deep": deep})
    assert (caught.value.status, caught.value.code) == (400, "bad_package")


@pytest.mark.parametrize("emit, depth", [(False, 5000), (True, 600)],
                         ids=["too-deep-to-encode", "encodable-but-too-deep-to-copy"])
def test_a_hook_nesting_a_package_too_deep_to_copy_or_store_is_that_packages_500(group, emit,
                                                                                  depth):
    action = group.app.action("note")
    submit = action.submit
    if emit:
        copying_note = lambda package, recipient, private, db: package    # noqa: E731
        action.on_emit(copying_note)

    @action.on_submit
    def deepen(package, private, db, environ):
        submit(package, private, db, environ)
        if package["text"] == "deep":
            for _ in range(depth):
                package["deep"] = {"deep": package.get("deep")}
    results = queue_behind(group, note(group, "kept"), note(group, "deep"), note(group, "also"))
    assert results[2] == 500
    assert sorted(group.delivered()) == ["also", "hold", "kept"]


# --------------------------------------------------------------------------
# Interruptions: a BaseException inside a push
# --------------------------------------------------------------------------

def test_a_base_exception_in_a_hook_propagates_and_is_logged_and_counted(store_url, caplog):
    app = make_app(store=store_url, poll_timeout=0.2)

    @app.action("x").on_submit
    def submit(package, private, db, environ):
        raise Interrupt()
    with caplog.at_level(logging.ERROR, logger="comet"), pytest.raises(Interrupt):
        wsgi(app, b'{"type": "x", "listeners": "bob"}')
    assert app.stats()["errors"] == {"internal": 1}
    assert any("Interrupt" in record.getMessage() for record in caplog.records)
    assert app.store.head() == 0
    assert wsgi(app, b'{"type": "y", "listeners": "bob"}')[0] == 200
    app.close()


def test_a_base_exception_in_a_hook_fails_its_batch_and_drops_the_connection(group):
    action = group.app.action("note")
    submit = action.submit

    @action.on_submit
    def interrupted(package, private, db, environ):
        submit(package, private, db, environ)
        if package["text"] == "interrupted":
            raise Interrupt()
    results = queue_behind(group, note(group, "kept"), note(group, "interrupted"))
    assert results[:2] == [503, 503] and isinstance(results[2], Interrupt)
    assert group.log() == [] and group.delivered() == []
    assert pooled_in_transaction(group.app.store) == []
    assert isinstance(group.app.push({"type": "note", "listeners": "bob", "text": "after"}), str)
    assert group.log() == ["after"]


@pytest.mark.parametrize("where", ["flush", "commit"])
def test_a_base_exception_in_the_flush_or_commit_fails_every_part_and_keeps_nothing(
        group, monkeypatch, where, caplog):
    store = group.app.store
    def interrupted(batch):
        raise Interrupt()
    # The flush writes the packages; the commit is the driver's commit call, or the
    # cursor's where the COMMIT goes with the flush's statements.
    monkeypatch.setattr(store, {"flush": "_flush", "commit": "_commit_connection"}[where],
                        interrupted)
    if where == "commit":                   # a held PostgreSQL cursor's, sent with the flush's
        execute = comet._HeldPQCursor.execute

        def committing(cursor, sql, args=(), commit=False):
            if commit:
                raise Interrupt()
            return execute(cursor, sql, args)
        monkeypatch.setattr(comet._HeldPQCursor, "execute", committing)
        if isinstance(store, comet.MySQLStore):     # MySQL's, sent with the flush's too
            monkeypatch.setattr(store._classes()[1], "commit_now", interrupted)
    head = store.head()
    with caplog.at_level(logging.ERROR, logger="comet"):
        results = queue_behind(group, note(group, "kept"), note(group, "also"))
    assert sum(isinstance(result, Interrupt) for result in results) == 1
    assert sorted(r for r in results if not isinstance(r, Interrupt)) == [503, 503]
    assert any("Interrupt" in record.getMessage() for record in caplog.records)
    assert store.head() == head and group.log() == [] and group.delivered() == []
    assert pooled_in_transaction(store) == []
    monkeypatch.undo()
    assert isinstance(group.app.push({"type": "note", "listeners": "bob", "text": "after"}), str)
    assert group.log() == ["after"]


def test_a_push_interrupted_after_its_commit_wakes_its_polls_and_ends(store_url, monkeypatch):
    """Interrupted once its packages are committed, a push writes no answer, so none
    wakes its recipients' polls when it is written: they are woken as the
    interruption goes up, and the push no longer counts as being accepted (polls
    that find packages would otherwise wait ``linger`` each, for a push that ended)."""
    app = make_app(store=store_url, poll_timeout=5)
    app.linger = 5.0

    def poll(cursor=None):
        query = "" if cursor is None else "cursor=" + cursor
        return wsgi(app, method="GET", path="/comet/poll", QUERY_STRING=query,
                    HTTP_X_CLIENT="bob")[2]
    cursor = poll()["cursor"]
    parked = {}
    thread = threading.Thread(target=lambda: parked.update(poll(cursor)), daemon=True)
    thread.start()
    wait_until(lambda: app.stats()["parked"] == 1)
    count = app._count

    def interrupted(name, n=1):             # what follows the commit in accepting a push
        count(name, n)
        if name == "accepted":
            raise Interrupt()
    monkeypatch.setattr(app, "_count", interrupted)
    with pytest.raises(Interrupt):
        wsgi(app, b'{"type": "m", "listeners": "bob"}')
    monkeypatch.undo()
    thread.join(2)
    assert not thread.is_alive() and [p["type"] for p in parked["packages"]] == ["m"]
    started = time.monotonic()
    assert [p["type"] for p in poll(cursor)["packages"]] == ["m"]
    assert time.monotonic() - started < 2 and app._pushing == 0
    app.close()


@pytest.mark.parametrize("body", [b"[]", b'{"type": "m", "listeners": "bob", "_stamp": "stamp-0001"}'])
def test_a_push_that_commits_nothing_ends_at_once(store_url, body):
    """An empty batch, or a package already accepted under its stamp (answered with
    that stamp, nothing stored again): nothing to wake, and no poll waits for it."""
    app = make_app(store=store_url, poll_timeout=5)
    app.linger = 5.0
    cursor = wsgi(app, method="GET", path="/comet/poll", HTTP_X_CLIENT="bob")[2]["cursor"]
    assert wsgi(app, b'{"type": "m", "listeners": "bob", "_stamp": "stamp-0001"}')[0] == 200
    status, _, answer = wsgi(app, body, CONTENT_TYPE="application/json; charset=utf-8")
    assert status == 200 and answer["accepted"] == ([] if body == b"[]" else ["stamp-0001"])
    started = time.monotonic()
    polled = wsgi(app, method="GET", path="/comet/poll", QUERY_STRING="cursor=" + cursor,
                  HTTP_X_CLIENT="bob")[2]
    assert [p["type"] for p in polled["packages"]] == ["m"]
    assert time.monotonic() - started < 2 and app._pushing == 0
    app.close()


class Turn:
    """A batch's turn (the group's ``CountedTurn``) whose waiter in the thread named
    ``victim`` is interrupted: at once, or (``handed``) just as the turn is handed to it."""

    def __init__(self, turn, handed, victim):
        self.lock = turn
        self.handed = handed
        self.victim = victim
        self.released = threading.Event()

    def acquire(self, blocking=True, timeout=-1):
        if blocking and threading.current_thread().name == self.victim:
            self.lock.enter()               # it waits in the batch, as a part
            if self.handed:
                assert self.released.wait(10)
            raise Interrupt()
        return self.lock.acquire(blocking, timeout)

    def release(self):
        self.lock.release()
        self.released.set()


def interrupted_waiting(group, handed):
    """A push whose wait for its turn in the open batch is interrupted."""
    def push():
        group.batch.turn = Turn(group.batch.turn, handed, threading.current_thread().name)
        return group.app.push({"type": "note", "listeners": "bob", "text": "interrupted"})
    return push


def test_a_push_interrupted_while_waiting_its_turn_leaves_the_batch_going(group):
    results = queue_behind(group, note(group, "kept"), interrupted_waiting(group, False),
                           note(group, "also"))
    assert isinstance(results[2], Interrupt)
    assert all(isinstance(stamp, str) for stamp in (results[0], results[1], results[3]))
    assert sorted(group.delivered()) == ["also", "hold", "kept"]


def test_a_push_interrupted_as_its_turn_comes_hands_the_turn_on(group):
    results = queue_behind(group, interrupted_waiting(group, True))
    assert isinstance(results[0], str) and isinstance(results[1], Interrupt)
    assert group.delivered() == ["hold"]


# --------------------------------------------------------------------------
# What the SQL stores write
# --------------------------------------------------------------------------

def tailored_rows(group):
    """How many delivery rows hold a copy of their own."""
    return group.app.store._query(
        "SELECT COUNT(*) FROM comet_deliveries WHERE body IS NOT NULL")[0][0]


def test_an_on_emit_that_returns_its_package_unchanged_stores_no_copy(group):
    action = group.app.action("note")

    @action.on_emit
    def emit(package, recipient, private, db):
        if package["text"] == "tailored" and recipient == "carol":
            package["text"] = "for carol"
        return package
    for text in ("same", "tailored"):
        group.app.push({"type": "note", "listeners": ["to"], "to": ["bob", "carol", "dan"],
                        "text": text})
    assert tailored_rows(group) == 1
    assert [p["text"] for p in inbox(group.app, "carol")] == ["same", "for carol"]
    assert [p["text"] for p in inbox(group.app, "dan")] == ["same", "tailored"]


def test_big_tailored_copies_are_written_under_max_allowed_packet(mariadb, tmp_path, request):
    group = open_group("mysql", request, tmp_path)
    [(packet,)] = mariadb.query(group.url, "SELECT @@max_allowed_packet")
    recipients = [f"r{n:04d}" for n in range(packet // 60_000 + 20)]   # their copies pass it

    @group.app.action("big").on_emit
    def emit(package, recipient, private, db):
        package["for"] = recipient
        return package
    try:
        stamp = group.app.push({"type": "big", "listeners": ["to"], "to": recipients,
                                "text": "x" * 60_000})
        [(rows,)] = mariadb.query(group.url, "SELECT COUNT(*) FROM comet_deliveries WHERE pos ="
                                             " (SELECT pos FROM comet_packages WHERE stamp = %s)",
                                  (stamp,))
        assert rows == len(recipients)
        [last] = inbox(group.app, recipients[-1])
        assert last["for"] == recipients[-1] and len(last["text"]) == 60_000
    finally:
        group.app.close()


def test_a_copy_too_large_for_the_store_is_that_packages_413_not_the_batchs(mariadb, tmp_path,
                                                                           request):
    group = open_group("mysql", request, tmp_path)
    [(packet,)] = mariadb.query(group.url, "SELECT @@max_allowed_packet")

    @group.app.action("note").on_emit
    def emit(package, recipient, private, db):
        if package["text"] == "huge":
            package["text"] = "x" * packet
        return package
    try:
        results = queue_behind(group, note(group, "kept"), note(group, "huge"), note(group, "also"))
        assert results[2] == 413
        assert sorted(group.delivered()) == ["also", "hold", "kept"]
    finally:
        group.app.close()


def test_a_sender_too_large_for_the_store_is_that_pushs_500_logged_and_members_stay_readable(
        mariadb, tmp_path, request, caplog):
    group = open_group("mysql", request, tmp_path)
    store = group.app.store
    store.close()
    connect = store._connect

    def lenient():                                      # MariaDB would truncate it silently
        conn = connect()
        with conn.cursor() as cur:
            cur.execute("SET SESSION sql_mode = ''")
        return conn
    store._connect = lenient
    group.app.sender = lambda environ, db: "x" * 70_000 if environ["HTTP_X_CLIENT"] == "big" \
        else environ["HTTP_X_CLIENT"]
    try:
        web = webtest.TestApp(group.app)
        join = {"type": "join", "listeners": ["room"]}
        web.post_json("/comet/push", join, headers={"X-Client": "bob"})
        response = web.post_json("/comet/push", join, headers={"X-Client": "big"}, status=500)
        error_of(response, 500, "internal")
        assert "a sender of 70002 characters is too large" in caplog.text     # as JSON
        assert group.app.channel("room").members() == {"bob": "bob"}
    finally:
        group.app.close()


FORBIDDEN_IN_OLD_SQLITE = ["RETURNING", "ON CONFLICT", " OVER ", " OVER(", "FILTER (",
                           "NULLS FIRST", "NULLS LAST", "IIF(", "->", "STRICT", "GENERATED",
                           "DROP COLUMN", "RENAME COLUMN", "MATERIALIZED", "UNIXEPOCH"]


def test_the_sqlite_store_needs_nothing_newer_than_sqlite_3_8_2(tmp_path, monkeypatch):
    statements = []
    connect = comet.SQLiteStore._connect

    def traced(store):
        conn = connect(store)
        conn.set_trace_callback(statements.append)
        conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)   # the default before 3.32
        return conn
    monkeypatch.setattr(comet.SQLiteStore, "_connect", traced)
    app = make_app(store=f"sqlite:///{tmp_path}/comet.db", poll_timeout=0.1)
    try:
        alice, bob = as_client(app, "alice"), as_client(app, "bob")
        cursor = bob.get("/comet/poll").json["cursor"]
        alice.post_json("/comet/push", {"type": "join", "listeners": ["room"]})
        batch = [{"type": "n", "listeners": ["to"], "to": ["bob", "c", "d", "e"], "n": n,
                  "_stamp": f"stamp{n:04d}"} for n in range(100)]
        assert len(alice.post_json("/comet/push", batch).json["accepted"]) == 100
        assert len(bob.get("/comet/poll", {"cursor": cursor}).json["packages"]) == 100
        app.push({"type": "m", "listeners": ["room"]})
        assert app.channel("room").members() == {"alice": "alice"}
        app._tail()
        app._tail()
        app._sweep_presence()
        app.store.purge(comet._now_ms() + 1)
    finally:
        app.close()
    found = {token: s for s in statements for token in FORBIDDEN_IN_OLD_SQLITE if token in s.upper()}
    assert found == {}
    assert any("INSERT INTO comet_deliveries" in s for s in statements)


def test_an_sqlite_older_than_3_8_2_is_refused_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 8, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.8.1")
    with pytest.raises(RuntimeError, match=r"SQLite 3\.8\.2 or later.*3\.8\.1"):
        comet.SQLiteStore(f"{tmp_path}/comet.db")


# --------------------------------------------------------------------------
# Limits keyed by the remote address
# --------------------------------------------------------------------------

def shed_push(app, address, status=200, **environ):
    """A push from a client that drops its cookie: every request is a new client."""
    web = webtest.TestApp(app, extra_environ={"REMOTE_ADDR": address, **environ})
    response = web.post_json("/comet/push", {"type": "x", "listeners": "bob"}, status=status)
    assert "comet_sid=" in response.headers.get("Set-Cookie", "")  # a new client each time
    return response


def test_a_client_shedding_its_cookie_is_rate_limited_by_its_address(store_url):
    app = comet.Comet(None, store=store_url, address_rate=(1, 3))
    for _ in range(3):
        shed_push(app, "203.0.113.7")
    response = shed_push(app, "203.0.113.7", status=429)
    error_of(response, 429, "rate_limited")
    assert int(response.headers["Retry-After"]) >= 1
    shed_push(app, "203.0.113.8")                       # another address is not slowed
    app.close()


def test_a_client_shedding_its_cookie_is_limited_in_parked_polls_by_its_address(store_url):
    app = comet.Comet(None, store=store_url, max_polls_per_address=2, poll_timeout=1)
    with ThreadedServer(app) as server:
        cursor = f"{app.store.id}.0"
        parked = [threading.Thread(target=Client(server.url, "-").request,
                                   args=("GET", "/comet/poll?cursor=" + cursor))
                  for _ in range(2)]
        for thread in parked:
            thread.start()
        wait_until(lambda: app.stats()["parked"] == 2)
        status, headers, body = Client(server.url, "-").request("GET", "/comet/poll?cursor=" + cursor)
        assert (status, body["error"]) == (429, "rate_limited")
        assert int(headers["Retry-After"]) >= 1
        for thread in parked:
            thread.join(10)
    app.close()


def test_the_client_address_option_keys_the_limits_by_a_trusted_proxy_header(store_url):
    app = comet.Comet(None, store=store_url, address_rate=(1, 2),
                      client_address=lambda environ: environ.get("HTTP_X_FORWARDED_FOR"))
    for _ in range(2):
        shed_push(app, "10.0.0.1", HTTP_X_FORWARDED_FOR="198.51.100.1")
    shed_push(app, "10.0.0.1", status=429, HTTP_X_FORWARDED_FOR="198.51.100.1")
    shed_push(app, "10.0.0.1", HTTP_X_FORWARDED_FOR="198.51.100.2")
    app.close()


def test_ipv6_addresses_of_one_64_prefix_share_a_limit(store_url):
    app = comet.Comet(None, store=store_url, address_rate=(1, 2))
    for address in ("2001:db8:1:2::10", "2001:db8:1:2:ffff::1"):
        shed_push(app, address)
    shed_push(app, "2001:db8:1:2::99", status=429)
    shed_push(app, "2001:db8:1:3::10")
    app.close()


def test_the_address_limits_leave_a_busy_office_behind_one_address_alone(store_url):
    app = make_app(store=store_url, poll_timeout=0.2)
    office = [as_client(app, f"user{n}", REMOTE_ADDR="192.0.2.1") for n in range(40)]
    for _ in range(3):
        for user in office:
            user.post_json("/comet/push", {"type": "x", "listeners": "bob"})
    assert len(inbox(app, "bob")) == 120
    app.close()


# --------------------------------------------------------------------------
# Other input that fails every time
# --------------------------------------------------------------------------

@pytest.mark.parametrize("origin", ["http://[::1", "http://[zz]:80", "://", "\x00"])
def test_a_malformed_origin_is_403_bad_origin(app, origin):
    status, _, body = wsgi(app, b'{"type": "x", "listeners": "bob"}', HTTP_ORIGIN=origin)
    assert (status, body["error"]) == (403, "bad_origin")
