"""Two server processes sharing one store, SQLite file, MySQL and PostgreSQL: each delivers
the other's pushes.

Each process tails the store every ``tail_interval`` to wake its parked polls
for packages the other process stored; on PostgreSQL a NOTIFY at each commit
makes it tail at once.  Both register the namespace ``room:`` when they start,
and nothing else: every ``room:NAME`` is a channel in both.  The MySQL and
PostgreSQL cases need the local servers (the helpers are in support.py); each
gets a database of its own.
"""

import json
import secrets
import statistics
import threading
import time

import pytest
import webtest

import comet
from support import (Client, ServerProcess, answer_from_the_window, assert_no_cursor_skipped,
                     cursor_position, fresh_store, make_app, new_ids, plan_packages,
                     positions_in_store, query_store, run_traffic, wait_until)

TAIL_INTERVAL = 0.1


@pytest.fixture
def store_url(request, tmp_path):
    """``sqlite``, ``mysql`` or ``postgresql``: the URL of a fresh store of that kind."""
    return fresh_store(request.param, request, tmp_path)


@pytest.fixture
def processes(store_url):
    """Two server processes, A and B, on the one store."""
    options = dict(poll_timeout=1, tail_interval=TAIL_INTERVAL)
    with ServerProcess(store_url, **options) as a, ServerProcess(store_url, **options) as b:
        yield a, b


def parked(server):
    """How many polls ``server`` holds now (its ``GET /stats``)."""
    status, _, stats = Client(server.url, "observer").request("GET", "/stats")
    assert status == 200, stats
    return stats["parked"]


def deliver_across(a, b, trial):
    """Seconds from just before a push to B to the answer of the poll parked on A for it;
    the answer must carry that package (a poll that timed out answers none)."""
    receiver, sender = new_ids(f"receiver{trial}", f"sender{trial}")
    cursor = Client(a.url, receiver).poll()["cursor"]
    answered, result = threading.Event(), {}

    def park():
        try:
            result["answer"] = Client(a.url, receiver).poll(cursor=cursor, timeout=60)
        finally:
            result["at"] = time.monotonic()
            answered.set()

    threading.Thread(target=park, daemon=True).start()
    wait_until(lambda: parked(a) == 1)
    sent = time.monotonic()
    status, _, body = Client(b.url, sender).push(
        {"type": "message", "listeners": ["to"], "to": [receiver]})
    assert status == 200, body
    assert answered.wait(20), "the poll on A did not answer"
    assert [p["_stamp"] for p in result["answer"]["packages"]] == body["accepted"]
    return result["at"] - sent


@pytest.fixture
def parked_long(store_url):
    """Two server processes on the one store whose polls are held 30 s: a poll answered
    with its package sooner was woken."""
    options = dict(poll_timeout=30, tail_interval=TAIL_INTERVAL)
    with ServerProcess(store_url, **options) as a, ServerProcess(store_url, **options) as b:
        yield a, b


@pytest.mark.parametrize("store_url", ["sqlite", "mysql", "postgresql"], indirect=True)
def test_poll_parked_on_one_process_is_woken_by_the_tail_after_a_push_to_the_other(parked_long):
    a, b = parked_long

    seconds = [deliver_across(a, b, trial) for trial in range(5)]

    assert max(seconds) < 10, seconds                       # woken, long before poll_timeout
    assert statistics.median(seconds) < TAIL_INTERVAL + 0.2, seconds    # by the next tail


@pytest.fixture
def notified(request, tmp_path):
    """Two server processes on one PostgreSQL database that tail only every 60 s: a
    package that reaches the other process within seconds went by NOTIFY."""
    url = fresh_store("postgresql", request, tmp_path)
    postgres = request.getfixturevalue("postgres")
    options = dict(poll_timeout=90, tail_interval=60)
    with ServerProcess(url, **options) as a, ServerProcess(url, **options) as b:
        Client(a.url, "warm").poll(), Client(b.url, "warm").poll()     # each starts listening
        wait_until(lambda: postgres.query(
            url, "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database()"
                 " AND query = 'LISTEN comet'")[0][0] == 2, timeout=20)
        yield a, b


def test_poll_parked_on_one_process_gets_a_push_to_the_other_by_notify_not_by_the_tail(notified):
    a, b = notified

    seconds = [deliver_across(a, b, trial) for trial in range(5)]

    assert max(seconds) < 10, seconds                       # the tail would take 60 s


@pytest.mark.parametrize("store_url", ["sqlite", "mysql", "postgresql"], indirect=True)
def test_eight_pushers_on_two_processes_deliver_every_package_once_in_order(
        processes, store_url):
    a, b = processes
    clients = new_ids(*(f"client{i}" for i in range(10)))
    packages = plan_packages(clients, 1200, seed=3)

    traffic = run_traffic([a.url, b.url], [a.url, b.url], clients, packages,
                          pushers=8, poll_timeout=1)

    assert_no_cursor_skipped(traffic, packages, positions_in_store(store_url))


@pytest.mark.parametrize("store_url", ["sqlite", "mysql", "postgresql"], indirect=True)
def test_package_answered_200_survives_kill_9_of_the_process_that_answered(processes):
    a, b = processes
    sender, recipient = new_ids("sender", "recipient")
    old_cursor = Client(b.url, recipient).poll()["cursor"]
    status, _, body = Client(a.url, sender).push(
        {"type": "message", "listeners": ["to"], "to": [recipient]})
    assert status == 200
    a.kill()
    a.start()

    answer = Client(a.url, recipient).poll(cursor=old_cursor)

    assert [p["_stamp"] for p in answer["packages"]] == body["accepted"]


# --------------------------------------------------------------------------
# A room of the namespace "room:", known to both processes
# --------------------------------------------------------------------------

def members(process, room):
    """The room's members as ``process`` reads them (``GET /members``)."""
    status, _, answer = Client(process.url, "reader").request(
        "GET", "/members?channel=" + room)
    assert status == 200, (status, answer)
    return answer


def packages_after(process, client, cursor, count):
    """The first ``count`` packages for ``client`` after ``cursor``, polled through ``process``."""
    poller, got = Client(process.url, client), []
    deadline = time.monotonic() + 10
    while len(got) < count and time.monotonic() < deadline:
        answer = poller.poll(cursor=cursor, timeout=5)
        got, cursor = got + answer["packages"], answer["cursor"]
    return got


def chat_in_a_new_room(a, b):
    """alice opens a room through A; bob joins it and both talk through B.
    Returns ``(room, alice, bob, alice's cursor before it all)``."""
    room = "room:" + secrets.token_hex(4)
    alice, bob = new_ids("alice", "bob")
    cursor = Client(a.url, alice).poll()["cursor"]
    assert Client(a.url, alice).push({"type": "join", "listeners": [room]})[0] == 200
    assert Client(b.url, bob).push({"type": "join", "listeners": [room]})[0] == 200
    for client in (bob, alice):
        status, _, body = Client(b.url, client).push(
            {"type": "message", "listeners": [room], "text": f"hi from {client}"})
        assert status == 200, body
    return room, alice, bob, cursor


@pytest.mark.parametrize("store_url", ["sqlite", "mysql", "postgresql"], indirect=True)
def test_a_room_opened_through_one_process_is_joined_and_used_through_the_other(processes):
    a, b = processes

    room, alice, bob, cursor = chat_in_a_new_room(a, b)

    assert members(a, room) == members(b, room) == {alice: alice, bob: bob}
    through_a, through_b = (packages_after(p, alice, cursor, 4) for p in (a, b))
    assert [(p["type"], p["sender"]) for p in through_a] == [
        ("join", alice), ("join", bob), ("message", bob), ("message", alice)]
    assert json.dumps(through_a) == json.dumps(through_b)      # the same packages, stamps and all


@pytest.mark.parametrize("store_url", ["sqlite", "mysql", "postgresql"], indirect=True)
def test_a_room_keeps_working_after_both_processes_restart(processes):
    a, b = processes
    room, alice, bob, cursor = chat_in_a_new_room(a, b)
    before = packages_after(b, alice, cursor, 4)
    for process in (a, b):
        process.stop()
    for process in (a, b):
        process.start()                 # the same program: it registers "room:" and no room

    status, _, body = Client(a.url, bob).push(
        {"type": "message", "listeners": [room], "text": "after the restart"})

    assert status == 200, body
    assert members(a, room) == members(b, room) == {alice: alice, bob: bob}
    after = packages_after(b, alice, cursor, 5)
    assert after[:4] == before and after[4]["text"] == "after the restart"


@pytest.mark.parametrize("store_url", ["sqlite", "mysql", "postgresql"], indirect=True)
def test_a_client_the_join_hook_refuses_gets_403_and_nothing_of_the_room(processes):
    a, b = processes
    room, alice, bob, _ = chat_in_a_new_room(a, b)
    (guest,) = new_ids("guest")
    cursor = Client(b.url, guest).poll()["cursor"]

    status, _, answer = Client(b.url, guest).push({"type": "join", "listeners": [room]})

    assert (status, answer["error"], answer["message"]) == (
        403, "rejected", f"guests may not join {room}")
    assert Client(a.url, bob).push({"type": "message", "listeners": [room]})[0] == 200
    status, _, answer = Client(a.url, guest).push({"type": "message", "listeners": [room]})
    assert (status, answer["error"]) == (403, "not_member")
    assert Client(a.url, guest).poll(cursor=cursor, timeout=5)["packages"] == []
    assert members(a, room) == members(b, room) == {alice: alice, bob: bob}


# --------------------------------------------------------------------------
# A package missing below the head: the tail waits for it, never steps over it
# --------------------------------------------------------------------------

@pytest.mark.parametrize("store_url", ["sqlite", "mysql", "postgresql"], indirect=True)
def test_a_tail_that_finds_no_package_below_the_head_waits_for_it_and_then_delivers_both(
        store_url, monkeypatch, caplog):
    # The store is made to show what a transaction whose positions committed before
    # its package would show: the head moved past a position that has no package yet,
    # and a package of another transaction after it.  A process tailing then must not
    # hand its window the later package with a cursor past the missing one.
    answer_from_the_window(monkeypatch)
    reader, writer = (make_app(store=store_url, poll_timeout=0.3, tail_interval=TAIL_INTERVAL)
                      for _ in range(2))
    try:
        web = webtest.TestApp(reader)

        def poll(cursor):
            answer = web.get("/comet/poll", {"cursor": cursor},
                             headers={"X-Client": "carol"}).json
            return answer["cursor"], [package["n"] for package in answer["packages"]]

        cursor, _ = poll(None)
        first = cursor_position(cursor)
        query_store(store_url, "UPDATE comet_meta SET head = head + 1")     # first + 1: no package
        writer.push({"type": "note", "listeners": ["to"], "to": ["carol"], "n": 2})
        wait_until(lambda: "has no package at %d" % (first + 1) in caplog.text, timeout=10)
        cursor, got = poll(cursor)
        assert (cursor_position(cursor), got) == (first, []), "the tail stepped over the gap"
        body = json.dumps({"type": "note", "listeners": ["to"], "to": ["carol"], "n": 1,
                           "sender": "late", "_stamp": "late-package", "_ts": 0})
        # Its delivery row first: a tail that reads the package reads its recipient too.
        query_store(store_url, f"INSERT INTO comet_deliveries (recipient, pos) VALUES"
                               f" ('carol', {first + 1})")
        query_store(store_url, "INSERT INTO comet_packages (pos, stamp, ts, body) VALUES"
                               f" ({first + 1}, 'late-package', {reader.store.now()}, '{body}')")
        received = []
        deadline = time.monotonic() + 10
        while len(received) < 2 and time.monotonic() < deadline:
            cursor, got = poll(cursor)
            received += got
        assert received == [1, 2] and cursor_position(cursor) == first + 2
    finally:
        reader.close()
        writer.close()


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_a_package_that_never_comes_is_passed_over_after_a_wait_and_logged(
        store_url, monkeypatch, caplog):
    answer_from_the_window(monkeypatch)
    monkeypatch.setattr(comet, "_GAP_WAIT", 0.5)
    reader, writer = (make_app(store=store_url, poll_timeout=0.3, tail_interval=TAIL_INTERVAL)
                      for _ in range(2))
    try:
        web = webtest.TestApp(reader)
        cursor = web.get("/comet/poll", headers={"X-Client": "carol"}).json["cursor"]
        query_store(store_url, "UPDATE comet_meta SET head = head + 1")
        writer.push({"type": "note", "listeners": ["to"], "to": ["carol"], "n": 2})
        started = time.monotonic()
        answer = {"packages": []}
        while not answer["packages"] and time.monotonic() < started + 10:
            answer = web.get("/comet/poll", {"cursor": cursor},
                             headers={"X-Client": "carol"}).json
        assert [package["n"] for package in answer["packages"]] == [2]
        assert time.monotonic() - started >= 0.4     # the wait (from the gap seen, at the push)
        assert "is passed over" in caplog.text
    finally:
        reader.close()
        writer.close()
