"""The delivery core, piece by piece: the window, parking and waking, stamps,
and what a 200 promises on a durable store.

Most tests here drive ``Comet`` in this process (WebTest, or a threaded server
on 127.0.0.1); the kill -9 test runs the application in a child process.  The
stamp tests run on every store (MariaDB and PostgreSQL databases of their own).
"""

import contextlib
import http.client
import json
import math
import os
import select
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import webtest

import comet
from support import (HERE, ROOT, Client, Counted, ThreadedServer, free_port, fresh_store, make_app,
                     need_gevent, positions_in_store, wait_until)
from support import close_apps  # noqa: F401  (fixture)


@pytest.fixture(params=["memory", "sqlite", "mysql", "postgresql"])
def store_url(request, tmp_path):
    """A new, empty store of each kind."""
    return fresh_store(request.param, request, tmp_path)


def as_client(app, client_id):
    return webtest.TestApp(app, extra_environ={"HTTP_X_CLIENT": client_id})


def cursor_of(web):
    return web.get("/comet/poll").json["cursor"]


def stamps_after(web, cursor):
    """The stamps of every package the client gets after ``cursor``, page by page."""
    stamps = []
    for _ in range(100):
        answer = web.get("/comet/poll", {"cursor": cursor}).json
        assert answer["reset"] is False
        stamps += [package["_stamp"] for package in answer["packages"]]
        if not answer["packages"]:
            return stamps
        cursor = answer["cursor"]
    raise AssertionError("more pages than a test pushes")


# --------------------------------------------------------------------------
# The window: reads answered from memory
# --------------------------------------------------------------------------

def window_of(*deliveries, start=0, max_bytes=1 << 20):
    """A window started at ``start`` holding ``deliveries``, ``(position, [recipients])``,
    each body the text of its position."""
    window = comet._Window(max_bytes)
    window.start(start)
    window.add([(position, 1000 + position, [(r, str(position)) for r in recipients])
                for position, recipients in deliveries])
    return window


def test_the_window_answers_after_each_position_with_exactly_the_later_rows():
    window = window_of((1, ["bob"]), (2, ["carol"]), (3, ["bob", "carol"]), (4, ["bob"]))
    bob = [(1, 1001, "1"), (3, 1003, "3"), (4, 1004, "4")]

    for after in range(0, 5):
        assert window.read("bob", after, 500) == (4, [row for row in bob if row[0] > after])


def test_the_window_answers_at_most_limit_rows_the_oldest_first():
    window = window_of(*((n, ["bob"]) for n in range(1, 7)))

    assert window.read("bob", 0, 2) == (6, [(1, 1001, "1"), (2, 1002, "2")])
    assert window.read("bob", 2, 3) == (6, [(3, 1003, "3"), (4, 1004, "4"), (5, 1005, "5")])
    assert window.read("bob", 5, 3) == (6, [(6, 1006, "6")])
    assert window.read("bob", 0, 1) == (6, [(1, 1001, "1")])


def test_the_window_answers_a_recipient_with_nothing_in_it_empty_up_to_its_horizon():
    window = window_of((1, ["bob"]), (2, ["bob"]))

    assert window.read("carol", 0, 500) == (2, [])
    assert window.read("carol", 2, 500) == (2, [])


def test_the_window_does_not_answer_before_its_base_or_past_its_horizon():
    window = window_of((6, ["bob"]), (7, ["bob"]), start=5)

    assert window.read("bob", 4, 500) is None
    assert window.read("bob", 5, 500) == (7, [(6, 1006, "6"), (7, 1007, "7")])
    assert window.read("bob", 7, 500) == (7, [])
    assert window.read("bob", 8, 500) is None


def test_the_window_does_not_answer_before_it_started_or_after_it_stopped():
    window = comet._Window(1 << 20)
    assert window.read("bob", 0, 500) is None
    window.start(3)
    window.stop()

    assert window.read("bob", 3, 500) is None
    window.add([(4, 0, [("bob", "4")])])
    assert window.horizon is None and window.bytes == 0


def test_the_window_holds_a_commit_past_a_gap_until_the_gap_is_filled():
    window = window_of((1, ["bob"]))
    window.add([(3, 1003, [("bob", "3")])])         # 2 is another process's, not read yet

    assert window.horizon == 1 and window.read("bob", 1, 500) is None
    assert window.read("carol", 1, 500) == (1, [])  # nothing of carol's is past the gap
    window.add([(2, 1002, [("carol", "2")])])       # this process's own 2 fills it
    assert window.horizon == 3
    assert window.read("bob", 1, 500) == (3, [(3, 1003, "3")])
    assert window.read("carol", 0, 500) == (3, [(2, 1002, "2")])


def test_the_tail_fills_the_window_up_to_the_head_it_read():
    window = window_of((1, ["bob"]))
    window.add([(4, 1004, [("bob", "4")])])         # ahead of a gap of two
    window.fill(4, [(2, 1002, [("carol", "2")]), (3, 1003, [("bob", "3")]),
                    (4, 1004, [("bob", "4")])])

    assert window.horizon == 4 and window._ahead == {}
    assert window.read("bob", 1, 500) == (4, [(3, 1003, "3"), (4, 1004, "4")])
    window.fill(7, [])                              # three positions of nobody's here
    assert window.read("bob", 4, 500) == (7, [])


def test_a_commit_the_tail_read_first_is_kept_once():
    window = window_of()
    window.fill(2, [(1, 1001, [("bob", "1")]), (2, 1002, [("bob", "2")])])
    size = window.bytes

    window.add([(1, 1001, [("bob", "1")]), (2, 1002, [("bob", "2")])])     # on_commit, later

    assert window.read("bob", 0, 500) == (2, [(1, 1001, "1"), (2, 1002, "2")])
    assert window.bytes == size and window._ahead == {}


def test_the_window_keeps_a_later_commit_ahead_of_what_the_tail_read():
    window = window_of((1, ["bob"]))
    window.add([(4, 1004, [("bob", "4")])])
    window.fill(2, [(2, 1002, [("carol", "2")])])   # the tail read up to 2 only

    assert window.horizon == 2 and set(window._ahead) == {4}
    assert window.read("bob", 1, 500) is None


def test_the_window_refuses_a_clients_reads_only_while_a_delivery_of_its_is_past_a_gap():
    window = window_of((1, ["bob"]))
    window.add([(3, 1003, [("bob", "3"), ("dave", "3")])])     # 2 not tailed yet
    window.add([(5, 1005, [("carol", "5"), ("dave", "5")])])   # nor 4

    assert [window.read(c, 1, 500) for c in ("bob", "carol", "dave")] == [None] * 3
    assert window.read("erin", 1, 500) == (1, [])

    window.fill(3, [(2, 1002, [("erin", "2")]),     # the tail read up to 3, this process's
                    (3, 1003, [("bob", "3"), ("dave", "3")])])
    assert window.read("bob", 1, 500) == (3, [(3, 1003, "3")])
    assert window.read("carol", 1, 500) is None and window.read("dave", 1, 500) is None

    window.add([(4, 1004, [("erin", "4")])])        # this process's own 4 fills the last gap
    assert window.read("carol", 3, 500) == (5, [(5, 1005, "5")])
    assert window.read("dave", 1, 500) == (5, [(3, 1003, "3"), (5, 1005, "5")])

    window.add([(7, 1007, [("bob", "7")])])
    window.stop()
    window.start(7)                                 # what was ahead is forgotten with the rest
    assert window.read("bob", 7, 500) == (7, [])


def test_a_commit_added_while_the_tail_read_is_kept_once():
    window = window_of((1, ["bob"]))
    window.add([(2, 1002, [("bob", "2")])])         # this process's, after the tail read from 1

    window.fill(3, [(2, 1002, [("bob", "2")]), (3, 1003, [("bob", "3")])])

    assert window.read("bob", 1, 500) == (3, [(2, 1002, "2"), (3, 1003, "3")])


def test_the_window_lets_go_of_the_oldest_package_when_its_bytes_run_over():
    one = comet._Window._DELIVERY + sys.getsizeof("1")      # one delivery of a one-byte body
    window = window_of((1, ["bob"]), (2, ["bob"]), (3, ["bob"]), max_bytes=3 * one)
    assert window.base == 0 and window.bytes == 3 * one

    window.add([(4, 1004, [("bob", "4")])])

    assert window.base == 1 and window.bytes == 3 * one
    assert window.read("bob", 0, 500) is None
    assert window.read("bob", 1, 500) == (4, [(2, 1002, "2"), (3, 1003, "3"), (4, 1004, "4")])


def test_the_window_counts_each_delivery_and_each_body_once_when_letting_go():
    body = "x" * 1000
    size = sys.getsizeof(body) + 3 * comet._Window._DELIVERY   # one body, three recipients
    window = comet._Window(max_bytes=2 * size)
    window.start(0)
    window.add([(n, n, [(r, body) for r in ("a", "b", "c")]) for n in (1, 2)])
    assert window.bytes == 2 * size and window.base == 0

    window.add([(3, 3, [("a", "y")])])

    assert window.base == 1 and window.bytes == size + sys.getsizeof("y") + window._DELIVERY
    assert window.read("b", 1, 500) == (3, [(2, 2, body)])
    assert window.read("a", 1, 500) == (3, [(2, 2, body), (3, 3, "y")])


def test_the_window_forgets_packages_stored_before_a_time_and_no_later_one():
    window = window_of((1, ["bob"]), (2, ["carol"]), (3, ["bob"]))      # stored at 1001..1003

    window.forget(1002)

    assert window.base == 1
    assert window.read("bob", 1, 500) == (3, [(3, 1003, "3")])
    assert window.read("carol", 1, 500) == (3, [(2, 1002, "2")])


def test_a_recipient_whose_every_package_the_window_let_go_has_no_inbox_left():
    window = window_of((1, ["bob"]), (2, ["carol"]))

    window.forget(1002)

    assert "bob" not in window._inbox and window.read("bob", 1, 500) == (2, [])


def test_the_window_starts_before_the_first_request_is_served(tmp_path):
    """Until the window starts every poll is a query: a burst of polls at start-up
    (2,000 under one gevent worker) kept the first tail waiting for a connection
    while they queued, and some waited past the pool's 5 s (503)."""
    app = make_app(store=f"sqlite:///{tmp_path}/comet.db", tail_interval=30)
    try:
        reads = app.store.read = Counted(app.store.read)
        web = webtest.TestApp(app)
        cursor = web.get("/comet/poll", headers={"X-Client": "bob"}).json["cursor"]
        assert app._window.horizon is not None     # not a tail_interval later
        web.post_json("/comet/push", {"type": "x", "listeners": "bob"},
                      headers={"X-Client": "alice"})

        answer = web.get(f"/comet/poll?cursor={cursor}", headers={"X-Client": "bob"}).json

        assert [p["type"] for p in answer["packages"]] == ["x"]
        assert reads.calls == 0                 # answered from the window
    finally:
        app.close()


# --------------------------------------------------------------------------
# Parking and waking
# --------------------------------------------------------------------------

def test_a_push_wakes_the_recipients_parked_poll_long_before_its_timeout(store_url):
    app = make_app(store=store_url, poll_timeout=60)
    with ThreadedServer(app) as server:
        bob, alice = Client(server.url, "bob"), Client(server.url, "alice")
        cursor = bob.poll()["cursor"]
        if app._window is not None:
            wait_until(lambda: app._window.horizon is not None)     # the first tail turn ran
        answered = threading.Event()
        result = {}

        def park():
            result["answer"] = bob.poll(cursor, timeout=90)
            answered.set()
        threading.Thread(target=park, daemon=True).start()
        wait_until(lambda: app.stats()["parked"] == 1)

        status, _, body = alice.push({"type": "ping", "listeners": "bob"})

        assert status == 200
        assert answered.wait(20), "the parked poll was not woken by the push to it"
        assert [p["_stamp"] for p in result["answer"]["packages"]] == body["accepted"]


def test_a_push_past_another_processs_commit_not_tailed_yet_is_delivered_by_one_tail(
        tmp_path):
    """Woken at once, each recipient's poll read the store: a query each, 10,000 for
    a push to a channel of 10,000.  Now the push makes the tail run at once (its
    interval here is 30 s), and the tail's one read wakes them."""
    url = f"sqlite:///{tmp_path}/comet.db"
    here, there = make_app(store=url, tail_interval=30), make_app(store=url, tail_interval=30)
    try:
        with ThreadedServer(here) as server:
            bob, alice = Client(server.url, "bob"), Client(server.url, "alice")
            cursor = bob.poll()["cursor"]
            read, tail, a_read = here.store.read, here.store.tail, threading.Event()

            def read_and_tell(*args):
                a_read.set()
                return read(*args)
            reads = here.store.read = Counted(read_and_tell)

            def tail_after_any_read(after):   # a poll woken before the tail reads first
                a_read.wait(0.5)
                return tail(after)
            tails = here.store.tail = Counted(tail_after_any_read)
            answered, result = threading.Event(), {}

            def park():
                result["answer"] = bob.poll(cursor, timeout=60)
                answered.set()
            threading.Thread(target=park, daemon=True).start()
            wait_until(lambda: here.stats()["parked"] == 1)
            there.push({"type": "first", "listeners": "bob"})      # not tailed here yet
            status, _, _ = alice.push({"type": "second", "listeners": "bob"})

            assert status == 200
            assert answered.wait(20), "the poll was not answered before the tail's interval"
            assert [p["type"] for p in result["answer"]["packages"]] == ["first", "second"]
            assert reads.calls == 0 and tails.calls >= 1       # from the window, one tail
    finally:
        here.close()
        there.close()


def test_a_poll_with_a_timeout_of_0_answers_at_once_with_what_there_is(store_url):
    app = make_app(store=store_url, poll_timeout=0)
    bob = as_client(app, "bob")
    cursor = cursor_of(bob)

    empty = bob.get("/comet/poll", {"cursor": cursor}).json
    app.push({"type": "x", "listeners": "bob"})
    full = bob.get("/comet/poll", {"cursor": cursor}).json

    assert (empty["packages"], empty["cursor"]) == ([], cursor)
    assert [p["type"] for p in full["packages"]] == ["x"]


def test_a_push_committed_between_a_polls_read_and_its_parking_wakes_it(store_url):
    app = make_app(store=store_url, poll_timeout=5)
    bob = as_client(app, "bob")
    cursor = cursor_of(bob)
    read, pushed = app._read, []

    def read_then_push(client, after, *turn):   # the push commits (and wakes) before bob parks
        rows = read(client, after, *turn)
        if not pushed:
            pushed.append(app.push({"type": "x", "listeners": "bob"}))
        return rows
    app._read = read_then_push

    answer = bob.get("/comet/poll", {"cursor": cursor}).json

    assert [p["_stamp"] for p in answer["packages"]] == pushed     # not the timeout's nothing


def test_a_member_whose_polls_are_answered_at_once_stays_while_a_silent_one_is_dropped(
        store_url):
    app = make_app(store=store_url, presence_timeout=0.3, poll_timeout=0.05)
    alice, bob = as_client(app, "alice"), as_client(app, "bob")
    for member in (alice, bob):
        member.post_json("/comet/push", {"type": "join", "listeners": ["room"]})

    def bob_dropped():
        alice.get("/comet/poll")            # no cursor: answered at once, never parked
        return "bob" not in app.store.members("room")
    wait_until(bob_dropped, timeout=10, interval=0.02)

    assert set(app.store.members("room")) == {"alice"}


def test_a_wake_reaches_only_polls_whose_cursor_is_before_the_position():
    parking = comet._Parking(per_client=8, per_address=8, total=8)
    early = parking.park("bob", None, 4)
    late = parking.park("bob", None, 5)
    other = parking.park("carol", None, 0)

    parking.wake({"bob": 5})

    assert early.wait(0) is True
    assert late.wait(0) is False and other.wait(0) is False


def park_each(app, clients, cursor):
    """One thread per client, each with a poll parked after ``cursor``; returns the
    threads and a dict their answers go into."""
    answers = {}

    def park(client):
        answers[client] = as_client(app, client).get("/comet/poll", {"cursor": cursor}).json
    threads = [threading.Thread(target=park, args=(client,), daemon=True) for client in clients]
    for thread in threads:
        thread.start()
    wait_until(lambda: app.stats()["parked"] == len(clients))
    return threads, answers


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_polls_woken_together_in_threads_answer_one_at_a_time(kind, request, tmp_path):
    app = make_app(store=fresh_store(kind, request, tmp_path), poll_timeout=30)
    clients = [f"c{n}" for n in range(8)]
    cursor = cursor_of(as_client(app, "c0"))
    if app._window is not None:
        wait_until(lambda: app._window.horizon is not None)     # answered from the window
    threads, answers = park_each(app, clients, cursor)
    answer, together, met = app._answer, threading.Barrier(2), []

    def answer_beside_another(*args, **kwargs):     # two answers made at once meet here
        with contextlib.suppress(threading.BrokenBarrierError):
            together.wait(timeout=0.2)      # alone: broken, and every later one passes at once
            met.append(True)
        return answer(*args, **kwargs)
    app._answer = answer_beside_another

    app.push({"type": "all", "listeners": ["to"], "to": clients})
    for thread in threads:
        thread.join(20)

    assert sorted(c for c, a in answers.items() if [p["type"] for p in a["packages"]] == ["all"]) \
        == clients
    assert met == []


def test_polls_woken_in_threads_are_woken_one_by_one_each_once_the_one_before_answered(
        monkeypatch):
    """A relay: the waker wakes the first poll, each woken poll the next once its
    answer is made."""
    app = make_app(poll_timeout=30)
    clients = [f"c{n}" for n in range(6)]
    threads, answers = park_each(app, clients, cursor_of(as_client(app, "c0")))
    events, wake, answer = [], comet._Waiter.wake, app._answer

    def note_and_wake(waiter):
        events.append("woke")
        return wake(waiter)
    monkeypatch.setattr(comet._Waiter, "wake", note_and_wake)

    def note_and_answer(*args, **kwargs):
        events.append("answered")
        return answer(*args, **kwargs)
    app._answer = note_and_answer

    app.push({"type": "all", "listeners": ["to"], "to": clients})
    for thread in threads:
        thread.join(20)

    assert events == ["woke", "answered"] * 6
    assert {c: [p["type"] for p in a["packages"]] for c, a in answers.items()} == \
        {c: ["all"] for c in clients}


def test_a_relay_passes_over_polls_gone_and_goes_on_from_a_poll_leaving_without_its_turn():
    parking = comet._Parking(per_client=5, per_address=100, total=100)
    a, b, c, d = (parking.park(client, None, 0) for client in "abcd")

    parking.wake(dict.fromkeys("abcd", 1))
    assert [w.wait(0) for w in (a, b, c, d)] == [True, False, False, False]

    parking.unpark(b)                   # b left (its poll timed out) before its turn
    parking.hand_on(a)
    parking.hand_on(a)                  # once however often it is called
    assert [w.wait(0) for w in (b, c, d)] == [False, True, False]

    parking.unpark(c)                   # c's answer failed: it leaves holding the relay
    assert d.wait(0)
    parking.hand_on(d)
    parking.wake({"a": 2})              # the relay was let go: a new wake-up starts one
    assert a.wait(0)


def test_a_woken_poll_that_must_query_the_store_holds_up_no_other(tmp_path):
    app = make_app(store=f"sqlite:///{tmp_path}/c.db", poll_timeout=30, tail_interval=3600)
    cursor = cursor_of(as_client(app, "bob"))
    app._window = None                  # every read queries the store
    threads, answers = park_each(app, ["bob", "carol"], cursor)
    both_inside, read = threading.Barrier(2, timeout=10), app.store.read

    def read_together(recipient, after, limit):     # each waits until the other reads too
        both_inside.wait()
        return read(recipient, after, limit)
    app.store.read = read_together

    app.push({"type": "both", "listeners": ["to"], "to": ["bob", "carol"]})
    for thread in threads:
        thread.join(20)

    assert {c: [p["type"] for p in a["packages"]] for c, a in answers.items()} == \
        {"bob": ["both"], "carol": ["both"]}


def test_a_poll_woken_for_nothing_of_its_own_parks_again_and_lets_the_next_wake_through():
    app = make_app(poll_timeout=30)
    threads, answers = park_each(app, ["bob"], cursor_of(as_client(app, "bob")))

    app._parking.wake({"bob": math.inf})        # as the tail's first turn wakes everyone
    wait_until(lambda: app.stats()["parked"] == 1 and app._parking.wakes == 1)
    pusher = threading.Thread(target=app.push, args=({"type": "x", "listeners": "bob"},),
                              daemon=True)
    pusher.start()
    pusher.join(10)
    threads[0].join(10)

    assert not pusher.is_alive(), "the push's wake-up waited for a turn never ended"
    assert [p["type"] for p in answers["bob"]["packages"]] == ["x"]


def test_green_threads_are_woken_all_at_once_and_real_threads_by_a_relay_and_linger():
    script = ("import sys; sys.path.insert(0, {root!r}); {patch}import comet;"
              " app = comet.Comet(); app._pushing = 1;"       # a push being accepted
              " print(comet._Parking(1, 1, 1)._relay is None, app._lingers())")
    found = [subprocess.run([sys.executable, "-c", script.format(root=str(ROOT), patch=patch)],
                            capture_output=True, text=True, timeout=60).stdout.strip()
             for patch in ("from gevent import monkey; monkey.patch_all(); ", "")]

    assert found == ["True False", "False True"]


# --------------------------------------------------------------------------
# Lingering: a poll with packages waits for a push being accepted
# --------------------------------------------------------------------------

def bob_with_a_package(linger):
    """An app whose polls linger up to ``linger`` s, and bob with the package
    "first" to answer after ``cursor``."""
    app = make_app(poll_timeout=30)
    app.linger = linger
    bob = as_client(app, "bob")
    cursor = cursor_of(bob)
    app.push({"type": "first", "listeners": "bob"})
    return app, bob, cursor


def held_push(app, package, pusher="alice", refused=False):
    """``package`` pushed over HTTP in a thread, held in its ``on_submit`` until
    released (then ``refused``: rejected, no commit and no wake-up); returns the
    release Event and the thread, once the push is inside."""
    inside, release = threading.Event(), threading.Event()

    def hold(package, private, db, environ):
        inside.set()
        release.wait(20)
        if refused:
            raise comet.Reject("not this one")
    app.action(package["type"]).on_submit(hold)
    thread = threading.Thread(target=as_client(app, pusher).post_json,
                              args=("/comet/push", package),
                              kwargs={"status": 403 if refused else 200}, daemon=True)
    thread.start()
    assert inside.wait(10)
    return release, thread


def poll_in_thread(web, cursor):
    answer = {}
    thread = threading.Thread(
        target=lambda: answer.update(web.get("/comet/poll", {"cursor": cursor}).json),
        daemon=True)
    thread.start()
    return thread, answer


def test_a_poll_with_a_package_to_answer_waits_for_the_push_being_accepted_and_answers_both():
    app, bob, cursor = bob_with_a_package(linger=30)
    release, pusher = held_push(app, {"type": "second", "listeners": "bob"})

    poller, answer = poll_in_thread(bob, cursor)
    wait_until(lambda: app.stats()["parked"] == 1)  # "first" to answer, and it waits
    release.set()
    pusher.join(10)
    poller.join(10)

    assert [p["type"] for p in answer["packages"]] == ["first", "second"]
    assert app._pushing == 0 and not app._lingering


def test_a_poll_lingering_for_a_push_not_for_it_answers_once_that_push_is_over():
    app, bob, cursor = bob_with_a_package(linger=30)
    release, pusher = held_push(app, {"type": "other", "listeners": "carol"})

    poller, answer = poll_in_thread(bob, cursor)
    wait_until(lambda: app.stats()["parked"] == 1)
    release.set()
    poller.join(10)

    assert not poller.is_alive(), "the poll waited on after the push it lingered for"
    assert [p["type"] for p in answer["packages"]] == ["first"]


def test_a_poll_does_not_linger_for_a_push_over_before_it_parked(monkeypatch):
    app, bob, cursor = bob_with_a_package(linger=30)
    waits = []
    wait = comet._Waiter.wait
    monkeypatch.setattr(comet._Waiter, "wait",
                        lambda waiter, timeout: waits.append(timeout) or wait(waiter, timeout))
    release, pusher = held_push(app, {"type": "other", "listeners": "carol"}, refused=True)
    park = app._parking.park

    def park_once_the_push_is_over(*args):
        release.set()
        pusher.join(10)
        return park(*args)
    app._parking.park = park_once_the_push_is_over

    poller, answer = poll_in_thread(bob, cursor)
    poller.join(10)

    assert not poller.is_alive(), "the poll waited for a push that was over"
    assert [p["type"] for p in answer["packages"]] == ["first"]
    assert waits == [], "a poll with a package waited, for nothing in flight"


def test_a_poll_whose_linger_ran_out_answers_and_is_not_kept_for_the_push():
    app, bob, cursor = bob_with_a_package(linger=0.05)
    release, pusher = held_push(app, {"type": "other", "listeners": "carol"})

    began = time.monotonic()
    poller, answer = poll_in_thread(bob, cursor)
    poller.join(10)
    assert time.monotonic() - began >= 0.04, "the poll did not wait for the push"
    lingering = set(app._lingering)
    release.set()
    pusher.join(10)

    assert [p["type"] for p in answer["packages"]] == ["first"]
    assert lingering == set()


def test_a_poll_waits_for_no_push_once_every_push_is_over_however_it_ended():
    app = make_app(poll_timeout=30)
    app.linger = 30
    alice, bob = as_client(app, "alice"), as_client(app, "bob")
    cursor = cursor_of(bob)

    @app.action("broken").on_submit
    def broken(package, private, db, environ):
        raise ValueError("a hook that fails")

    alice.post_json("/comet/push", {"type": "first", "listeners": "bob"})
    for package, status in [({"type": "x", "listeners": ["nobody"]}, 400),    # unknown
                            ({"type": "broken", "listeners": "bob"}, 500),    # a hook raised
                            ([{"type": "ok", "listeners": "bob"}, {}], 400)]:   # half accepted
        alice.post_json("/comet/push", package, status=status)
    assert app._pushing == 0

    poller, answer = poll_in_thread(bob, cursor)
    poller.join(10)

    assert not poller.is_alive(), "a poll with packages waited for a push long over"
    assert [p["type"] for p in answer["packages"]] == ["first", "ok"]
    assert app.stats()["parked"] == 0


# A busy threaded server: a poll with packages and no push in flight waits for its
# next wake-up (``linger_busy``) once a wake-up of many polls came lately.

CROWD = [f"c{i}" for i in range(comet._GATHER_POLLS)]     # a wake-up of this many: busy


def busy_bob(monkeypatch, linger_busy):
    """``bob_with_a_package`` on a server made busy by a push to ``CROWD``, busy
    for 30 s (not 0.1 s: a slow test machine keeps it so)."""
    monkeypatch.setattr(comet, "_GATHER_SPAN", 30)
    app, bob, cursor = bob_with_a_package(linger=30)
    app.linger_busy = linger_busy
    app.push({"type": "crowd", "listeners": ["to"], "to": CROWD})
    return app, bob, cursor


def test_a_wake_up_of_many_polls_makes_a_threaded_server_busy_and_one_of_fewer_does_not(
        monkeypatch):
    monkeypatch.setattr(comet, "_GATHER_SPAN", 30)
    app = make_app()
    app.push({"type": "few", "listeners": ["to"], "to": CROWD[1:]})
    assert not app._busy()
    app.push({"type": "crowd", "listeners": ["to"], "to": CROWD})
    assert app._busy() and app._lingers()
    app.linger_busy = 0
    assert not app._busy()


def test_on_a_busy_server_a_poll_with_a_package_waits_for_its_next_wake_up_and_answers_both(
        monkeypatch):
    app, bob, cursor = busy_bob(monkeypatch, linger_busy=30)

    poller, answer = poll_in_thread(bob, cursor)
    wait_until(lambda: app.stats()["parked"] == 1)  # "first" to answer, and it waits
    app.push({"type": "other", "listeners": "carol"})   # a wake-up not of bob's
    assert poller.is_alive()
    app.push({"type": "second", "listeners": "bob"})
    poller.join(10)

    assert [p["type"] for p in answer["packages"]] == ["first", "second"]
    assert app.stats()["parked"] == 0 and not app._lingering


def test_on_a_busy_server_a_poll_whose_wait_ran_out_answers_what_it_has(monkeypatch):
    app, bob, cursor = busy_bob(monkeypatch, linger_busy=0.05)

    poller, answer = poll_in_thread(bob, cursor)
    poller.join(10)

    assert [p["type"] for p in answer["packages"]] == ["first"]
    assert app.stats()["parked"] == 0


def test_on_a_busy_server_with_linger_0_a_poll_waits_for_its_next_wake_up_not_for_the_push(
        monkeypatch):
    app, bob, cursor = busy_bob(monkeypatch, linger_busy=30)
    app.linger = 0
    release, pusher = held_push(app, {"type": "other", "listeners": "carol"})

    poller, answer = poll_in_thread(bob, cursor)
    wait_until(lambda: app.stats()["parked"] == 1)
    release.set()
    pusher.join(10)
    assert poller.is_alive(), "the poll answered once the push it did not wait for was over"
    app.push({"type": "second", "listeners": "bob"})
    poller.join(10)

    assert [p["type"] for p in answer["packages"]] == ["first", "second"]
    assert not app._lingering


@pytest.mark.parametrize("quiet", ["linger_busy 0", "busy long ago"])
def test_a_poll_with_a_package_answers_at_once_unless_the_server_is_busy(monkeypatch, quiet):
    app, bob, cursor = busy_bob(monkeypatch, linger_busy=30)
    if quiet == "linger_busy 0":
        app.linger_busy = 0
    else:
        app._gathered_at -= 31

    poller, answer = poll_in_thread(bob, cursor)
    poller.join(10)

    assert not poller.is_alive(), "a poll with packages waited on a server not busy"
    assert [p["type"] for p in answer["packages"]] == ["first"]


GREEN_POLLS = """
from gevent import monkey; monkey.patch_all()
import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]
import json, gevent, webtest
from support import make_app
app = make_app(store=sys.argv[3], poll_timeout=30)
web = {c: webtest.TestApp(app, extra_environ={"HTTP_X_CLIENT": c}) for c in ["pub", *"abcdef"]}
cursor = web["a"].get("/comet/poll").json["cursor"]
if app._window is not None:
    app._tail()                                 # answered from the window from now on
got = {c: [] for c in "abcdef"}

def listen(client, want, cursor=cursor):
    while len(got[client]) < want:
        answer = web[client].get("/comet/poll", {"cursor": cursor}).json
        got[client] += [p["n"] for p in answer["packages"]]
        cursor = answer["cursor"]

def until_parked(n):
    while app.stats()["parked"] < n:
        gevent.sleep(0)

listeners = [gevent.spawn(listen, c, 20 if c in "ace" else 33) for c in "abcdef"]
until_parked(6)
kinds = {type(w).__name__ for ws in app._parking._waiters.values() for w in ws}
# Woken for nothing of their own: each reads once and waits again, on the same waiter.
reads, read = [], app._read
app._read = lambda *args: reads.append(args[0]) or read(*args)
app._parking.wake(dict.fromkeys("abcdef", float("inf")))
for _ in range(50):
    gevent.sleep(0)
app._read = read
for n in range(20):                             # bursts: several pushes before any poll runs
    web["pub"].post_json("/comet/push", {"type": "m", "n": n, "listeners": ["to"],
                                         "to": list("abcdef") if n % 3 else list("ace")})
    if n % 4 == 3:
        gevent.sleep(0)
for n in range(20, 40):
    web["pub"].post_json("/comet/push", {"type": "m", "n": n, "listeners": ["to"],
                                         "to": list("bdf")})
gevent.joinall(listeners, timeout=20)
print(json.dumps({"kinds": sorted(kinds), "lock": type(app._parking._lock).__name__,
                  "reads": sorted(reads), "got": got}))
"""


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_green_polls_woken_in_bursts_get_each_package_once_in_order(kind, tmp_path):
    """Under gevent a parked poll waits on an Event, the short sections take the
    compiled lock, and a waker skips a poll it finds woken already: each poll still
    gets every package of its own once, in order, after a wake-up for nothing."""
    need_gevent()
    store = "memory:" if kind == "memory" else f"sqlite:///{tmp_path}/c.db"
    out = subprocess.run([sys.executable, "-c", GREEN_POLLS, str(ROOT), str(HERE), store],
                         capture_output=True, text=True, timeout=90)

    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    everyone = [n for n in range(20) if n % 3]
    assert found["kinds"] == ["_GeventWaiter"] and found["lock"] == "RLock"
    assert found["reads"] == list("abcdef")
    assert found["got"] == {c: list(range(20)) if c in "ace" else everyone + list(range(20, 40))
                            for c in "abcdef"}


GEVENT_TIMEOUTS = """
from gevent import monkey; monkey.patch_all()
import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]
import json, time, gevent, webtest
from support import make_app
app = make_app(store="memory:", poll_timeout=0.3)
web = {c: webtest.TestApp(app, extra_environ={"HTTP_X_CLIENT": c}) for c in ["a", "pub"]}
cursor = web["a"].get("/comet/poll").json["cursor"]
web["a"].get("/comet/poll", {"cursor": cursor})     # the housekeeping greenlets start
get_hub, timers = gevent.get_hub, []

class Loop:                                         # the timers comet's waiters make
    def timer(self, *args):
        timers.append(get_hub().loop.timer(*args))
        return timers[-1]

    def __getattr__(self, name):                    # the rest is the real loop's
        return getattr(get_hub().loop, name)

hub = type("Hub", (), {"loop": Loop(), "thread_ident": get_hub().thread_ident})
gevent.get_hub = lambda: hub
started = time.monotonic()
timed_out = web["a"].get("/comet/poll", {"cursor": cursor}).json
waited = time.monotonic() - started
poll = gevent.spawn(lambda: web["a"].get("/comet/poll", {"cursor": cursor}).json)
while app.stats()["parked"] < 1:
    gevent.sleep(0)
web["pub"].post_json("/comet/push", {"type": "m", "listeners": ["to"], "to": ["a"]})
woken = poll.get(timeout=5)
try:
    with gevent.Timeout(0.05):                      # the caller's own timeout cuts a wait short
        web["a"].get("/comet/poll", {"cursor": woken["cursor"]})
    interrupted = False
except gevent.Timeout:
    interrupted = True
gevent.get_hub = get_hub
print(json.dumps({"timed_out": timed_out["packages"], "waited": waited,
                  "woken": [p["type"] for p in woken["packages"]], "interrupted": interrupted,
                  "timers": len(timers), "active": sum(t.active for t in timers),
                  "parked": app.stats()["parked"]}))
"""


def test_a_green_polls_timeout_is_a_timer_of_gevents_loop_that_never_outlives_its_wait():
    """A parked poll's timeout is a timer of gevent's loop, not a ``gevent.Timeout``:
    the poll is answered empty when it fires, and a wake-up, or a timeout of the
    caller's own that cuts the wait short, stops it."""
    need_gevent()
    out = subprocess.run([sys.executable, "-c", GEVENT_TIMEOUTS, str(ROOT), str(HERE)],
                         capture_output=True, text=True, timeout=60)

    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found["timed_out"] == [] and 0.29 <= found["waited"] < 3
    assert found["woken"] == ["m"] and found["interrupted"]
    assert found["timers"] == 3 and found["active"] == 0 and found["parked"] == 0


GEVENT_WAKE = """
from gevent import monkey; monkey.patch_all()
import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]
import json, gevent, webtest
from support import make_app
app = make_app(store="memory:", poll_timeout=30)     # no tail to wake a poll as well
web = {c: webtest.TestApp(app, extra_environ={"HTTP_X_CLIENT": c}) for c in ["a", "pub"]}
cursor = web["a"].get("/comet/poll").json["cursor"]
poll = gevent.spawn(lambda: web["a"].get("/comet/poll", {"cursor": cursor}).json)
while app.stats()["parked"] < 1:
    gevent.sleep(0)
waiter, = app._parking._waiters["a"]
web["pub"].post_json("/comet/push", {"type": "m", "listeners": ["to"], "to": ["a"]})
answered_first = not waiter._signal.is_set()        # the push is answered, nobody woken yet
woken = poll.get(timeout=5)                         # this greenlet waits: the wake-up runs
pool = gevent.get_hub().threadpool                  # a real thread, with no hub of its own
poll = gevent.spawn(lambda: web["a"].get("/comet/poll", {"cursor": woken["cursor"]}).json)
while app.stats()["parked"] < 1:
    gevent.sleep(0)
pool.spawn(app.push, {"type": "n", "listeners": ["to"], "to": ["a"]}).get(timeout=5)
from_thread = poll.get(timeout=5)
print(json.dumps({"answered_first": answered_first,
                  "woken": [p["type"] for p in woken["packages"]],
                  "from_thread": [p["type"] for p in from_thread["packages"]]}))
"""


def test_under_gevent_a_push_is_answered_before_it_wakes_the_polls():
    """The recipients' polls are woken from gevent's loop once the pushing greenlet
    waits, after its answer; a push from a real thread (which has no loop running)
    wakes them itself."""
    need_gevent()
    out = subprocess.run([sys.executable, "-c", GEVENT_WAKE, str(ROOT), str(HERE)],
                         capture_output=True, text=True, timeout=60)

    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found == {"answered_first": True, "woken": ["m"], "from_thread": ["n"]}


GATHER_PRELUDE = """
from gevent import monkey; monkey.patch_all()
import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]
import json, logging, threading, gevent, webtest, comet
from support import make_app
comet._GATHER_SPAN = 10.0                           # "soon after": whatever this machine's pace
app = make_app(store="memory:", poll_timeout=30)
others = ["c%02d" % i for i in range(comet._GATHER_POLLS)]
web = {c: webtest.TestApp(app, extra_environ={"HTTP_X_CLIENT": c})
       for c in others + ["extra", "late", "pub"]}
cursors = {c: web[c].get("/comet/poll").json["cursor"] for c in others + ["extra", "late"]}

def poll(client):
    return gevent.spawn(lambda: web[client].get("/comet/poll", {"cursor": cursors[client]}).json)

def park(clients):
    polls = {c: poll(c) for c in clients}
    while app.stats()["parked"] < len(polls):
        gevent.sleep(0)
    return polls

def answered(polls):
    answers = {c: p.get(timeout=10) for c, p in polls.items()}
    cursors.update({c: a["cursor"] for c, a in answers.items()})
    return {c: " ".join(p["type"] for p in a["packages"]) for c, a in answers.items()}
"""

GEVENT_GATHER = GATHER_PRELUDE + """
app.gather = float(sys.argv[3])
logged = []
handler = logging.Handler()
handler.emit = lambda record: logged.append(record.getMessage())
logging.getLogger("comet").addHandler(handler)

def push(kind, to=others):
    web["pub"].post_json("/comet/push", {"type": kind, "listeners": ["to"], "to": to})
    gathering.append(app._gathering is not None)
    gevent.sleep(0.01)                              # the loop runs: a wake-up not gathered is done

found, gathering = {}, []
polls = park(others)
push("first")                                       # the first wake-up of many: at once
found["first"] = sorted(set(answered(polls).values()))
push("own", ["late"])                               # for late alone: a few, at once
polls = park(others + ["extra"])
push("second-a")
push("second-b", others + ["extra"])                # extra: woken by what joined only
late = poll("late")                                 # has "own" while pushes are gathered
gevent.sleep(0.01)
found["late_waited"] = not late.ready()
polls["late"] = late
second = answered(polls)
found["second"] = sorted(set(second[c] for c in others))
found["extra"], found["late"] = second["extra"], second["late"]
push("few", others[:3])                             # a wake-up of a few polls: never gathered
found.update(gathering=list(gathering), parked=app.stats()["parked"])
cursors.update({c: web[c].get("/comet/poll").json["cursor"] for c in others})   # the head
polls = park(others)                                # a wake-up that fails: logged, and over
app._wake = lambda appended: 1 / 0
push("broken")
gevent.sleep(float(sys.argv[3]) + 0.05)
found.update(logged=logged, over=app._gathering is None)
print(json.dumps(found))                            # (polls parked still: the process ends)
"""


@pytest.mark.parametrize("gather", [0.3, 0])
def test_under_gevent_a_wake_up_of_many_polls_soon_after_another_gathers_the_pushes_after_it(
        gather):
    """Under gevent a wake-up of many polls that comes soon after another waits
    ``comet.gather`` seconds, the pushes meanwhile join it (their recipients are
    woken with its own), and a poll that finds packages meanwhile waits for it
    too: each answer carries them all.  The first wake-up, one of a few polls,
    and any with ``gather`` 0 wake at once."""
    need_gevent()
    out = subprocess.run([sys.executable, "-c", GEVENT_GATHER, str(ROOT), str(HERE),
                          str(gather)], capture_output=True, text=True, timeout=60)

    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found["first"] == ["first"] and found["parked"] == 0
    assert found["extra"] == "second-b" and found["late"] == "own"
    if gather:
        assert found["gathering"] == [False, False, True, True, False]
        assert found["second"] == ["second-a second-b"]
        assert found["late_waited"]
        assert found["logged"] == ["comet: waking polls failed"] and found["over"]
    else:
        assert found["gathering"] == [False] * 5
        assert found["second"] == ["second-a"]
        assert not found["late_waited"]


GEVENT_GATHER_HELD = GATHER_PRELUDE + """
app.gather, app.linger = 0.02, float(sys.argv[3])
release = threading.Event()                         # gevent's, as everything here
app.action("held").on_submit(lambda package, private, db, environ: release.wait(10))

def push(kind):
    return web["pub"].post_json("/comet/push", {"type": kind, "listeners": ["to"], "to": others})

polls = park(others)
push("first")                                       # the first wake-up: at once
answered(polls)
polls = park(others)
push("gathered")
held = gevent.spawn(push, "held")                   # being accepted: waits in on_submit
gevent.sleep(0.3)                                   # the gathering's 0.02 s, many times over
parked = app.stats()["parked"]
release.set()
held.get(timeout=10)
print(json.dumps({"parked_while_held": parked,
                  "answers": sorted(set(answered(polls).values())),
                  "gathering": app._gathering is not None}))
"""


@pytest.mark.parametrize("linger", [5.0, 0.1])
def test_under_gevent_a_gathering_wake_up_waits_for_pushes_being_accepted_up_to_linger(linger):
    """While a push is being accepted (a database round trip, a hook), a gathering
    wake-up waits ``gather`` seconds more, again and again, so that it joins, until
    ``linger`` seconds have passed since the gathering began."""
    need_gevent()
    out = subprocess.run([sys.executable, "-c", GEVENT_GATHER_HELD, str(ROOT), str(HERE),
                          str(linger)], capture_output=True, text=True, timeout=60)

    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    if linger > 1:
        assert found == {"parked_while_held": comet._GATHER_POLLS,
                         "answers": ["gathered held"], "gathering": False}
    else:                                           # 0.1 s passed: woken without it
        assert found["parked_while_held"] == 0 and found["answers"] == ["gathered"]


def test_a_short_section_keeps_out_a_real_thread_under_gevent():
    """The lock of the window, the parking and the counters: no lock between green
    threads, a lock against a real one (gevent's thread pool)."""
    need_gevent()
    script = ("from gevent import monkey; monkey.patch_all()\n"
              "import sys; sys.path.insert(0, sys.argv[1])\n"
              "import gevent, comet\n"
              "lock = comet._section_lock()\n"
              "with lock:\n"
              "    green = gevent.spawn(lambda: lock.acquire(timeout=1)"
              " and lock.release() is None)\n"
              "    real = gevent.get_hub().threadpool.spawn(lock.acquire, True, 0.2)\n"
              "    print(green.get(), real.get())\n"
              "print(gevent.get_hub().threadpool.spawn(lock.acquire, True, 0.2).get())\n")
    out = subprocess.run([sys.executable, "-c", script, str(ROOT)], capture_output=True,
                         text=True, timeout=60)

    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False", "True"]


GEVENT_PUSH = """
from gevent import monkey; monkey.patch_all()
import sys; sys.path.insert(0, sys.argv[1])
import gevent, greenlet, comet
app = comet.Comet(None, store="sqlite:///" + sys.argv[2])
app.listener("room")(lambda environ, package, db: ["bob", "carol"])
app.push({"type": "m", "listeners": ["room"]})      # the housekeeping greenlets start
ready = [gevent.spawn(lambda: None) for _ in range(10)]
pusher, switches = greenlet.getcurrent(), []
greenlet.settrace(lambda event, args: switches.append(event) if args[0] is pusher else None)
for n in range(5):
    app.push({"type": "m", "listeners": ["room"]})
greenlet.settrace(None)
print(len(switches), sum(not each.dead for each in ready))
"""


def test_under_gevent_a_push_on_sqlite_lets_no_other_greenlet_run(tmp_path):
    """Its statements never wait, and nor may it: each greenlet let run first (the
    polls it has just woken among them) would make its answer later."""
    need_gevent()
    out = subprocess.run([sys.executable, "-c", GEVENT_PUSH, str(ROOT), str(tmp_path / "c.db")],
                         capture_output=True, text=True, timeout=60)

    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "10"]            # no switch; the ready ones still wait


def test_the_pools_slots_bound_the_connections_and_a_release_lets_a_waiter_in():
    slots = comet._Slots(2)
    assert slots.acquire(timeout=1) and slots.acquire(timeout=1)
    assert not slots.acquire(timeout=0.05)
    waited = []
    waiter = threading.Thread(target=lambda: waited.append(slots.acquire(timeout=10)))
    waiter.start()
    slots.release()
    waiter.join(10)
    assert waited == [True] and not slots.acquire(timeout=0.05)


def test_unparking_frees_the_clients_and_the_addresss_places():
    parking = comet._Parking(per_client=1, per_address=2, total=3)
    first = parking.park("bob", "10.0.0.1", 0)
    second = parking.park("carol", "10.0.0.1", 0)
    with pytest.raises(comet.CometError) as refused:
        parking.park("bob", "10.0.0.2", 0)
    assert refused.value.status == 429

    parking.unpark(first)
    parking.park("dave", "10.0.0.1", 0)             # the address has one place again, not two
    with pytest.raises(comet.CometError) as full:
        parking.park("erin", "10.0.0.1", 0)
    assert full.value.status == 429
    parking.unpark(second)
    parking.unpark(parking._waiters["dave"][0])

    assert parking.count == 0 and parking.clients() == []
    assert not parking._addresses
    parking.park("bob", "10.0.0.1", 0)
    parking.park("dave", "10.0.0.1", 0)
    assert parking.count == 2


def recording_parking(woken):
    """A ``_Parking`` whose polls note their client in ``woken`` as they are woken."""
    class Waiter(comet._Waiter):
        __slots__ = ()

        def wake(self):                 # not a thread that waits: a relay goes straight on
            woken.append(self.client)
            return False

    parking = comet._Parking(per_client=5, per_address=100, total=100)
    parking._waiter = Waiter
    return parking


@pytest.mark.parametrize("ending", ["closed", "dropped", "refused"])
def test_a_push_wakes_its_recipients_polls_once_the_server_is_done_with_its_answer(ending):
    """Answered first: the wake-up runs when the server closes the push's response
    (as every server must), or drops it unclosed, or its start_response raises;
    not before, not twice."""
    woken = []
    app = make_app(store="memory:")
    app._parking = recording_parking(woken)
    app._parking.park("bob", None, app.store.head())
    body = json.dumps({"type": "m", "listeners": ["to"], "to": ["bob"]}).encode()
    environ = webtest.TestRequest.blank("/comet/push", method="POST", body=body, headers={
        "Content-Type": "application/json", "X-Client": "ann"}).environ
    if ending == "refused":
        def start_response(status, headers):
            raise OSError("the connection is gone")

        with pytest.raises(OSError) as refused:         # its traceback keeps the response
            app(environ, start_response)
        assert woken == ["bob"] and refused.traceback
        return
    answer = []

    response = app(environ, lambda status, headers: answer.append(status))
    written = b"".join(response)

    assert answer == ["200 OK"] and json.loads(written)["accepted"] and woken == []
    if ending == "closed":
        response.close()
        response.close()
    else:
        del response
    assert woken == ["bob"]


def test_polls_woken_together_are_woken_in_the_order_they_parked():
    """As a condition wakes its waiters; a client whose polls all left and that
    parks again is woken after the others, and a poll that has the position
    already is not woken."""
    woken = []
    parking = recording_parking(woken)
    order = ["k", "c", "x", "a", "q", "m", "b", "z"]
    waiters = {client: parking.park(client, None, 5) for client in order}
    parking.park("c", None, 9)                      # c's second: woken beside its first past 9
    parking.unpark(waiters["x"])
    parking.park("x", None, 5)

    parking.wake({client: 8 for client in sorted(order)})

    assert woken == ["k", "c", "a", "q", "m", "b", "z", "x"]
    woken.clear()
    parking.wake({client: 10 for client in reversed(order)})
    assert woken == ["k", "c", "c", "a", "q", "m", "b", "z", "x"]


def test_a_few_recipients_among_many_parked_are_woken_and_no_one_else():
    woken = []
    parking = recording_parking(woken)
    for n in range(40):
        parking.park(f"c{n}", None, 5)

    parking.wake({"c30": 8, "nobody": 8, "c3": 8, "c12": 5})   # c12 has position 5 already

    assert sorted(woken) == ["c3", "c30"]


def test_waking_while_other_threads_park_and_leave_never_fails():
    """The parked clients are read under the lock that parking changes them under."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)                     # a thread switch inside every loop
    try:
        parking = comet._Parking(per_client=5, per_address=10_000, total=10_000)
        for n in range(500):
            parking.park(f"c{n}", None, 0)
        stop, failures = threading.Event(), []

        def churn(k):
            for n in range(20_000):
                if stop.is_set():
                    return
                parking.unpark(parking.park(f"t{k}-{n % 50}", None, 0))

        def wake():
            try:
                for _ in range(300):
                    parking.wake({f"c{n}": 1 for n in range(0, 500, 2)})
            except Exception as error:      # noqa: BLE001 (the failure the test looks for)
                failures.append(error)
            finally:
                stop.set()

        threads = [threading.Thread(target=churn, args=(k,)) for k in range(2)]
        threads.append(threading.Thread(target=wake))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        sys.setswitchinterval(old)

    assert failures == [] and not any(thread.is_alive() for thread in threads)
    assert parking.count == 500


def test_parking_refuses_past_each_limit_exactly():
    parking = comet._Parking(per_client=2, per_address=3, total=6)
    refused = []
    for client, address in [("bob", None), ("bob", None), ("bob", None), ("carol", "10.0.0.1"),
                            ("dave", "10.0.0.1"), ("erin", "10.0.0.1"), ("frank", "10.0.0.1"),
                            ("gina", None), ("hank", None)]:
        try:
            parking.park(client, address, 0)
        except comet.CometError as error:
            refused.append((client, error.status))

    assert refused == [("bob", 429), ("frank", 429), ("hank", 503)]
    assert parking.count == 6
    assert sorted(parking.clients()) == ["bob", "carol", "dave", "erin", "gina"]


@pytest.mark.parametrize("limit", [0, 1])
def test_an_address_parks_as_many_polls_as_its_limit_and_not_one_more(limit):
    parking = comet._Parking(per_client=10, per_address=limit, total=10)
    for n in range(limit):
        parking.park(f"client{n}", "10.0.0.1", 0)

    with pytest.raises(comet.CometError) as refused:
        parking.park("one-more", "10.0.0.1", 0)

    assert refused.value.status == 429 and parking.count == limit


def test_a_package_is_delivered_until_it_is_older_than_retention_then_it_resets(
        store_url, monkeypatch):
    app = make_app(store=store_url, retention=10, poll_timeout=0.1)
    bob = as_client(app, "bob")
    cursor = cursor_of(bob)
    clock = [app.store.now()]
    monkeypatch.setattr(app.store, "now", lambda: clock[0])
    as_client(app, "alice").post_json("/comet/push", {"type": "x", "listeners": "bob"})
    clock[0] += 5_000
    as_client(app, "alice").post_json("/comet/push", {"type": "y", "listeners": "bob"})

    clock[0] += 5_000                       # the first exactly retention old: still retrievable
    kept = bob.get("/comet/poll", {"cursor": cursor}).json
    clock[0] += 1                           # the first expired, not the second
    expired = bob.get("/comet/poll", {"cursor": cursor}).json

    assert (len(kept["packages"]), kept["reset"]) == (2, False)
    assert (expired["packages"], expired["reset"]) == ([], True)


def park_bob_and_dave_then_push(here, there):
    """Polls of bob and dave parked on ``here`` (served, its window started), then a
    push to both through ``there``; their answers."""
    with ThreadedServer(here) as server:
        cursors = {name: Client(server.url, name).poll()["cursor"] for name in ("bob", "dave")}
        wait_until(lambda: here._window.horizon is not None)     # the first tail turn ran
        answers = {}

        def park(name):
            answers[name] = Client(server.url, name).poll(cursors[name], timeout=90)
        threads = [threading.Thread(target=park, args=(name,), daemon=True)
                   for name in ("bob", "dave")]
        for thread in threads:
            thread.start()
        wait_until(lambda: here.stats()["parked"] == 2)

        there.push({"type": "x", "listeners": ["to"], "to": ["bob", "dave"]})

        for thread in threads:
            thread.join(20)
    return answers


def test_a_poll_parked_on_one_app_is_woken_by_a_push_through_another_sharing_the_file(tmp_path):
    url = f"sqlite:///{tmp_path}/comet.db"
    here, there = (make_app(store=url, poll_timeout=60, tail_interval=0.02) for _ in range(2))
    for app in (here, there):
        @app.action("x").on_emit
        def emit(package, recipient, private, db):
            return dict(package, to_you=recipient) if recipient != "dave" else package
    answers = park_bob_and_dave_then_push(here, there)
    assert [p.get("to_you") for p in answers["bob"]["packages"]] == ["bob"]
    assert [p.get("to_you") for p in answers["dave"]["packages"]] == [None]
    assert answers["bob"]["packages"][0]["_stamp"] == answers["dave"]["packages"][0]["_stamp"]


def test_a_woken_poll_is_answered_from_the_window_with_its_own_tailored_copy(tmp_path,
                                                                            monkeypatch):
    app = make_app(store=f"sqlite:///{tmp_path}/comet.db", poll_timeout=60)

    @app.action("x").on_emit
    def emit(package, recipient, private, db):
        return dict(package, to_you=recipient) if recipient != "dave" else package
    reads = []
    read = app.store.read
    monkeypatch.setattr(app.store, "read", lambda *args: reads.append(args) or read(*args))
    answers = park_bob_and_dave_then_push(app, app)
    assert [p.get("to_you") for p in answers["bob"]["packages"]] == ["bob"]
    assert [p.get("to_you") for p in answers["dave"]["packages"]] == [None]
    assert reads == []


def test_a_commit_extends_its_own_processs_window_at_once_a_package_to_nobody_too(tmp_path):
    app = make_app(store=f"sqlite:///{tmp_path}/comet.db", poll_timeout=0.1)
    app._start()
    wait_until(lambda: app._window.horizon is not None)     # the first tail turn ran
    app._tail = lambda: None                # and no other: only the commits fill it now
    head = app._window.horizon

    app.push({"type": "nobody", "listeners": ["to"], "to": []})
    app.push({"type": "x", "listeners": ["to"], "to": ["bob"]})

    horizon, rows = app._window.read("bob", head, 10)
    assert horizon == head + 2 and [json.loads(row[2])["type"] for row in rows] == ["x"]


def test_a_read_from_the_newest_purged_position_of_a_recipient_has_lost_nothing(
        store_url, monkeypatch):
    app = make_app(store=store_url, poll_timeout=0.1)
    alice = as_client(app, "alice")
    before_both = app.store.head()
    clock = [app.store.now()]
    monkeypatch.setattr(app.store, "now", lambda: clock[0])
    alice.post_json("/comet/push", {"type": "old", "listeners": "bob"})
    after_old = app.store.head()
    clock[0] += 10_000
    alice.post_json("/comet/push", {"type": "new", "listeners": "bob"})

    for _ in range(100):                    # the old package only
        if not app.store.purge(clock[0] - 5_000):
            break

    _, kept, kept_lost = app.store.read("bob", after_old, 10)
    _, _, lost = app.store.read("bob", before_both, 10)
    assert ([json.loads(row[2])["type"] for row in kept], kept_lost) == (["new"], False)
    assert lost is True


# --------------------------------------------------------------------------
# Stamps: a package is accepted once, however often it comes
# --------------------------------------------------------------------------

def test_the_same_stamp_twice_in_one_batch_is_accepted_twice_and_delivered_once(store_url):
    app = make_app(store=store_url, poll_timeout=0.1)
    alice, bob = as_client(app, "alice"), as_client(app, "bob")
    cursor = cursor_of(bob)
    package = {"type": "x", "listeners": "bob", "_stamp": "one-batch-stamp"}

    answer = alice.post_json("/comet/push", [package, package, {**package, "_stamp": "other-stamp-1"}])

    assert answer.json == {"accepted": ["one-batch-stamp", "one-batch-stamp", "other-stamp-1"]}
    assert stamps_after(bob, cursor) == ["one-batch-stamp", "other-stamp-1"]


def test_the_same_stamp_pushed_from_many_threads_at_once_is_delivered_once(store_url):
    app = make_app(store=store_url, poll_timeout=0.1)
    bob = as_client(app, "bob")
    cursor = cursor_of(bob)
    start = threading.Barrier(8)
    results = []

    def push():
        start.wait(10)
        results.append(app.push({"type": "x", "listeners": "bob", "_stamp": "racing-stamp"}))
    threads = [threading.Thread(target=push) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert results == ["racing-stamp"] * 8
    assert stamps_after(bob, cursor) == ["racing-stamp"]


def test_a_stamp_whose_package_was_refused_can_be_pushed_again(store_url):
    app = make_app(store=store_url, poll_timeout=0.1)
    alice, bob = as_client(app, "alice"), as_client(app, "bob")
    cursor = cursor_of(bob)
    refused = {"type": "message", "listeners": ["room"], "_stamp": "refused-then-ok"}
    alice.post_json("/comet/push", [{"type": "x", "listeners": "bob", "_stamp": "kept-stamp-1"},
                                    refused], status=403)

    answer = alice.post_json("/comet/push", {"type": "x", "listeners": "bob",
                                             "_stamp": "refused-then-ok"})

    assert answer.json == {"accepted": ["refused-then-ok"]}
    assert stamps_after(bob, cursor) == ["kept-stamp-1", "refused-then-ok"]


def test_a_hook_pushing_the_stamp_of_the_package_it_runs_for_pushes_that_package_again(
        store_url):
    app = make_app(store=store_url, poll_timeout=0.1)

    @app.action("note").on_submit
    def copy_to_carol(package, private, db, environ):
        assert app.push({"type": "copy", "listeners": "carol", "_stamp": package["_stamp"]}) \
            == package["_stamp"]                # accepted: the one package, stored once
    bob, carol = as_client(app, "bob"), as_client(app, "carol")
    cursors = cursor_of(bob), cursor_of(carol)

    answer = as_client(app, "alice").post_json(
        "/comet/push", {"type": "note", "listeners": "bob", "_stamp": "note-stamp-1"})

    assert answer.json == {"accepted": ["note-stamp-1"]}
    assert (stamps_after(bob, cursors[0]), stamps_after(carol, cursors[1])) == \
        (["note-stamp-1"], [])


def test_a_stamp_the_server_made_pushed_again_in_its_transaction_is_stored_once(store_url):
    app = make_app(store=store_url, poll_timeout=0.1)
    made = []

    @app.action("note").on_submit
    def copy_twice(package, private, db, environ):
        made.append(app.push({"type": "copy", "listeners": "carol"}))
        assert app.push({"type": "copy", "listeners": "carol", "_stamp": made[0]}) == made[0]
    carol = as_client(app, "carol")
    cursor = cursor_of(carol)

    as_client(app, "alice").post_json("/comet/push", {"type": "note", "listeners": "bob"})

    assert stamps_after(carol, cursor) == made


def test_a_lone_package_refused_answers_index_0_and_nothing_accepted(store_url):
    app = make_app(store=store_url, poll_timeout=0.1)

    @app.action("note").on_submit
    def refuse(package, private, db, environ):
        raise comet.Reject("no")

    answer = as_client(app, "alice").post_json(
        "/comet/push", {"type": "note", "listeners": "bob"}, status=403)

    assert (answer.json["index"], answer.json["accepted"]) == (0, [])


@pytest.mark.parametrize("order_stamp", [None, "order-stamp-1"])     # the server's, a client's
def test_a_stamp_undone_with_its_package_is_free_again_in_the_same_transaction(store_url,
                                                                             order_stamp):
    app = make_app(store=store_url, poll_timeout=0.1)
    receipt = {"type": "receipt", "listeners": "clerk", "_stamp": "receipt-stamp-1"}

    @app.action("order").on_submit
    def order(package, private, db, environ):
        try:
            app.push({"type": "refused", "listeners": "shop"})  # pushes the receipt, then fails
        except comet.CometError:
            pass
        app.push(receipt)

    @app.action("refused").on_submit
    def refused(package, private, db, environ):
        app.push(receipt)
        raise comet.Reject("no")
    clerk = as_client(app, "clerk")
    cursor = cursor_of(clerk)

    as_client(app, "alice").post_json("/comet/push", {"type": "order", "listeners": "shop",
                                                      **({"_stamp": order_stamp} if order_stamp else {})})

    assert stamps_after(clerk, cursor) == ["receipt-stamp-1"]


def test_a_stamp_stays_claimed_when_a_later_package_of_its_transaction_is_undone(store_url):
    app = make_app(store=store_url, poll_timeout=0.1)
    receipt = {"type": "receipt", "listeners": "clerk", "_stamp": "receipt-stamp-2"}

    @app.action("order").on_submit
    def order(package, private, db, environ):
        app.push(receipt)
        with contextlib.suppress(comet.CometError):
            app.push({"type": "refused", "listeners": "shop"})
        assert app.push(receipt) == "receipt-stamp-2"          # accepted once already

    @app.action("refused").on_submit
    def refused(package, private, db, environ):
        raise comet.Reject("no")
    clerk = as_client(app, "clerk")
    cursor = cursor_of(clerk)

    as_client(app, "alice").post_json("/comet/push", {"type": "order", "listeners": "shop"})

    assert stamps_after(clerk, cursor) == ["receipt-stamp-2"]


def test_a_batch_of_a_thousand_stamped_packages_is_stored_whole_on_sqlite(tmp_path):
    app = make_app(store=f"sqlite:///{tmp_path}/comet.db", poll_timeout=0.1, max_batch=1000,
                   max_body=1 << 20)
    bob = as_client(app, "bob")
    cursor = cursor_of(bob)
    stamps = [f"many-stamps-{n:04d}" for n in range(1000)]

    answer = as_client(app, "alice").post_json(
        "/comet/push", [{"type": "x", "listeners": "bob", "_stamp": s} for s in stamps])

    assert answer.json == {"accepted": stamps}
    assert stamps_after(bob, cursor) == stamps


# --------------------------------------------------------------------------
# A batch: each package is kept or undone whole, the ones before it stay
# --------------------------------------------------------------------------

def test_a_join_refused_in_a_batch_leaves_no_membership_and_the_earlier_join_stays(store_url):
    app = make_app(store=store_url, poll_timeout=0.1)
    clubs = app.channels("club:", may_join=lambda environ, db, channel: channel != "club:closed")
    alice = as_client(app, "alice")

    answer = alice.post_json("/comet/push", [
        {"type": "ping", "listeners": "bob"},
        {"type": "join", "listeners": ["club:one"]},
        {"type": "join", "listeners": ["club:two", "club:closed"]}], status=403)

    assert answer.json["index"] == 2 and len(answer.json["accepted"]) == 2
    assert clubs["club:one"].members() == {"alice": "alice"}
    assert clubs["club:two"].members() == {}


def test_a_package_a_hook_pushed_is_undone_with_its_package_refused_in_a_batch(store_url):
    app = make_app(store=store_url, poll_timeout=0.1)

    @app.action("order").on_submit
    def submit(package, private, db, environ):
        app.push({"type": "receipt", "listeners": "clerk", "item": package["item"]})
        if package["item"] == "refused":
            raise comet.Reject("no")
    alice, clerk = as_client(app, "alice"), as_client(app, "clerk")
    cursor = cursor_of(clerk)

    alice.post_json("/comet/push", [
        {"type": "order", "listeners": "shop", "item": "tea"},
        {"type": "order", "listeners": "shop", "item": "refused"},
        {"type": "order", "listeners": "shop", "item": "never"}], status=403)

    receipts = clerk.get("/comet/poll", {"cursor": cursor}).json["packages"]
    assert [p["item"] for p in receipts] == ["tea"]


def test_a_package_larger_than_the_store_keeps_is_that_packages_413(tmp_path):
    app = make_app(store=f"sqlite:///{tmp_path}/comet.db", poll_timeout=0.1)
    app.store._max_text = 10_000
    bob = as_client(app, "bob")
    cursor = cursor_of(bob)

    answer = as_client(app, "alice").post_json("/comet/push", [
        {"type": "x", "listeners": "bob", "_stamp": "small-stamp-1"},
        {"type": "x", "listeners": "bob", "data": "x" * 10_000}], status=413)

    assert (answer.json["error"], answer.json["index"]) == ("too_large", 1)
    assert stamps_after(bob, cursor) == ["small-stamp-1"]


def test_a_tailored_copy_larger_than_the_store_keeps_is_that_packages_413(tmp_path):
    app = make_app(store=f"sqlite:///{tmp_path}/comet.db", poll_timeout=0.1)
    app.store._max_text = 10_000

    @app.action("x").on_emit
    def emit(package, recipient, private, db):
        return dict(package, data="x" * 10_000) if recipient == "carol" else package
    carol = as_client(app, "carol")
    cursor = cursor_of(carol)

    answer = as_client(app, "alice").post_json("/comet/push", [
        {"type": "x", "listeners": ["to"], "to": ["bob"]},
        {"type": "x", "listeners": ["to"], "to": ["bob", "carol"]}], status=413)

    assert (answer.json["error"], answer.json["index"]) == ("too_large", 1)
    assert stamps_after(carol, cursor) == []


def test_a_sender_larger_than_the_store_keeps_is_that_joins_500_and_members_stay(tmp_path):
    app = make_app(store=f"sqlite:///{tmp_path}/comet.db", poll_timeout=0.1,
                   sender=lambda environ, db: environ["HTTP_X_CLIENT"] * 5_000)
    app.store._max_sender = 10_000
    join = {"type": "join", "listeners": ["room"]}
    as_client(app, "b").post_json("/comet/push", join)

    answer = as_client(app, "bigger").post_json("/comet/push", join, status=500)

    assert answer.json["error"] == "internal"
    assert app.channel("room").members() == {"b": "b" * 5_000}


def test_a_commit_the_store_refuses_is_logged_fails_its_push_and_the_next_push_goes_through(
        tmp_path, monkeypatch, caplog):
    app = make_app(store=f"sqlite:///{tmp_path}/comet.db", poll_timeout=0.1)
    bob = as_client(app, "bob")
    cursor = cursor_of(bob)
    flush = app.store._flush

    def refused(batch):
        monkeypatch.setattr(app.store, "_flush", flush)     # once
        flush(batch)
        raise sqlite3.IntegrityError("refused")
    monkeypatch.setattr(app.store, "_flush", refused)
    alice = as_client(app, "alice")

    first = alice.post_json("/comet/push", {"type": "x", "listeners": "bob"}, status=503)
    second = alice.post_json("/comet/push", {"type": "x", "listeners": "bob",
                                             "_stamp": "after-refusal"})

    assert first.json["error"] == "unavailable" and second.json == {"accepted": ["after-refusal"]}
    assert stamps_after(bob, cursor) == ["after-refusal"]
    assert [record.exc_info[0] for record in caplog.records
            if "refused a commit" in record.getMessage()] == [sqlite3.IntegrityError]


class Interrupt(BaseException):
    """What gevent.Timeout is to a push: not an Exception."""


def test_a_push_interrupted_by_a_base_exception_is_logged_with_its_traceback(store_url, caplog):
    app = make_app(store=store_url, poll_timeout=0.1)

    @app.action("x").on_submit
    def submit(package, private, db, environ):
        raise Interrupt()

    with pytest.raises(Interrupt):
        app.push({"type": "x", "listeners": "bob"})

    [record] = [r for r in caplog.records if r.getMessage().startswith("comet: a push was")]
    assert record.exc_info[0] is Interrupt


# --------------------------------------------------------------------------
# Group commit: which batch a transaction joins
# --------------------------------------------------------------------------

class Joining:
    """Transactions of ``store`` joining batches from threads of their own; each
    passes its turn on as soon as it has it."""

    def __init__(self, store):
        self.store = store
        self.threads = []

    def join(self, count):
        for _ in range(count):
            thread = threading.Thread(target=lambda: self.store._pass(self.store._join()))
            thread.start()
            self.threads.append(thread)

    def end(self, *batches):
        for batch in batches:
            self.store._pass(batch)         # the held first parts: the queues run and commit
        for thread in self.threads:
            thread.join(20)
        assert not any(thread.is_alive() for thread in self.threads)


def test_a_transaction_opens_another_batch_once_the_open_ones_have_their_queues_full(tmp_path):
    store = comet.SQLiteStore(f"{tmp_path}/comet.db")
    store._batches, store._batch_queue = 2, 2       # as a database server's store, smaller
    joining = Joining(store)
    first = store._join()                           # holds its turn
    joining.join(2)
    wait_until(lambda: first.queued == 2)

    second = store._join()
    joining.join(3)
    wait_until(lambda: first.queued + second.queued == 5)

    assert second is not first and store._open == [first, second]
    assert (first.queued, second.queued) == (3, 2)  # the least queued first, then the first open
    joining.end(first, second)
    assert store._open == []


def test_a_batch_with_its_most_parts_takes_no_more_and_the_next_transaction_opens_one(tmp_path):
    store = comet.SQLiteStore(f"{tmp_path}/comet.db")
    store._batch_parts = 3
    joining = Joining(store)
    first = store._join()
    joining.join(2)
    wait_until(lambda: first.queued == 2)

    assert first.parts == 3 and store._open == []
    following = store._join()
    assert following is not first and store._open == [following]
    joining.end(first, following)


def test_a_part_whose_turn_does_not_come_in_time_is_503_busy_and_leaves_the_queue(tmp_path):
    store = comet.SQLiteStore(f"{tmp_path}/comet.db")
    assert store._turn_timeout == 10        # seconds, by default; 1 here, for a shorter wait
    store._turn_timeout = 1
    first = store._join()                   # holds its turn throughout
    outcome = {}

    def wait_for_a_turn():
        try:
            outcome["batch"] = store._join()
        except comet.CometError as error:
            outcome["error"] = (error.status, error.message)
    waiting = threading.Thread(target=wait_for_a_turn, daemon=True)
    waiting.start()
    wait_until(lambda: first.queued == 1)

    waiting.join(10)                        # its turn would come after 1 s at the most

    try:
        assert outcome == {"error": (503, "the store is busy")}
        assert first.queued == 0
    finally:                                # (in a thread: a wrong wait may hold the queue's lock)
        passing = threading.Thread(target=store._pass, args=(first,), daemon=True)
        passing.start()
        passing.join(10)


def test_a_forked_process_opens_batches_of_its_own_never_its_parents(tmp_path):
    store = comet.SQLiteStore(f"{tmp_path}/comet.db")
    parents = store._join()                 # the parent's batch, open when it forks
    reader, writer = os.pipe()

    pid = os.fork()
    if pid == 0:                            # the child: a pre-forking server's worker
        try:
            try:
                with store.transaction() as tx:
                    tx.append("forked-child-1", 0, '{"type":"x"}', [("bob", None)])
                status = "200"
            except comet.CometError as error:
                status = f"{error.status} {error.message}"
            os.write(writer, status.encode())
        finally:
            os._exit(0)
    os.close(writer)
    try:
        ready, _, _ = select.select([reader], [], [], 30)
        status = os.read(reader, 200).decode() if ready else "no answer"
    finally:
        os.close(reader)
        os.waitpid(pid, 0)
        store._pass(parents)

    assert status == "200"
    assert [row[2] for row in store.read("bob", 0, 10)[1]] == ['{"type":"x"}']


# --------------------------------------------------------------------------
# Durability on SQLite: what a 200 promises
# --------------------------------------------------------------------------

class TracedSQLiteStore(comet.SQLiteStore):
    """An SQLite store recording the pragmas of each connection it opens and, in
    ``events``, every statement run on them as ``(connection number, sql)``."""

    def __init__(self, path, events):
        self.events = events
        self.pragmas = []
        super().__init__(path)

    def _connect(self):
        conn = super()._connect()
        self.pragmas.append((conn.execute("PRAGMA synchronous").fetchone()[0],
                             conn.execute("PRAGMA journal_mode").fetchone()[0]))
        number = len(self.pragmas)
        conn.set_trace_callback(lambda sql: self.events.append((number, sql)))
        return conn


def test_every_sqlite_connection_the_store_opens_runs_with_synchronous_full_and_wal(tmp_path):
    store = TracedSQLiteStore(f"{tmp_path}/comet.db", [])
    app = make_app(store=store, poll_timeout=0.1)
    bob = as_client(app, "bob")
    cursor = cursor_of(bob)
    held = [store._checkout() for _ in range(3)]    # three at once: three connections
    for conn in held:
        store._checkin(conn)

    as_client(app, "alice").post_json("/comet/push", {"type": "x", "listeners": "bob"})
    assert len(stamps_after(bob, cursor)) == 1

    FULL = 2
    assert len(store.pragmas) >= 3
    assert store.pragmas == [(FULL, "wal")] * len(store.pragmas)


def test_a_push_is_answered_only_after_the_commit_that_stores_it_on_sqlite(tmp_path):
    events = []
    store = TracedSQLiteStore(f"{tmp_path}/comet.db", events)
    app = make_app(store=store, poll_timeout=0.1)

    def answering(environ, start_response):
        def start(status, headers, *exc_info):
            events.append(("answer", status))
            return start_response(status, headers, *exc_info)
        return app(environ, start)
    alice = webtest.TestApp(answering, extra_environ={"HTTP_X_CLIENT": "alice"})

    alice.post_json("/comet/push", {"type": "x", "listeners": "bob", "_stamp": "durable-1"})

    stored = next(index for index, (_, sql) in enumerate(events)
                  if sql.startswith("INSERT INTO comet_packages") and "'durable-1'" in sql)
    connection = events[stored][0]
    committed = next(index for index, (number, sql) in enumerate(events)
                     if index > stored and number == connection and sql == "COMMIT")
    answered = events.index(("answer", "200 OK"))
    assert stored < committed < answered, events[stored:]


CHILD = r"""
import json, os, sys
from wsgiref.simple_server import make_server
tests, url, port, gates, mark = sys.argv[1:]
sys.path.insert(0, tests)
import support

app = support.make_app(store=url, poll_timeout=1, rate=(10000, 10000),
                       address_rate=(10000, 10000))

@app.action("note").on_submit
def submit(package, private, db, environ):
    db.cursor().execute(f"INSERT INTO log (text) VALUES ({mark})", (package["text"],))
    if package["text"].startswith("hold"):
        open(os.path.join(gates, package["text"] + ".held"), "w").close()
        support.wait_until(lambda: os.path.exists(os.path.join(gates, package["text"] + ".go")),
                           timeout=60)

def serve(environ, start_response):
    if environ["PATH_INFO"] == "/queued":       # parts waiting their turn in a batch now
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(sum(batch.queued for batch in app.store._open)).encode()]
    return app(environ, start_response)

httpd = make_server("127.0.0.1", int(port), serve, server_class=support._ThreadingServer,
                    handler_class=support._QuietHandler)
httpd.serve_forever(poll_interval=0.05)
"""


class Child:
    """The application with a holding ``note`` hook, in a process of its own."""

    def __init__(self, url, gates, mark):
        self.args = [sys.executable, "-c", CHILD, HERE, url, "0", str(gates), mark]
        self.port = None
        self.proc = None

    def start(self):
        self.port = self.port or free_port()
        self.args[5] = str(self.port)
        self.proc = subprocess.Popen(self.args, cwd=ROOT)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_until(self._answers, timeout=15)
        return self

    def _answers(self):
        assert self.proc.poll() is None, "the child process died"
        with contextlib.suppress(OSError, http.client.HTTPException):
            return Client(self.url, "probe").request("GET", "/queued", timeout=2)[0] == 200
        return False

    def queued(self):
        return Client(self.url, "probe").request("GET", "/queued")[2]

    def kill(self):
        self.proc.kill()
        self.proc.wait(10)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


@pytest.fixture(params=["sqlite", "mysql"])
def durable(request, tmp_path):
    """``(url, mark, log)``: a fresh durable store with a ``log`` table for the hook,
    the driver's placeholder and ``log()``, the texts the hook wrote and kept."""
    if request.param == "sqlite":
        path = f"{tmp_path}/comet.db"
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("CREATE TABLE log (text TEXT)")

        def log():
            with contextlib.closing(sqlite3.connect(path)) as db:
                return sorted(row[0] for row in db.execute("SELECT text FROM log"))
        return f"sqlite:///{path}", "?", log, None
    mariadb = request.getfixturevalue("mariadb")
    url = mariadb.create_database()
    mariadb.query(url, "CREATE TABLE log (text VARCHAR(64)) ENGINE=InnoDB")
    return url, "%s", lambda: sorted(row[0] for row in mariadb.query(url, "SELECT text FROM log")), \
        mariadb


def test_kill_9_with_pushes_queued_behind_a_held_commit_loses_no_200_and_keeps_no_other(
        durable, tmp_path):
    url, mark, log, mariadb = durable
    child = Child(url, tmp_path, mark).start()
    try:
        bob = Client(child.url, "bob")
        cursor = bob.poll()["cursor"]
        statuses, answered = {}, threading.Event()

        def push(text):
            package = {"type": "note", "listeners": ["to"], "to": ["bob"], "text": text,
                       "_stamp": "kill9-" + text}
            try:
                statuses[text] = Client(child.url, "alice").push(package, timeout=60)[0]
            except (OSError, http.client.HTTPException):
                statuses[text] = None       # no answer: the process died first
            answered.set()

        def gate(name):
            return os.path.join(tmp_path, name)
        push("before")
        assert statuses == {"before": 200}
        answered.clear()
        threads = [threading.Thread(target=push, args=("hold-a",))]
        threads[0].start()
        wait_until(lambda: os.path.exists(gate("hold-a.held")))
        for text in ("queued-1", "queued-2", "hold-b"):
            threads.append(threading.Thread(target=push, args=(text,)))
            threads[-1].start()
        wait_until(lambda: child.queued() == 3)     # all three wait behind hold-a's part
        open(gate("hold-a.go"), "w").close()
        wait_until(lambda: os.path.exists(gate("hold-b.held")))     # the commit is held now
        answered.wait(1.0)                  # an answer given before the commit has time to come

        child.kill()
        for thread in threads:
            thread.join(10)
        child.start()
        delivered = [p["text"] for p in Client(child.url, "bob").poll(cursor)["packages"]]
        stored = {stamp for stamp in positions_in_store(url, mariadb) if stamp.startswith("kill9-")}
        kept = log()
    finally:
        child.stop()

    answered_200 = sorted(text for text, status in statuses.items() if status == 200)
    assert delivered == answered_200 == ["before"], statuses
    assert stored == {"kill9-before"} and kept == ["before"]


class TwoParts:
    """Two transactions of one batch of ``store``: the first (``first(tx)``) runs and
    ends its part, then the second (``second(tx)``), queued behind it meanwhile, runs
    as the batch's next part.  ``statements`` lists the SQL each ran, in order."""

    def __init__(self, store):
        self.store = store
        self.statements = {}
        execute = store._execute

        def recorded(cur, sql, args=()):
            self.statements.setdefault(threading.current_thread().name, []).append(sql)
            return execute(cur, sql, args)
        store._execute = recorded

    def run(self, first, second):
        queued, batch, errors = threading.Event(), [], []

        def part(name, body):
            try:
                with self.store.transaction() as tx:
                    if name == "first":
                        batch.append(self.store._local.batch)
                        body(tx)
                        assert queued.wait(10)
                    else:
                        body(tx)
            except Exception as error:      # a failed assert in a part fails the test
                errors.append(error)

        threads = [threading.Thread(target=part, args=("first", first), name="first")]
        threads[0].start()
        wait_until(lambda: batch)
        threads.append(threading.Thread(target=part, args=("second", second), name="second"))
        threads[1].start()
        wait_until(lambda: batch[0].queued == 1)
        queued.set()
        for thread in threads:
            thread.join(20)
        assert not errors, errors

    def savepoints(self, name):
        return [sql for sql in self.statements.get(name, []) if sql.startswith("SAVEPOINT")]


@pytest.fixture(params=["sqlite", "mysql", "postgresql"])
def sql_store(request, tmp_path):
    store = comet.open_store(fresh_store(request.param, request, tmp_path))
    yield store
    store.close()


def bodies(store, client):
    return [body for _, _, body in store.read(client, 0, 10)[1]]


def test_a_later_part_that_only_reads_and_appends_opens_no_savepoint(sql_store):
    parts = TwoParts(sql_store)

    def first(tx):
        tx.add_member("c", "ann", '"ann"', 1)
        tx.append("stamp-1", 1, '{"n":1}', [("ann", None)])

    def second(tx):
        assert tx.member_ids("c") == ["ann"]
        tx.append("stamp-2", 1, '{"n":2}', [("ann", None)])
    parts.run(first, second)
    assert parts.savepoints("second") == []
    assert bodies(sql_store, "ann") == ['{"n":1}', '{"n":2}']


def test_a_later_part_that_fails_before_writing_is_undone_and_the_batch_commits(sql_store):
    parts = TwoParts(sql_store)

    def first(tx):
        tx.append("stamp-1", 1, '{"n":1}', [("ann", None)])

    def second(tx):
        with contextlib.suppress(comet.Reject):
            with tx.savepoint():
                tx.append("stamp-2", 1, '{"n":2}', [("ann", None)])
                raise comet.Reject("no")
        tx.append("stamp-3", 1, '{"n":3}', [("ann", None)])
    parts.run(first, second)
    assert parts.savepoints("second") == []
    assert bodies(sql_store, "ann") == ['{"n":1}', '{"n":3}']


def test_a_later_part_that_writes_opens_its_savepoints_and_a_failure_undoes_the_write(sql_store):
    parts = TwoParts(sql_store)

    def first(tx):
        tx.add_member("c", "ann", '"ann"', 1)

    def second(tx):
        with contextlib.suppress(comet.Reject):
            with tx.savepoint():
                tx.add_member("c", "bob", '"bob"', 1)
                raise comet.Reject("no")
    parts.run(first, second)
    assert len(parts.savepoints("second")) == 2     # the part's, then the one inside it
    assert sorted(sql_store.members("c")) == ["ann"]


@pytest.mark.parametrize("kind", ["mysql", "postgresql"])
def test_a_later_part_reads_the_members_again_and_has_a_join_answered_before_it(
        request, tmp_path, kind):
    """A batch's later part reads a channel's members itself: a join another
    transaction committed after the first part's read, and before this part's push
    came, is a member for it (the first part's read would have left it out)."""
    url = fresh_store(kind, request, tmp_path)
    store, other = comet.open_store(url), comet.open_store(url)
    try:
        parts = TwoParts(store)

        def first(tx):
            tx.add_member("c", "ann", '"ann"', 1)
            assert tx.member_ids("c") == ["ann"]
            with other.transaction() as joining:           # another process's join
                joining.add_member("c", "bob", '"bob"', 1)

        def second(tx):
            assert sorted(tx.member_ids("c")) == ["ann", "bob"]
            assert tx.is_member("c", "bob")
        parts.run(first, second)
        reads = [sql for sql in parts.statements["second"] if "FROM comet_members" in sql]
        assert len(reads) == 2
    finally:
        store.close()
        other.close()


def test_a_later_part_claims_stamps_without_a_savepoint_and_a_failure_gives_them_back(sql_store):
    parts = TwoParts(sql_store)

    def first(tx):
        assert not tx.claim_stamp("stamp-kept")
        tx.append("stamp-kept", 1, '{"n":1}', [("ann", None)])

    def second(tx):
        assert tx.claim_stamp("stamp-kept")             # the first part's
        with contextlib.suppress(comet.Reject):
            with tx.savepoint():
                assert not tx.claim_stamp("stamp-again")
                raise comet.Reject("no")
        assert not tx.claim_stamp("stamp-again")        # given back: this part's again
        tx.append("stamp-again", 1, '{"n":2}', [("ann", None)])
        with contextlib.suppress(comet.Reject):
            with tx.savepoint():
                assert not tx.claim_stamp("stamp-refused")
                tx.add_member("c", "bob", '"bob"', 1)   # a write: the savepoint opens
                raise comet.Reject("no")
    parts.run(first, second)
    assert len(parts.savepoints("second")) == 2     # for the join alone: the part's, its own
    assert bodies(sql_store, "ann") == ['{"n":1}', '{"n":2}']
    assert sql_store.members("c") == {}
    with sql_store.transaction() as tx:                # claims of a failed part left nothing
        assert tx.claim_stamp("stamp-again") and not tx.claim_stamp("stamp-refused")
    assert sql_store._query("SELECT COUNT(*) FROM comet_packages WHERE pos < 0")[0][0] == 0
