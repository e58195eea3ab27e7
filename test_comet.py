"""What comet.py promises, behaviour by behaviour.

WebTest for the request/response rules; a real threaded server on 127.0.0.1
with real HTTP clients for parking, wake-ups, ordering and concurrency; real
processes for kill -9.  Group commit runs on SQLite and on the real MariaDB
(``group`` in tests/support.py).
"""

import io
import itertools
import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import webtest

import comet
from comet import Comet, CometError, Reject
from support import (Client, ServerProcess, ThreadedServer, answer_from_the_window,
                     cursor_position, free_port, fresh_store, hooked_traffic, make_app,
                     wait_until)
from support import close_apps, group, mariadb, postgres  # noqa: F401  (fixtures)

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "comet_client.js"), "rb") as file:
    CLIENT_SCRIPT = file.read()             # what the script paths serve, byte for byte


@pytest.fixture(params=["memory", "sqlite", "mysql", "postgresql", "sqlite+window"])
def store_url(request, tmp_path, monkeypatch):
    """A new, empty store of each kind (a database of its own on MariaDB and PostgreSQL);
    ``+window``: every Comet of the test answers its polls from its window (a shared
    store's, started before the test goes on) instead of by reading the store."""
    kind, _, window = request.param.partition("+")
    if window:
        answer_from_the_window(monkeypatch)
    return fresh_store(kind, request, tmp_path)


def as_client(app, client_id):
    """A WebTest app whose requests come from ``client_id`` (the X-Client header)."""
    return webtest.TestApp(app, extra_environ={"HTTP_X_CLIENT": client_id})


def push(web, package, status=200, **kwargs):
    return web.post_json("/comet/push", package, status=status, **kwargs)


def poll(web, cursor=None, status=200):
    params = {} if cursor is None else {"cursor": cursor}
    return web.get("/comet/poll", params, status=status)


def error_of(response, status, code):
    assert response.status_int == status
    assert response.content_type == "application/json"
    assert response.json["error"] == code
    assert isinstance(response.json["message"], str)
    assert "Traceback" not in response.text
    return response.json


@pytest.fixture
def app(store_url):
    app = make_app(store=store_url, poll_timeout=0.2)
    yield app
    app.close()


@pytest.fixture
def alice(app):
    return as_client(app, "alice")


@pytest.fixture
def bob(app):
    return as_client(app, "bob")


def received(web, cursor):
    answer = poll(web, cursor).json
    return answer["packages"], answer["cursor"]


# --------------------------------------------------------------------------
# Push and poll: the basic round trip
# --------------------------------------------------------------------------

def test_new_client_poll_answers_at_once_with_the_head(alice):
    answer = poll(alice).json
    assert answer["packages"] == [] and answer["reset"] is False
    assert isinstance(answer["cursor"], str)


def test_pushed_package_reaches_its_recipient_after_the_cursor(alice, bob):
    cursor = poll(bob).json["cursor"]
    stamp = push(alice, {"type": "hello", "listeners": ["to"], "to": ["bob"], "text": "hi"}).json["accepted"][0]
    packages, _ = received(bob, cursor)
    assert [(p["type"], p["text"], p["sender"], p["_stamp"]) for p in packages] == [
        ("hello", "hi", "alice", stamp)]


def test_a_client_polling_with_its_latest_cursor_never_sees_a_package_twice(alice, bob):
    cursor = poll(bob).json["cursor"]
    push(alice, {"type": "one", "listeners": ["to"], "to": ["bob"]})
    first, cursor = received(bob, cursor)
    push(alice, {"type": "two", "listeners": ["to"], "to": ["bob"]})
    second, cursor = received(bob, cursor)
    third, _ = received(bob, cursor)
    assert [p["type"] for p in first + second + third] == ["one", "two"]


def test_an_older_cursor_gets_the_packages_again(alice, bob):
    cursor = poll(bob).json["cursor"]
    push(alice, {"type": "one", "listeners": ["to"], "to": ["bob"]})
    first, _ = received(bob, cursor)
    again, _ = received(bob, cursor)
    assert first == again and len(first) == 1


def test_packages_come_in_acceptance_order(alice, bob):
    cursor = poll(bob).json["cursor"]
    for n in range(10):
        push(alice, {"type": "n", "listeners": ["to"], "to": ["bob"], "n": n})
    packages, _ = received(bob, cursor)
    assert [p["n"] for p in packages] == list(range(10))


def test_a_poll_answers_at_most_500_packages_and_the_rest_follow(alice, bob):
    cursor = poll(bob).json["cursor"]
    for start in range(0, 600, 100):
        push(alice, [{"type": "n", "listeners": ["to"], "to": ["bob"], "n": n}
                     for n in range(start, start + 100)])
    first, cursor = received(bob, cursor)
    rest, _ = received(bob, cursor)
    assert len(first) == 500
    assert [p["n"] for p in first + rest] == list(range(600))


def test_a_poll_with_nothing_for_the_client_answers_empty_after_poll_timeout(alice):
    cursor = poll(alice).json["cursor"]
    started = time.monotonic()
    answer = poll(alice, cursor).json
    assert answer["packages"] == [] and answer["reset"] is False
    assert time.monotonic() - started >= 0.2


def test_poll_and_push_answers_say_no_store(alice):
    assert poll(alice).headers["Cache-Control"] == "no-store"
    assert push(alice, {"type": "x", "listeners": "bob"}).headers["Cache-Control"] == "no-store"
    bad = push(alice, {"type": ""}, status=400)
    assert bad.headers["Cache-Control"] == "no-store"


def test_a_batch_is_accepted_in_order(alice, bob):
    cursor = poll(bob).json["cursor"]
    stamps = push(alice, [{"type": "n", "listeners": "bob", "n": n} for n in range(5)]).json["accepted"]
    packages, _ = received(bob, cursor)
    assert [p["_stamp"] for p in packages] == stamps


# --------------------------------------------------------------------------
# Listeners: multi and single
# --------------------------------------------------------------------------

def test_multi_listeners_reach_the_union_of_recipients_each_once(app, alice, bob):
    @app.listener("also")
    def also(environ, package, db):
        return ["bob", "carol"]
    carol = as_client(app, "carol")
    cursors = {name: poll(web).json["cursor"] for name, web in (("bob", bob), ("carol", carol))}
    push(alice, {"type": "x", "listeners": ["to", "also"], "to": ["bob"]})
    assert len(received(bob, cursors["bob"])[0]) == 1
    assert len(received(carol, cursors["carol"])[0]) == 1


def test_a_single_string_listener_is_that_client(alice, bob):
    cursor = poll(bob).json["cursor"]
    push(alice, {"type": "x", "listeners": "bob"})
    assert len(received(bob, cursor)[0]) == 1


def test_a_single_integer_listener_is_the_client_of_that_number(app, alice):
    seven = as_client(app, "7")
    cursor = poll(seven).json["cursor"]
    push(alice, {"type": "x", "listeners": 7})
    assert len(received(seven, cursor)[0]) == 1


def test_a_listener_hook_gets_environ_package_and_db(app, alice):
    seen = []

    @app.listener("spy")
    def spy(environ, package, db):
        seen.append((environ["HTTP_X_CLIENT"], package["type"], db))
        return []
    push(alice, {"type": "x", "listeners": ["spy"]})
    client, kind, db = seen[0]
    assert (client, kind) == ("alice", "x")
    assert isinstance(db, connection_type(app.store))


def connection_type(store):
    """What a store hands its hooks as ``db``: its driver's connection (None for memory)."""
    if isinstance(store, comet.MySQLStore):
        import pymysql
        return pymysql.connections.Connection
    if isinstance(store, comet.PostgreSQLStore):
        import psycopg
        return psycopg.Connection
    return sqlite3.Connection if isinstance(store, comet.SQLiteStore) else type(None)


# --------------------------------------------------------------------------
# Server-owned fields: sender, _stamp, _ts, private
# --------------------------------------------------------------------------

def test_server_owned_fields_replace_what_the_client_sent(alice, bob):
    cursor = poll(bob).json["cursor"]
    push(alice, {"type": "x", "listeners": "bob", "sender": "mallory", "_ts": 1, "_stamp": "bad stamp"})
    (package,), _ = received(bob, cursor)
    assert package["sender"] == "alice"
    assert package["_ts"] > 1_700_000_000_000
    assert package["_stamp"] != "bad stamp" and comet._STAMP.match(package["_stamp"])


def test_a_well_formed_client_stamp_is_kept(alice):
    assert push(alice, {"type": "x", "listeners": "bob", "_stamp": "abcd-EFGH_1234"}).json == {
        "accepted": ["abcd-EFGH_1234"]}


def test_the_same_client_stamp_twice_is_accepted_once_and_delivered_once(alice, bob):
    cursor = poll(bob).json["cursor"]
    package = {"type": "x", "listeners": "bob", "_stamp": "same-stamp-123"}
    first = push(alice, package).json
    second = push(alice, package).json
    assert first == second == {"accepted": ["same-stamp-123"]}
    packages, _ = received(bob, cursor)
    assert [p["_stamp"] for p in packages] == ["same-stamp-123"]


def test_the_same_stamp_is_delivered_once_across_a_restart_of_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path}/comet.db"
    first = make_app(store=url, poll_timeout=0.1)
    cursor = poll(as_client(first, "bob")).json["cursor"]
    push(as_client(first, "alice"), {"type": "x", "listeners": "bob", "_stamp": "restart-stamp"})
    first.close()
    second = make_app(store=url, poll_timeout=0.1)
    assert push(as_client(second, "alice"), {"type": "x", "listeners": "bob", "_stamp": "restart-stamp"}).json == {
        "accepted": ["restart-stamp"]}
    packages, _ = received(as_client(second, "bob"), cursor)
    assert [p["_stamp"] for p in packages] == ["restart-stamp"]


def test_the_sender_hook_names_the_sender(store_url):
    app = make_app(poll_timeout=0.2, store=store_url, sender=lambda environ, db: {"nick": environ["HTTP_X_CLIENT"].title()})
    bob = as_client(app, "bob")
    cursor = poll(bob).json["cursor"]
    push(as_client(app, "alice"), {"type": "x", "listeners": "bob"})
    assert received(bob, cursor)[0][0]["sender"] == {"nick": "Alice"}


def test_private_reaches_the_hooks_and_never_a_client(app, alice, bob):
    seen = []
    action = app.action("secret")

    @action.on_submit
    def submit(package, private, db, environ):
        seen.append(dict(private))          # fresh: the client's private is dropped
        private["key"] = "server only"

    @action.on_emit
    def emit(package, recipient, private, db):
        seen.append(private["key"])
        return package
    cursor = poll(bob).json["cursor"]
    push(alice, {"type": "secret", "listeners": "bob", "private": {"key": "from client"}})
    packages, _ = received(bob, cursor)
    assert seen == [{}, "server only"]
    assert "private" not in packages[0]
    assert "server only" not in json.dumps(packages)


def test_a_server_push_goes_through_the_hooks_with_no_environ(app, bob):
    seen = []

    @app.action("note").on_submit
    def submit(package, private, db, environ):
        seen.append((environ, private))
    cursor = poll(bob).json["cursor"]
    stamp = app.push({"type": "note", "listeners": "bob"}, sender="server", private={"k": 1})
    (package,), _ = received(bob, cursor)
    assert seen == [(None, {"k": 1})]
    assert package["sender"] == "server" and package["_stamp"] == stamp


def test_a_server_push_raises_what_the_http_push_would_answer(app):
    with pytest.raises(CometError) as caught:
        app.push({"type": "x", "listeners": ["nobody"]})
    assert (caught.value.status, caught.value.code) == (400, "unknown_listener")


# --------------------------------------------------------------------------
# Actions and the emit filter
# --------------------------------------------------------------------------

def test_on_submit_runs_once_and_may_change_the_package(app, alice, bob):
    calls = []

    @app.action("shout").on_submit
    def submit(package, private, db, environ):
        calls.append(1)
        package["text"] = package["text"].upper()
    cursors = {"bob": poll(bob).json["cursor"]}
    push(alice, {"type": "shout", "listeners": ["to"], "to": ["alice", "bob"], "text": "hi"})
    assert calls == [1]
    assert received(bob, cursors["bob"])[0][0]["text"] == "HI"


def test_reject_in_on_submit_is_403_rejected_with_its_message(app, alice, bob):
    @app.action("spam").on_submit
    def submit(package, private, db, environ):
        raise Reject("you are banned")
    head = app.store.head()
    body = error_of(push(alice, {"type": "spam", "listeners": "bob"}, status=403), 403, "rejected")
    assert body["message"] == "you are banned"
    assert app.store.head() == head


def test_on_emit_tailors_a_copy_per_recipient_or_skips_with_none(app, alice, bob):
    carol = as_client(app, "carol")

    @app.action("deal").on_emit
    def emit(package, recipient, private, db):
        if recipient == "carol":
            return None
        package["card"] = "ace for " + recipient
        return package
    cursors = {name: poll(web).json["cursor"] for name, web in (("bob", bob), ("carol", carol), ("alice", alice))}
    push(alice, {"type": "deal", "listeners": ["to"], "to": ["alice", "bob", "carol"]})
    assert received(bob, cursors["bob"])[0][0]["card"] == "ace for bob"
    assert received(alice, cursors["alice"])[0][0]["card"] == "ace for alice"
    assert received(carol, cursors["carol"])[0] == []


def test_the_emit_filter_has_the_last_word_on_each_delivery(store_url):
    app = make_app(poll_timeout=0.2, store=store_url, emit_filter=lambda package, recipient, db: recipient != "carol")
    bob, carol = as_client(app, "bob"), as_client(app, "carol")
    cursors = {"bob": poll(bob).json["cursor"], "carol": poll(carol).json["cursor"]}
    push(as_client(app, "alice"), {"type": "x", "listeners": ["to"], "to": ["bob", "carol"]})
    assert len(received(bob, cursors["bob"])[0]) == 1
    assert received(carol, cursors["carol"])[0] == []


def test_a_hook_write_commits_with_the_package_and_rolls_back_with_it(tmp_path):
    url = f"sqlite:///{tmp_path}/app.db"
    app = make_app(poll_timeout=0.2, store=url)
    with sqlite3.connect(f"{tmp_path}/app.db") as db:
        db.execute("CREATE TABLE log (text TEXT)")
    action = app.action("log")

    @action.on_submit
    def submit(package, private, db, environ):
        db.execute("INSERT INTO log VALUES (?)", (package["text"],))
        if package["text"] == "refused":
            raise Reject("no")
    alice = as_client(app, "alice")
    push(alice, {"type": "log", "listeners": "bob", "text": "kept"})
    push(alice, {"type": "log", "listeners": "bob", "text": "refused"}, status=403)
    with sqlite3.connect(f"{tmp_path}/app.db") as db:
        assert db.execute("SELECT text FROM log").fetchall() == [("kept",)]


# Group commit, on SQLite and on MariaDB (the ``group`` fixture of tests/support.py)

def test_pushes_queued_behind_a_transaction_share_its_commit(group):
    results = group.run("hold", "kept", "refused", "also kept")
    assert results["refused"] == 403 and all(
        isinstance(results[text], str) for text in ("hold", "kept", "also kept"))
    assert group.flushes == [3]             # one commit for the three accepted
    [positions] = group.commits             # ... told once, in order, with no gap
    assert positions == list(range(positions[0], positions[0] + 3))
    assert group.log() == ["also kept", "hold", "kept"]     # the refused one's write undone
    assert group.delivered()[0] == "hold"
    assert sorted(group.delivered()) == ["also kept", "hold", "kept"]


def test_concurrent_pushes_with_refusing_hooks_keep_every_guarantee(group):
    statuses, received = hooked_traffic(group, pushers=8, each=25)
    accepted = sorted(text for text, status in statuses.items() if status == 200)
    assert len(accepted) == 8 * 20
    assert {status for text, status in statuses.items() if text.startswith("refused")} == {403}
    assert received[-1] == "end"                            # read until after the last
    assert sorted(received[:-1]) == accepted                # every one, once
    for k in range(8):                                      # each pusher's in its order
        mine = [text for text in received if text.startswith(f"{k}-")]
        assert mine == sorted(mine, key=lambda text: int(text.split("-")[1]))
    assert group.log() == accepted                          # the refused hooks' writes undone
    assert sum(group.flushes) == len(accepted) + 1          # the pushes' commits, "end"'s too
    # Shared: how often depends on how busy the machine is (the held batches' tests
    # show the sharing itself; bench/ how much it gives).
    assert max(group.flushes) > 1, group.flushes


def test_a_first_part_that_fails_is_rolled_back_alone(group):
    results = group.run("hold-refused", "kept", "also kept")
    assert results == {"hold-refused": 403, "kept": results["kept"], "also kept": results["also kept"]}
    assert group.log() == ["also kept", "kept"]
    assert sorted(group.delivered()) == ["also kept", "kept"]


def test_a_failed_commit_fails_every_part_and_keeps_nothing(group, monkeypatch):
    def broken(batch):
        raise group.driver_error
    monkeypatch.setattr(group.app.store, "_flush", broken)
    head = group.app.store.head()
    assert group.run("hold", "kept", "also kept") == {"hold": 503, "kept": 503, "also kept": 503}
    assert group.app.store.head() == head and group.log() == [] and group.delivered() == []
    monkeypatch.undo()
    assert isinstance(group.app.push({"type": "note", "listeners": "bob", "text": "after"}), str)
    assert group.log() == ["after"]


def test_a_push_from_a_hook_commits_with_the_package_or_not_at_all(store_url):
    app = make_app(store=store_url, poll_timeout=0.2)

    @app.action("order").on_submit
    def submit(package, private, db, environ):
        app.push({"type": "receipt", "listeners": "clerk", "item": package["item"]})
        if package["item"] == "refused":
            raise Reject("no")
    alice = as_client(app, "alice")
    push(alice, {"type": "order", "listeners": "shop", "item": "tea"})
    push(alice, {"type": "order", "listeners": "shop", "item": "refused"}, status=403)
    receipts = [json.loads(body) for _, _, body in app.store.read("clerk", 0, 10)[1]]
    assert [(p["type"], p["item"], p["sender"]) for p in receipts] == [("receipt", "tea", None)]
    assert [json.loads(body)["item"] for _, _, body in app.store.read("shop", 0, 10)[1]] == ["tea"]


def test_a_raising_hook_is_500_internal_logged_and_the_server_goes_on(app, alice, bob, caplog):
    @app.action("boom").on_submit
    def submit(package, private, db, environ):
        raise KeyError("oops")
    head = app.store.head()
    with caplog.at_level(logging.ERROR, logger="comet"):
        response = push(alice, {"type": "boom", "listeners": "bob"}, status=500)
    error_of(response, 500, "internal")
    assert "oops" not in response.text
    assert any(record.exc_info for record in caplog.records)
    assert app.store.head() == head
    assert push(alice, {"type": "fine", "listeners": "bob"}).status_int == 200


def test_a_failure_in_a_batch_keeps_the_packages_before_it(alice, bob):
    cursor = poll(bob).json["cursor"]
    response = push(alice, [{"type": "a", "listeners": "bob"}, {"type": "b", "listeners": ["nope"]},
                            {"type": "c", "listeners": "bob"}], status=400)
    body = error_of(response, 400, "unknown_listener")
    assert body["index"] == 1 and len(body["accepted"]) == 1
    packages, _ = received(bob, cursor)
    assert [p["type"] for p in packages] == ["a"]


# --------------------------------------------------------------------------
# Errors: every error status and code, and nothing changes
# --------------------------------------------------------------------------

def raw_push(web, body, content_type="application/json", status=400, **headers):
    return web.post("/comet/push", body, headers=headers, content_type=content_type, status=status)


@pytest.mark.parametrize("body", [b"{", b"\xff\xfe{}", b"[" * 30_000 + b"]" * 30_000,
                                  b'{"type": NaN}', b"1e999", b""],
                         ids=["truncated", "not-utf8", "too-deep", "nan", "infinite", "empty"])
def test_a_body_that_is_not_utf8_json_is_400_bad_json(app, alice, body):
    head = app.store.head()
    error_of(raw_push(alice, body), 400, "bad_json")
    assert app.store.head() == head


@pytest.mark.parametrize("package", [
    {"listeners": "bob"},                               # no type
    {"type": "", "listeners": "bob"},
    {"type": "x" * 65, "listeners": "bob"},
    {"type": 5, "listeners": "bob"},
    {"type": "x", "listeners": []},
    {"type": "x", "listeners": True},
    {"type": "x", "listeners": None},
    {"type": "x"},
    {"type": "x", "listeners": ""},
    {"type": "x", "listeners": ["to", 3]},
    {"type": "x", "listeners": {"to": 1}},
    [1],                                                # an element that is not an object
    "text",
])
def test_a_malformed_package_is_400_bad_package(app, alice, package):
    head = app.store.head()
    error_of(push(alice, package, status=400), 400, "bad_package")
    assert app.store.head() == head


def test_a_batch_over_max_batch_is_400_bad_package(app, alice):
    error_of(push(alice, [{"type": "x", "listeners": "bob"}] * 101, status=400), 400, "bad_package")
    assert app.store.head() == 0


def test_more_listener_names_than_max_listeners_is_400_bad_package(app, alice):
    error_of(push(alice, {"type": "x", "listeners": ["to"] * 101}, status=400), 400, "bad_package")


def test_an_unregistered_listener_name_is_400_unknown_listener(app, alice):
    error_of(push(alice, {"type": "x", "listeners": ["to", "ghost"]}, status=400), 400, "unknown_listener")
    assert app.store.head() == 0


def test_no_identity_is_403_forbidden(store_url):
    app = make_app(poll_timeout=0.2, store=store_url)               # the X-Client header is missing
    web = webtest.TestApp(app)
    error_of(web.get("/comet/poll", status=403), 403, "forbidden")
    error_of(push(web, {"type": "x", "listeners": "bob"}, status=403), 403, "forbidden")


def test_a_foreign_origin_is_403_bad_origin(app, alice):
    response = push(alice, {"type": "x", "listeners": "bob"}, status=403,
                    headers={"Origin": "http://evil.example"})
    error_of(response, 403, "bad_origin")
    assert app.store.head() == 0


def test_the_request_host_and_allowed_origins_may_push(store_url):
    app = make_app(poll_timeout=0.2, store=store_url, allowed_origins=["https://app.example"])
    alice = as_client(app, "alice")
    push(alice, {"type": "x", "listeners": "bob"}, headers={"Origin": "http://localhost:80", "Host": "localhost:80"})
    push(alice, {"type": "x", "listeners": "bob"}, headers={"Origin": "https://app.example"})


def test_a_path_under_the_prefix_that_is_no_endpoint_is_404_not_found(alice):
    error_of(alice.get("/comet/nothing", status=404), 404, "not_found")


def test_a_wrong_method_is_405_method_with_allow(alice):
    response = alice.post("/comet/poll", status=405)
    error_of(response, 405, "method")
    assert response.headers["Allow"] == "GET"
    assert alice.get("/comet/push", status=405).headers["Allow"] == "POST"


def test_a_body_over_max_body_is_413_refused_before_reading(app):
    class Unreadable(io.BytesIO):
        def read(self, *args):
            raise AssertionError("the body was read")
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/comet/push", "CONTENT_TYPE": "application/json",
               "CONTENT_LENGTH": str(65537), "wsgi.input": Unreadable(), "HTTP_X_CLIENT": "alice",
               "wsgi.url_scheme": "http", "SERVER_NAME": "x", "SERVER_PORT": "80"}
    statuses = []
    body = b"".join(app(environ, lambda status, headers: statuses.append(status)))
    assert statuses == ["413 Request Entity Too Large"]
    assert json.loads(body)["error"] == "too_large"


def test_a_push_that_is_not_json_is_415_content_type(alice):
    error_of(raw_push(alice, b'{"type": "x", "listeners": "bob"}', content_type="text/plain", status=415),
             415, "content_type")


def test_too_many_pushes_are_429_with_retry_after(store_url):
    app = make_app(poll_timeout=0.2, store=store_url, rate=(1, 3))
    alice = as_client(app, "alice")
    for _ in range(3):
        push(alice, {"type": "x", "listeners": "bob"})
    response = push(alice, {"type": "x", "listeners": "bob"}, status=429)
    error_of(response, 429, "rate_limited")
    assert int(response.headers["Retry-After"]) >= 1
    push(as_client(app, "bob"), {"type": "x", "listeners": "alice"})    # others are not slowed


class DownStore(comet.MemoryStore):
    """A store whose database has gone away."""

    def transaction(self):
        raise comet._unavailable("the store is unavailable")

    def read(self, recipient, after, limit):
        raise comet._unavailable("the store is unavailable")

    def head(self):
        raise comet._unavailable("the store is unavailable")


def test_a_store_outage_is_503_unavailable_with_retry_after():
    app = make_app(poll_timeout=0.2, store=DownStore())
    alice = as_client(app, "alice")
    for response in (push(alice, {"type": "x", "listeners": "bob"}, status=503), poll(alice, status=503)):
        error_of(response, 503, "unavailable")
        assert int(response.headers["Retry-After"]) >= 1
    with pytest.raises(CometError) as caught:
        app.push({"type": "x", "listeners": "bob"})
    assert caught.value.status == 503


def test_an_unreachable_sqlite_file_is_503_and_the_store_recovers(tmp_path, monkeypatch):
    app = make_app(poll_timeout=0.2, store=f"sqlite:///{tmp_path}/comet.db")
    alice = as_client(app, "alice")
    app.store.close()
    real_connect = app.store._connect

    def broken():
        raise sqlite3.OperationalError("unable to open database file")
    monkeypatch.setattr(app.store, "_connect", broken)
    error_of(push(alice, {"type": "x", "listeners": "bob"}, status=503), 503, "unavailable")
    monkeypatch.setattr(app.store, "_connect", real_connect)
    push(alice, {"type": "x", "listeners": "bob"})


def test_more_parked_polls_than_allowed_per_client_is_429(store_url):
    app = make_app(store=store_url, max_polls_per_client=1, poll_timeout=5)
    with ThreadedServer(app) as server:
        alice = Client(server.url, "alice")
        cursor = alice.poll()["cursor"]
        parked = threading.Thread(target=alice.poll, args=(cursor,))
        parked.start()
        wait_until(lambda: app.stats()["parked"] == 1)
        status, headers, body = alice.request("GET", "/comet/poll?cursor=" + cursor)
        assert (status, body["error"]) == (429, "rate_limited")
        assert int(headers["Retry-After"]) >= 1
        Client(server.url, "bob").push({"type": "x", "listeners": "alice"})
        parked.join(5)


def test_a_client_at_its_parked_poll_limit_is_answered_what_is_waiting_for_it(store_url):
    # The limit counts polls held; a poll that has something to answer is never held.
    app = make_app(store=store_url, max_polls_per_client=1, poll_timeout=5)
    with ThreadedServer(app) as server:
        alice, bob = Client(server.url, "alice"), Client(server.url, "bob")
        before = alice.poll()["cursor"]
        stamp = bob.push({"type": "x", "listeners": "alice"})[2]["accepted"][0]
        after = alice.poll(before)["cursor"]
        parked = threading.Thread(target=alice.poll, args=(after,))
        parked.start()
        wait_until(lambda: app.stats()["parked"] == 1)
        status, _, body = alice.request("GET", "/comet/poll?cursor=" + before)
        assert status == 200 and [p["_stamp"] for p in body["packages"]] == [stamp]
        bob.push({"type": "y", "listeners": "alice"})
        parked.join(5)


def test_more_parked_polls_than_max_polls_is_503(store_url):
    app = make_app(store=store_url, max_polls=1, poll_timeout=5)
    with ThreadedServer(app) as server:
        alice, bob = Client(server.url, "alice"), Client(server.url, "bob")
        cursor = alice.poll()["cursor"]
        parked = threading.Thread(target=alice.poll, args=(cursor,))
        parked.start()
        wait_until(lambda: app.stats()["parked"] == 1)
        status, headers, body = bob.request("GET", "/comet/poll?cursor=" + cursor)
        assert (status, body["error"]) == (503, "unavailable")
        assert int(headers["Retry-After"]) >= 1
        bob.push({"type": "x", "listeners": "alice"})
        parked.join(5)


# --------------------------------------------------------------------------
# Cursors and reset
# --------------------------------------------------------------------------

def test_a_cursor_this_store_did_not_issue_is_answered_with_reset(alice):
    for cursor in ("nonsense", "deadbeef.3", ""):
        answer = poll(alice, cursor).json
        assert answer["reset"] is True and answer["packages"] == []


def test_a_cursor_from_a_memory_store_before_restart_is_reset():
    first = make_app(poll_timeout=0.2, store="memory:")
    cursor = poll(as_client(first, "bob")).json["cursor"]
    second = make_app(poll_timeout=0.2, store="memory:")
    assert poll(as_client(second, "bob"), cursor).json["reset"] is True


def test_a_cursor_ahead_of_the_head_is_reset(app, alice):
    cursor = poll(alice).json["cursor"]
    store_id = cursor.split(".")[0]
    assert poll(alice, f"{store_id}.999").json["reset"] is True


def test_an_expired_package_for_the_client_resets_it_and_not_another(store_url):
    app = make_app(store=store_url, retention=0.2, poll_timeout=0.1)
    alice, bob, carol = (as_client(app, name) for name in ("alice", "bob", "carol"))
    cursor = poll(bob).json["cursor"]
    push(alice, {"type": "old", "listeners": "bob"})
    after = cursor_position(cursor)
    wait_until(lambda: app.store.read("bob", after, 10)[2])    # the housekeeping purged it
    answer = poll(bob, cursor).json
    assert answer["reset"] is True and answer["cursor"] == f"{app.store.id}.{app.store.head()}"
    assert poll(carol, cursor).json["reset"] is False


def test_retention_is_judged_when_the_poll_is_answered(store_url):
    app = make_app(store=store_url, retention=3600, poll_timeout=0.1)   # the purge is far off
    alice, bob = as_client(app, "alice"), as_client(app, "bob")
    cursor = poll(bob).json["cursor"]
    push(alice, {"type": "old", "listeners": "bob"})
    pushed_at = comet._now_ms()
    app.retention = 0.01                               # now it is older than retained
    wait_until(lambda: comet._now_ms() > pushed_at + 20)
    assert poll(bob, cursor).json["reset"] is True


def test_sqlite_cursors_survive_a_restart(tmp_path):
    url = f"sqlite:///{tmp_path}/comet.db"
    first = make_app(poll_timeout=0.2, store=url)
    cursor = poll(as_client(first, "bob")).json["cursor"]
    push(as_client(first, "alice"), {"type": "x", "listeners": "bob"})
    first.close()
    answer = poll(as_client(make_app(poll_timeout=0.2, store=url), "bob"), cursor).json
    assert answer["reset"] is False and len(answer["packages"]) == 1


# --------------------------------------------------------------------------
# Channels
# --------------------------------------------------------------------------

def test_join_adds_the_member_and_reaches_the_members_including_the_new_one(app, alice, bob):
    room = app._channels["room"]
    push(bob, {"type": "join", "listeners": ["room"]})
    cursors = {"alice": poll(alice).json["cursor"], "bob": poll(bob).json["cursor"]}
    push(alice, {"type": "join", "listeners": ["room"]})
    assert set(room.members()) == {"alice", "bob"}
    assert [p["type"] for p in received(alice, cursors["alice"])[0]] == ["join"]
    assert [p["sender"] for p in received(bob, cursors["bob"])[0]] == ["alice"]


def test_leave_reaches_the_leaver_and_then_removes_it(app, alice, bob):
    push(alice, {"type": "join", "listeners": ["room"]})
    push(bob, {"type": "join", "listeners": ["room"]})
    cursor = poll(alice).json["cursor"]
    push(alice, {"type": "leave", "listeners": ["room"]})
    assert [p["type"] for p in received(alice, cursor)[0]] == ["leave"]
    assert set(app._channels["room"].members()) == {"bob"}


@pytest.mark.parametrize("kind", ["create", "update", "delete", "message", "leave"])
def test_a_non_member_is_403_not_member(app, alice, kind):
    error_of(push(alice, {"type": kind, "listeners": ["room"]}, status=403), 403, "not_member")
    assert app.store.head() == 0


def test_members_hold_the_sender(store_url):
    app = make_app(poll_timeout=0.2, store=store_url, sender=lambda environ, db: {"nick": "Al"})
    push(as_client(app, "alice"), {"type": "join", "listeners": ["room"]})
    assert app.channel("room").members() == {"alice": {"nick": "Al"}}


def test_a_server_push_to_a_channel_needs_no_membership(app, bob):
    push(bob, {"type": "join", "listeners": ["room"]})
    cursor = poll(bob).json["cursor"]
    app.push({"type": "announce", "listeners": ["room"]})
    assert [p["type"] for p in received(bob, cursor)[0]] == ["announce"]


@pytest.mark.parametrize("channel", ["room", "room:42"])     # registered, and of a namespace
def test_a_silent_member_is_dropped_with_one_timeout_leave(store_url, channel):
    app = make_app(store=store_url, presence_timeout=1.0, poll_timeout=0.05)
    alice, bob = as_client(app, "alice"), as_client(app, "bob")
    push(alice, {"type": "join", "listeners": [channel]})
    push(bob, {"type": "join", "listeners": [channel]})
    cursor = poll(alice).json["cursor"]
    leaves = []

    def alice_hears_bob_leave():
        nonlocal cursor
        packages, cursor = received(alice, cursor)     # alice keeps polling, bob does not
        leaves.extend(p for p in packages if p["type"] == "leave")
        return leaves
    wait_until(alice_hears_bob_leave, timeout=15)
    assert [(p["sender"], p["reason"], p["listeners"]) for p in leaves] == [
        ("bob", "timeout", [channel])]
    assert set(app.store.members(channel)) == {"alice"}
    for _ in range(3):                                 # and no second leave follows
        alice_hears_bob_leave()
    assert len(leaves) == 1


def test_two_processes_on_one_sqlite_file_send_one_timeout_leave(tmp_path):
    url = f"sqlite:///{tmp_path}/comet.db"
    options = dict(store=url, presence_timeout=1.0, poll_timeout=0.05, tail_interval=0.02)
    first, second = make_app(**options), make_app(**options)
    push(as_client(first, "alice"), {"type": "join", "listeners": ["room"]})
    push(as_client(second, "bob"), {"type": "join", "listeners": ["room"]})
    alice = as_client(first, "alice")
    cursor = poll(alice).json["cursor"]
    second.push({"type": "wake", "listeners": "nobody"})   # starts the second's housekeeping too
    leaves = []

    def heard():
        nonlocal cursor
        packages, cursor = received(alice, cursor)
        leaves.extend(p for p in packages if p["type"] == "leave")
        return leaves
    wait_until(heard, timeout=15)
    deadline = time.monotonic() + 1.0                  # both sweepers get several turns
    while time.monotonic() < deadline:
        heard()
    assert [(p["sender"], p["reason"], p["listeners"]) for p in leaves] == [
        ("bob", "timeout", ["room"])]
    assert set(first.store.members("room")) == {"alice"}


@pytest.mark.parametrize("channel", ["room", "room:7"])   # registered, and of a namespace
def test_two_server_processes_on_one_sqlite_file_send_one_timeout_leave(tmp_path, channel):
    url = f"sqlite:///{tmp_path}/comet.db"
    options = dict(presence_timeout=1.0, poll_timeout=0.3, tail_interval=0.05)
    with ServerProcess(url, **options) as first, ServerProcess(url, **options) as second:
        alice = Client(first.url, "alice")
        assert alice.push({"type": "join", "listeners": [channel]})[0] == 200
        assert Client(second.url, "bob").push({"type": "join", "listeners": [channel]})[0] == 200
        alice.poll()
        leaves = []
        deadline = time.monotonic() + 10
        quiet_until = None
        for turn in itertools.count():
            if time.monotonic() > deadline or quiet_until and time.monotonic() > quiet_until:
                break
            alice.port = (first, second)[turn % 2].port     # alice polls both processes in turn
            leaves += [p for p in alice.poll(timeout=5)["packages"] if p["type"] == "leave"]
            if leaves and quiet_until is None:
                quiet_until = time.monotonic() + 2.0       # both sweepers get many more turns
        assert [(p["sender"], p["reason"]) for p in leaves] == [("bob", "timeout")]


# --------------------------------------------------------------------------
# Namespaces: every name with a prefix is a channel (make_app: "room:")
# --------------------------------------------------------------------------

def test_a_name_in_a_namespace_is_a_channel_with_no_registration_of_its_own(app, alice, bob):
    halls = app.channels("hall:")
    push(bob, {"type": "join", "listeners": ["hall:42"]})
    cursor = poll(bob).json["cursor"]
    push(alice, {"type": "join", "listeners": ["hall:42"]})
    push(alice, {"type": "message", "listeners": ["hall:42"], "text": "hi"})
    assert [p["type"] for p in received(bob, cursor)[0]] == ["join", "message"]
    assert set(halls["hall:42"].members()) == {"alice", "bob"}


def test_registering_a_name_or_prefix_again_returns_the_first_and_other_rules_raise(app):
    def members_only(environ, db, channel):
        return True
    halls, club = app.channels("hall:", may_join=members_only), app.channel("club", presence=False)
    assert app.channels("hall:", may_join=members_only) is halls
    assert app.channel("club", presence=False) is club
    for register in (lambda: app.channels("hall:"), lambda: app.channel("club")):
        with pytest.raises(ValueError):
            register()                  # would drop the first registration's rules


def test_each_channel_of_a_namespace_has_its_own_members(app, alice, bob):
    push(alice, {"type": "join", "listeners": ["room:1"]})
    push(bob, {"type": "join", "listeners": ["room:2"]})
    cursor = poll(bob).json["cursor"]
    push(alice, {"type": "message", "listeners": ["room:1"]})
    assert received(bob, cursor)[0] == []
    assert (set(app.store.members("room:1")), set(app.store.members("room:2"))) == ({"alice"}, {"bob"})


@pytest.mark.parametrize("name", ["hall:1", "room:", "room:" + "x" * 252])
def test_a_name_outside_every_namespace_and_listener_is_400_unknown_listener(app, alice, name):
    error_of(push(alice, {"type": "join", "listeners": [name]}, status=400), 400, "unknown_listener")
    assert app.store.head() == 0


def test_a_namespace_channel_name_may_be_256_characters(app, alice):
    name = "room:" + "x" * 251
    push(alice, {"type": "join", "listeners": [name]})
    assert set(app.store.members(name)) == {"alice"}


def test_a_namespace_outside_its_prefix_is_a_key_error(app):
    with pytest.raises(KeyError):
        app.channels("hall:")["room:1"]


@pytest.mark.parametrize("prefix", ["", "x" * 256, None])
def test_a_namespace_prefix_must_leave_room_for_a_name(app, prefix):
    with pytest.raises(ValueError):
        app.channels(prefix)


def test_the_longest_prefix_wins_in_overlapping_namespaces(app, alice):
    app.channels("room:vip:", may_join=lambda environ, db, channel: False)
    push(alice, {"type": "join", "listeners": ["room:lobby"]})
    error_of(push(alice, {"type": "join", "listeners": ["room:vip:1"]}, status=403), 403, "rejected")
    assert app.store.members("room:vip:1") == {}


def test_a_listener_or_a_channel_of_its_own_name_wins_over_a_namespace(app, alice, bob):
    app.listener("room:news")(lambda environ, package, db: ["bob"])
    app.channel("room:open")                           # no may_join: guests too
    guest = as_client(app, "guest1")
    cursor = poll(bob).json["cursor"]
    push(alice, {"type": "news", "listeners": ["room:news"]})      # a listener: no membership
    push(guest, {"type": "join", "listeners": ["room:open"]})
    assert [p["type"] for p in received(bob, cursor)[0]] == ["news"]
    assert set(app.channel("room:open").members()) == {"guest1"}


def test_may_join_refusing_is_403_rejected_with_its_message(app):
    guest = as_client(app, "guest1")
    answer = error_of(push(guest, {"type": "join", "listeners": ["room:42"]}, status=403), 403, "rejected")
    assert answer["message"] == "guests may not join room:42"


def test_a_client_refused_by_may_join_gets_nothing_of_the_room(app, alice):
    guest = as_client(app, "guest1")
    cursor = poll(guest).json["cursor"]
    push(alice, {"type": "join", "listeners": ["room:42"]})
    push(guest, {"type": "join", "listeners": ["room:42"]}, status=403)
    push(alice, {"type": "message", "listeners": ["room:42"], "text": "members only"})
    error_of(push(guest, {"type": "message", "listeners": ["room:42"]}, status=403), 403, "not_member")
    assert received(guest, cursor)[0] == []
    assert set(app.store.members("room:42")) == {"alice"}


def test_may_join_answering_false_is_403_rejected(store_url):
    app = make_app(store=store_url, poll_timeout=0.2)
    app.channels("club:", may_join=lambda environ, db, channel: False)
    error_of(push(as_client(app, "alice"), {"type": "join", "listeners": ["club:1"]}, status=403),
             403, "rejected")
    assert app.store.head() == 0


def driver_class_name(db):
    """The name of the driver's class ``db`` is (or is a subclass of): "Connection",
    or "NoneType"."""
    return next((kind.__name__ for kind in type(db).__mro__ if kind.__name__ == "Connection"),
                type(db).__name__)


def test_may_join_gets_the_environ_the_db_and_the_channel_and_runs_on_each_join(store_url):
    app = make_app(store=store_url, poll_timeout=0.2)
    seen = []
    app.channel("club", may_join=lambda environ, db, channel: seen.append(
        (environ["comet.id"], driver_class_name(db), channel)) or True)
    alice = as_client(app, "alice")
    push(alice, {"type": "join", "listeners": ["club"]})
    push(alice, {"type": "join", "listeners": ["club"]})           # again: asked again
    push(alice, {"type": "message", "listeners": ["club"]})        # only joins ask
    db = "NoneType" if store_url == "memory:" else "Connection"
    assert seen == [("alice", db, "club"), ("alice", db, "club")]


def test_may_join_refusing_one_channel_of_a_join_refuses_the_whole_package(app, alice):
    guest = as_client(app, "guest1")
    push(guest, {"type": "join", "listeners": ["room", "room:42"]}, status=403)
    assert app.channel("room").members() == {} and app.store.head() == 0


@pytest.mark.parametrize("kind", ["create", "update", "delete", "message", "leave"])
def test_a_non_member_of_a_namespace_channel_is_403_not_member(app, alice, bob, kind):
    push(bob, {"type": "join", "listeners": ["room:42"]})
    head = app.store.head()
    error_of(push(alice, {"type": kind, "listeners": ["room:42"]}, status=403), 403, "not_member")
    assert app.store.head() == head


@pytest.mark.parametrize("kind", ["create", "update", "delete"])
def test_the_shortcut_types_reach_every_member_of_a_namespace_channel(app, alice, bob, kind):
    push(alice, {"type": "join", "listeners": ["room:42"]})
    push(bob, {"type": "join", "listeners": ["room:42"]})
    cursors = {"alice": poll(alice).json["cursor"], "bob": poll(bob).json["cursor"]}
    push(alice, {"type": kind, "listeners": ["room:42"], "id": 7})
    for web, name in ((alice, "alice"), (bob, "bob")):
        assert [(p["type"], p["id"]) for p in received(web, cursors[name])[0]] == [(kind, 7)]


def test_a_namespace_without_presence_keeps_its_silent_members(store_url):
    app = make_app(store=store_url, presence_timeout=1.0, poll_timeout=0.05)
    documents = app.channels("doc:", presence=False)
    alice, bob = as_client(app, "alice"), as_client(app, "bob")
    push(bob, {"type": "join", "listeners": ["doc:1", "room:1"]})  # bob never polls
    push(alice, {"type": "join", "listeners": ["room:1"]})
    cursor = poll(alice).json["cursor"]

    def bob_left_room_1():
        nonlocal cursor
        packages, cursor = received(alice, cursor)
        return set(app.store.members("room:1")) == {"alice"}
    wait_until(bob_left_room_1, timeout=15)            # the sweep ran, with presence
    assert set(documents["doc:1"].members()) == {"bob"}


# --------------------------------------------------------------------------
# Identity, the client script, pass-through, stats
# --------------------------------------------------------------------------

def test_the_built_in_id_is_an_httponly_samesite_cookie_of_128_bits_or_more(store_url):
    web = webtest.TestApp(Comet(None, store=store_url))
    response = web.get("/comet/poll")
    cookie = response.headers["Set-Cookie"]
    value = cookie.split(";")[0].split("=", 1)[1]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie
    assert len(value) * 6 >= 128
    assert "Set-Cookie" not in web.get("/comet/poll").headers     # the browser sends it back


def test_the_cookie_is_secure_under_https(store_url):
    web = webtest.TestApp(Comet(None, store=store_url), extra_environ={"wsgi.url_scheme": "https"})
    assert "Secure" in web.get("/comet/poll").headers["Set-Cookie"]


def test_a_push_is_delivered_to_the_cookie_client_by_its_public_id(store_url):
    app = Comet(None, store=store_url, poll_timeout=0.1)
    browser = webtest.TestApp(app)
    cursor = browser.get("/comet/poll").json["cursor"]
    browser.post_json("/comet/push", {"type": "hello", "listeners": "nobody"})
    me = app.store.read("nobody", 0, 1)[1][0][2]
    my_id = json.loads(me)["sender"]                  # what others see of this client
    browser.post_json("/comet/push", {"type": "self", "listeners": my_id})
    assert [p["type"] for p in browser.get("/comet/poll", {"cursor": cursor}).json["packages"]] == ["self"]


def test_the_cookie_never_reaches_another_client(store_url):
    app = Comet(None, store=store_url, poll_timeout=0.1)
    alice, mallory = webtest.TestApp(app), webtest.TestApp(app)
    alice_cursor = alice.get("/comet/poll").json["cursor"]
    mallory_cursor = mallory.get("/comet/poll").json["cursor"]
    mallory.post_json("/comet/push", {"type": "probe", "listeners": "nobody"})
    mallory_id = json.loads(app.store.read("nobody", 0, 1)[1][0][2])["sender"]
    alice.post_json("/comet/push", {"type": "hi", "listeners": mallory_id})
    (package,) = mallory.get("/comet/poll", {"cursor": mallory_cursor}).json["packages"]
    app.push({"type": "secret", "listeners": package["sender"]})       # for alice only
    assert package["sender"] != alice.cookies["comet_sid"]
    thief = webtest.TestApp(app)
    thief.set_cookie("comet_sid", package["sender"])  # what mallory learned, used as a cookie
    assert thief.get("/comet/poll", {"cursor": alice_cursor}).json["packages"] == []
    assert [p["type"] for p in alice.get("/comet/poll", {"cursor": alice_cursor}).json["packages"]] == ["secret"]


def test_the_client_script_is_served_with_an_etag_and_304(alice):
    for path in ("/comet/comet.js", "/scripts/comet.js"):
        response = alice.get(path)
        assert response.content_type == "application/javascript"
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.body == CLIENT_SCRIPT
        assert alice.get(path, headers={"If-None-Match": response.headers["ETag"]}, status=304).body == b""


def test_script_path_none_disables_the_extra_path(store_url):
    web = webtest.TestApp(Comet(None, store=store_url, script_path=None))
    web.get("/scripts/comet.js", status=404)


def test_other_paths_pass_through_to_the_app_untouched(store_url):
    seen = []

    def inner(environ, start_response):
        seen.append((environ["PATH_INFO"], environ["REQUEST_METHOD"]))
        start_response("201 Created", [("X-App", "yes")])
        return [b"app"]
    web = webtest.TestApp(Comet(inner, store=store_url))
    response = web.post("/comets/poll", status=201)
    assert response.body == b"app" and response.headers["X-App"] == "yes"
    assert seen == [("/comets/poll", "POST")]


def test_with_no_app_other_paths_are_404(store_url):
    error_of(webtest.TestApp(Comet(None, store=store_url)).get("/", status=404), 404, "not_found")


def test_a_custom_prefix_moves_the_endpoints(store_url):
    web = webtest.TestApp(Comet(None, store=store_url, prefix="/rt/"))
    assert web.get("/rt/poll").json["reset"] is False
    web.get("/comet/poll", status=404)


def test_stats_count_and_measure(app, alice, bob):
    cursor = poll(bob).json["cursor"]
    push(alice, {"type": "x", "listeners": "bob"})
    push(alice, {"type": "x", "listeners": ["ghost"]}, status=400)
    received(bob, cursor)
    stats = app.stats()
    assert stats["accepted"] == 1 and stats["delivered"] == 1
    assert stats["errors"] == {"unknown_listener": 1}
    assert stats["parked"] == 0 and stats["clients"] == 0
    assert stats["head"] == app.store.head() and stats["store"] == app.store.url


@pytest.mark.parametrize("kind", ["mysql", "postgresql"])
def test_stats_hide_the_store_password(kind, request):
    server = request.getfixturevalue("mariadb" if kind == "mysql" else "postgres")
    url, password = server.with_password(server.create_database())
    app = make_app(store=url)                           # logged in with the password
    with ThreadedServer(app) as http:
        with urllib.request.urlopen(http.url + "/stats", timeout=10) as response:
            body = response.read()
    assert json.loads(body)["store"] == app.store.url and app.store.url.startswith(kind)
    assert password.encode() not in body


def test_importing_comet_loads_only_the_standard_library(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    code = ("import sys; sys.path.insert(0, %r); import comet; "
            "print(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names) - {'comet', '__main__'}))"
            % HERE)
    out = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_library_never_prints():
    with open(os.path.join(HERE, "comet.py")) as file:
        assert "print(" not in file.read()


# --------------------------------------------------------------------------
# A real threaded server: parking, wake-ups, concurrency, faults
# --------------------------------------------------------------------------

@pytest.fixture
def server(store_url):
    app = make_app(store=store_url, poll_timeout=5, rate=(10_000, 10_000),
                   address_rate=(10_000, 10_000))    # every client is on 127.0.0.1
    with ThreadedServer(app) as server:
        server.app = app
        yield server
    app.close()


def test_a_parked_poll_answers_within_250ms_of_a_push_to_it_at_best_of_five(server):
    alice = Client(server.url, "alice")
    seconds = []
    for n in range(5):                      # the fastest of five: a loaded machine slows some
        bob = Client(server.url, "bob")
        cursor = bob.poll()["cursor"]       # the head
        answered = {}
        thread = threading.Thread(target=lambda: answered.update(answer=bob.poll(cursor)))
        thread.start()
        wait_until(lambda: server.app.stats()["parked"] == 1)
        sent = time.monotonic()             # before the push: its commit wakes the poll
        status, _, body = alice.push({"type": "ping", "listeners": "bob", "n": n})
        thread.join(4)                      # well before poll_timeout (5 s): woken, not timed out
        seconds.append(time.monotonic() - sent)
        assert status == 200 and not thread.is_alive()
        assert [p["_stamp"] for p in answered["answer"]["packages"]] == body["accepted"]
    assert min(seconds) < 0.25, [round(s * 1000) for s in seconds]


def test_a_woken_poll_on_a_shared_store_is_answered_without_a_query(tmp_path, monkeypatch):
    app = make_app(store=f"sqlite:///{tmp_path}/comet.db", poll_timeout=5, tail_interval=0.02)
    reads = []
    real_read = app.store.read
    monkeypatch.setattr(app.store, "read", lambda *args: reads.append(args) or real_read(*args))
    with ThreadedServer(app) as server:
        bob, alice = Client(server.url, "bob"), Client(server.url, "alice")
        cursor = bob.poll()["cursor"]
        wait_until(lambda: app._window.horizon is not None)     # the first tail turn ran
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("answer", bob.poll(cursor)))
        thread.start()
        wait_until(lambda: app.stats()["parked"] == 1)
        alice.push({"type": "ping", "listeners": "bob"})
        thread.join(5)
    assert [p["type"] for p in result["answer"]["packages"]] == ["ping"]
    assert reads == []


def test_the_window_never_answers_past_a_gap():
    window = comet._Window(max_bytes=1 << 20)
    window.start(10)
    window.add([(12, 0, [("bob", '{"n":12}')])])           # 11 was committed elsewhere
    assert window.read("bob", 10, 500) is None              # ask the store instead
    assert window.read("carol", 10, 500) == (10, [])
    window.fill(12, [(11, 0, [("carol", '{"n":11}')]), (12, 0, [("bob", '{"n":12}')])])
    assert window.read("bob", 10, 500) == (12, [(12, 0, '{"n":12}')])
    assert window.read("carol", 10, 500) == (12, [(11, 0, '{"n":11}')])
    assert window.read("bob", 9, 500) is None               # before the window


def test_the_window_lets_the_oldest_go_past_its_size():
    one = comet._Window._DELIVERY + sys.getsizeof("1")     # a delivery of a one-byte body
    window = comet._Window(max_bytes=2 * one)
    window.start(0)
    window.add([(n, 0, [("bob", str(n))]) for n in (1, 2, 3)])
    assert window.base == 1 and window.read("bob", 0, 500) is None
    assert window.read("bob", 1, 500) == (3, [(2, 0, "2"), (3, 0, "3")])


def test_an_unrelated_push_does_not_wake_a_parked_poll(store_url):
    app = make_app(store=store_url, poll_timeout=1.0)
    with ThreadedServer(app) as server:
        bob, alice = Client(server.url, "bob"), Client(server.url, "alice")
        cursor = bob.poll()["cursor"]
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("answer", bob.poll(cursor)))
        started = time.monotonic()
        thread.start()
        wait_until(lambda: app.stats()["parked"] == 1)
        for _ in range(5):
            alice.push({"type": "other", "listeners": "carol"})
        thread.join(5)
        assert result["answer"]["packages"] == []
        assert time.monotonic() - started >= 1.0            # it waited for poll_timeout


def test_a_client_that_vanishes_mid_poll_loses_nothing(server):
    import socket
    bob, alice = Client(server.url, "bob"), Client(server.url, "alice")
    cursor = bob.poll()["cursor"]
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"GET /comet/poll?cursor={cursor} HTTP/1.1\r\nHost: x\r\nX-Client: bob\r\n\r\n".encode())
    wait_until(lambda: server.app.stats()["parked"] == 1)
    sock.close()                                           # the client is gone
    assert alice.push({"type": "after", "listeners": "bob"})[0] == 200
    wait_until(lambda: server.app.stats()["parked"] == 0)
    assert [p["type"] for p in bob.poll(cursor)["packages"]] == ["after"]


def test_many_pushers_and_pollers_get_each_package_once_in_one_order(server):
    clients = [f"c{n}" for n in range(20)]
    sent = {client: [] for client in clients}              # stamps addressed to each
    got = {client: [] for client in clients}
    end = {}                                               # the last package's stamp, once pushed
    errors = []                                            # what went wrong in any thread
    cursors = {client: Client(server.url, client).poll()["cursor"] for client in clients}

    def guarded(work):
        def run(*args):
            try:
                work(*args)
            except BaseException as error:                 # reported by the main thread
                errors.append(error)
        return run

    def pusher(n):
        me = Client(server.url, f"p{n}")
        for i in range(50):
            to = [clients[(n + i) % 20], clients[(n * 7 + i * 3) % 20]]
            status, _, body = me.push({"type": "m", "listeners": ["to"], "to": to, "n": n, "i": i})
            assert status == 200, (status, body)
            for recipient in set(to):
                sent[recipient].append(body["accepted"][0])

    def poller(client):
        me = Client(server.url, client)
        me.cursor = cursors[client]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            answer = me.poll(timeout=10)
            assert not answer["reset"], f"{client} was reset"
            got[client].extend(p["_stamp"] for p in answer["packages"])
            if end.get("stamp") in got[client]:
                return
        raise AssertionError(f"{client} never got the last package")
    pollers = [threading.Thread(target=guarded(poller), args=(c,)) for c in clients]
    pushers = [threading.Thread(target=guarded(pusher), args=(n,)) for n in range(20)]
    for thread in pollers + pushers:
        thread.start()
    for thread in pushers:
        thread.join(60)
    end["stamp"] = server.app.push({"type": "end", "listeners": ["to"], "to": clients})
    for thread in pollers:
        thread.join(70)
    assert errors == [] and not any(thread.is_alive() for thread in pollers + pushers)
    position = stamp_positions(server.app.store)
    for client in clients:
        stamps = got[client]
        assert len(stamps) == len(set(stamps)), f"{client} got a package twice"
        assert set(stamps) == set(sent[client]) | {end["stamp"]}, f"{client} lost a package"
        # One order, no skip: each client got exactly its positions, increasing.
        mine = [position[s] for s in stamps]
        assert mine == sorted(position[s] for s in sent[client] + [end["stamp"]])


def stamp_positions(store):
    """{stamp: position} read back from the store itself."""
    if isinstance(store, comet.MemoryStore):
        return {stamp: pos for pos, _, stamp, _ in store._log}
    rows = store._query("SELECT stamp, pos FROM comet_packages")
    return {comet._text(stamp): pos for stamp, pos in rows}     # MySQL: stamps as bytes


def test_kill_9_after_a_200_loses_nothing_on_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path}/comet.db"
    port = free_port()
    server = ServerProcess(url, port=port, poll_timeout=1).start()
    try:
        bob, alice = Client(server.url, "bob"), Client(server.url, "alice")
        cursor = bob.poll()["cursor"]
        status, _, body = alice.push({"type": "durable", "listeners": "bob"})
        assert status == 200
        server.kill()
        server = ServerProcess(url, port=port, poll_timeout=1).start()
        answer = Client(server.url, "bob").poll(cursor)
        assert [p["_stamp"] for p in answer["packages"]] == body["accepted"]
    finally:
        server.stop()


def test_python_demo_serves_the_page_and_the_script_on_a_fresh_python(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    port = free_port()
    demo = subprocess.Popen([str(venv / "bin" / "python"), "-s", os.path.join(HERE, "demo.py"),
                             "--port", str(port), "--db", str(tmp_path / "chat.db")],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def page():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    return response.read()
            except OSError:
                assert demo.poll() is None, "demo.py exited"
                return None
        assert b"/scripts/comet.js" in wait_until(page, timeout=15)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/scripts/comet.js", timeout=2) as response:
            assert response.read() == CLIENT_SCRIPT
    finally:
        demo.kill()
        demo.wait()
