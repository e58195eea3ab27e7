"""The MySQL and PostgreSQL stores against the real servers, MariaDB on 127.0.0.1:3306
and PostgreSQL on 127.0.0.1:5432: the API, the protocol, the guarantees.

Every test runs once on each, in one throwaway database ``comet_test_<hex>``
per server, made for this module and dropped after it; client ids carry a
fresh tag, so tests do not see each other's packages.  Without a reachable
server its half of the module skips loudly (and fails under CI=true).

The server helpers (``MariaDB`` and ``PostgreSQL``, the same methods each,
their fixtures, ``run_traffic``, ``assert_no_cursor_skipped``) are in
support.py.  The PostgreSQL-only behaviour (NOTIFY, the listener) is in
test_postgresql.py.
"""

import collections
import json
import secrets
import threading
import time
import urllib.parse

import pytest
import webtest

import comet
from support import (Client, ServerProcess, ThreadedServer, open_group,
                      assert_no_cursor_skipped, make_app, new_ids, plan_packages,
                      need, positions_in_store, purge, run_traffic,
                      wait_until)

# --------------------------------------------------------------------------
# In-process helpers
# --------------------------------------------------------------------------

def push(web, client, package, status=200):
    return web.post_json("/comet/push", package, headers={"X-Client": client}, status=status).json


def poll(web, client, cursor=None):
    query = "" if cursor is None else "?cursor=" + urllib.parse.quote(cursor)
    return web.get("/comet/poll" + query, headers={"X-Client": client}).json


@pytest.fixture(scope="module", params=["mysql", "postgresql"])
def server(request):
    """The local MariaDB, then the local PostgreSQL (``MariaDB``, ``PostgreSQL``)."""
    return request.getfixturevalue("mariadb" if request.param == "mysql" else "postgres")


@pytest.fixture(scope="module")
def url(server):
    """This module's database on ``server``: created now, dropped with the module."""
    return server.create_database()


@pytest.fixture
def app(url):
    app = make_app(store=url, poll_timeout=1)
    app.web = webtest.TestApp(app)
    yield app
    app.close()


# --------------------------------------------------------------------------
# Tables and the round trip
# --------------------------------------------------------------------------

def test_tables_are_created_on_first_use(server):
    url = server.create_database()
    assert not server.tables(url)

    app = make_app(store=url)
    try:
        tables = server.tables(url)
    finally:
        app.close()

    assert tables == {"comet_meta", "comet_packages", "comet_deliveries", "comet_purged",
                      "comet_purge", "comet_purge_log", "comet_members", "comet_clients",
                      "comet_spans"} | ({"comet_claims"} if server.kind == "mysql" else set())


def test_push_then_poll_round_trip_through_webtest(app):
    sender, recipient = new_ids("sender", "recipient")
    cursor = poll(app.web, recipient)["cursor"]

    accepted = push(app.web, sender, {"type": "message", "listeners": ["to"],
                                      "to": [recipient], "text": "h\u00e9llo \U0001f600"})
    answer = poll(app.web, recipient, cursor)

    [package] = answer["packages"]
    assert package["_stamp"] == accepted["accepted"][0]
    assert (package["text"], package["sender"], answer["reset"]) == \
        ("h\u00e9llo \U0001f600", sender, False)


def test_a_push_to_ten_thousand_members_stores_each_delivery_and_each_tailored_copy(server):
    app = make_app(store=server.create_database())     # its own: every row here is this push's
    try:
        members = [f"member{n:05d}" for n in range(10_000)]
        app.channels("big:", presence=False)
        with app.store.transaction() as tx:
            for member in members:
                tx.add_member("big:all", member, json.dumps(member), app.store.now())

        @app.action("deal").on_emit
        def emit(package, recipient, private, db):
            if recipient.endswith("0"):         # a copy of their own for one in ten
                package["card"] = "ace for " + recipient
            return package
        app.push({"type": "deal", "listeners": ["big:all"]}, sender="member00000")

        rows = app.store._query("SELECT recipient, body FROM comet_deliveries")
        assert sorted(comet._text(recipient) for recipient, _ in rows) == members
        assert sum(body is not None for _, body in rows) == 1_000
        [(_, _, mine)] = app.store.read("member01230", 0, 10)[1]
        [(_, _, plain)] = app.store.read("member01234", 0, 10)[1]
        assert json.loads(mine)["card"] == "ace for member01230" and "card" not in json.loads(plain)
    finally:
        app.close()


def test_channel_members_are_read_whole_whatever_their_ids(app, url):
    tag = secrets.token_hex(3)
    members = [f'{tag}"quote', f"{tag}back\\slash", f"{tag}new\nline", f"{tag}tab\tctl\x01\x1f",
               f"{tag}\U0001f600 \u00e9\u0301", f"{tag}\u2028", f"{tag}'", tag.ljust(256, "x")]
    app.channels("odd:", presence=False)
    with app.store.transaction() as tx:
        for member in members:
            tx.add_member(f"odd:{tag}", member, json.dumps(member), app.store.now())

    with app.store.transaction() as tx:
        read = sorted(tx.member_ids(f"odd:{tag}"))
        if url.startswith("mysql"):         # one array, cut short by the server: read as rows
            tx.db.cursor().execute("SET SESSION group_concat_max_len = 20")
            try:
                cut = sorted(tx.member_ids(f"odd:{tag}"))
            finally:
                tx.db.cursor().execute("SET SESSION group_concat_max_len = 4294967295")
            assert cut == sorted(members)
    cursors = {member: poll(app.web, member)["cursor"] for member in members}
    accepted = push(app.web, members[0], {"type": "note", "listeners": [f"odd:{tag}"]})

    assert read == sorted(members)
    for member in members:
        assert [p["_stamp"] for p in poll(app.web, member, cursors[member])["packages"]] == \
            accepted["accepted"], member


def test_cursor_from_another_database_is_reset(app, server):
    other = make_app(store=server.create_database())
    try:
        foreign = other.store.id + ".1"
    finally:
        other.close()
    [client] = new_ids("client")

    answer = poll(app.web, client, foreign)

    assert answer["reset"] is True and answer["packages"] == []


def test_same_stamp_pushed_twice_is_accepted_once_and_delivered_once(app, server, url):
    sender, recipient = new_ids("sender", "recipient")
    cursor = poll(app.web, recipient)["cursor"]
    package = {"type": "message", "listeners": ["to"], "to": [recipient],
               "_stamp": "twice" + secrets.token_hex(8)}

    first = push(app.web, sender, package)
    second = push(app.web, sender, package)

    assert first["accepted"] == second["accepted"] == [package["_stamp"]]
    assert [p["_stamp"] for p in poll(app.web, recipient, cursor)["packages"]] == [package["_stamp"]]
    assert list(server.query(url, "SELECT COUNT(*) FROM comet_packages WHERE stamp = %s",
                             (package["_stamp"],))) == [(1,)]


def test_same_stamp_pushed_concurrently_is_stored_once(app, server, url):
    [recipient] = new_ids("recipient")
    package = {"type": "message", "listeners": ["to"], "to": [recipient],
               "_stamp": "racing" + secrets.token_hex(8)}
    start = threading.Barrier(6)
    stamps = []

    def race():
        start.wait(5)
        stamps.append(app.push(dict(package)))

    threads = [threading.Thread(target=race) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert stamps == [package["_stamp"]] * 6
    assert list(server.query(url, "SELECT COUNT(*) FROM comet_packages WHERE stamp = %s",
                             (package["_stamp"],))) == [(1,)]


@pytest.mark.parametrize("kind, way", [
    ("mysql", "json_table"), ("mysql", "without_json_table"),
    ("mysql", "too_long_for_a_statement"), ("postgresql", "json_arrays")])
def test_delivery_rows_of_odd_ids_and_tailored_bodies_read_back_exactly(request, kind, way):
    """The delivery rows go as JSON the server takes apart (MySQL's JSON_TABLE,
    PostgreSQL's json_array_elements_text), or on MySQL as values where the
    server has no JSON_TABLE or the text could outgrow a statement: the same
    rows every way, whatever the ids and the tailored bodies hold."""
    server = request.getfixturevalue("mariadb" if kind == "mysql" else "postgres")
    app = make_app(store=server.create_database())     # its own: every row is this test's
    try:
        store = app.store
        inserts = []
        if kind == "mysql":
            assert store._json_table, "this MariaDB has JSON_TABLE"
            if way == "without_json_table":
                store._json_table = False
            elif way == "too_long_for_a_statement":
                store._statement_bytes = 30_000
            insert = store._insert
            store._insert = lambda cur, sql, rows, *rest: inserts.append(sql.split()[2]) or \
                insert(cur, sql, rows, *rest)
        ids = ['q"uote', "back\\slash", "new\nline", "ctl\x01\x1f\x7f", "\u2028\u2029",
               "\U0001f600 \u00e9\u0301", "it's", "x" * 256, "\U0001f600" * 256, "plain"]
        if kind == "mysql":
            ids.append("nul\x00")             # (PostgreSQL refuses it: a test of its own)
        tailored = {who: f'for {who}: "\\ \U0001f600 \x01' + "y" * 5_000 for who in ids[::2]}

        @app.action("deal").on_emit
        def emit(package, recipient, private, db):
            if recipient in tailored:
                package["card"] = tailored[recipient]
            return package
        accepted = app.push({"type": "deal", "listeners": ["to"], "to": ids})

        if kind == "mysql":
            # With JSON_TABLE the package goes as JSON too, with the COMMIT.
            assert inserts == {"json_table": []}.get(
                way, ["comet_packages", "comet_deliveries", "comet_deliveries"])
        for who in ids:
            [(_, _, body)] = store.read(who, 0, 10)[1]
            assert json.loads(body)["_stamp"] == accepted
            assert json.loads(body).get("card") == tailored.get(who), who
        assert store._query("SELECT COUNT(*) FROM comet_deliveries WHERE body IS NULL")[0][0] \
            == len(ids) - len(tailored)
    finally:
        app.close()


def test_ids_differing_in_case_accents_or_trailing_spaces_are_different_recipients(app):
    tag = secrets.token_hex(3)
    recipient, lookalikes = f"bob-{tag}", [f"Bob-{tag}", f"b\u00f6b-{tag}", f"bob-{tag} "]
    cursor = poll(app.web, recipient)["cursor"]
    for lookalike in lookalikes:
        push(app.web, "sender", {"type": "private", "listeners": ["to"], "to": [lookalike]})
    marker = push(app.web, "sender", {"type": "marker", "listeners": ["to"], "to": [recipient]})

    answer = poll(app.web, recipient, cursor)

    assert [p["_stamp"] for p in answer["packages"]] == marker["accepted"], \
        [p["to"] for p in answer["packages"]]


def test_package_for_ids_differing_only_in_case_is_accepted_and_reaches_each(app):
    upper, lower = new_ids("Bob", "bob")
    cursors = {who: poll(app.web, who)["cursor"] for who in (upper, lower)}

    both = push(app.web, "sender", {"type": "message", "listeners": ["to"], "to": [lower, upper]})
    mine = {who: push(app.web, "sender", {"type": "message", "listeners": ["to"], "to": [who]})
            for who in (upper, lower)}

    for who in (upper, lower):
        answer = poll(app.web, who, cursors[who])
        assert [p["_stamp"] for p in answer["packages"]] == both["accepted"] + mine[who]["accepted"]


def test_stamps_differing_only_in_case_are_different_packages(app):
    [recipient] = new_ids("recipient")
    cursor = poll(app.web, recipient)["cursor"]
    stamp = "CaseStamp" + secrets.token_hex(6)
    for variant in (stamp, stamp.lower()):
        push(app.web, "sender", {"type": "message", "listeners": ["to"], "to": [recipient],
                                 "_stamp": variant})

    answer = poll(app.web, recipient, cursor)

    assert [p["_stamp"] for p in answer["packages"]] == [stamp, stamp.lower()]


def test_single_listener_of_256_characters_is_delivered(app):
    recipient = new_ids("r")[0].ljust(256, "x")
    cursor = poll(app.web, recipient)["cursor"]

    accepted = push(app.web, "sender", {"type": "message", "listeners": recipient})

    assert [p["_stamp"] for p in poll(app.web, recipient, cursor)["packages"]] == \
        accepted["accepted"]


# --------------------------------------------------------------------------
# Hooks share the transaction
# --------------------------------------------------------------------------

@pytest.fixture
def notes_app(app, server, url):
    """The app with a ``note`` action whose on_submit writes to the app's own table;
    its on_emit refuses packages marked ``refuse``, after the note was written."""
    import comet
    server.query(url, "CREATE TABLE IF NOT EXISTS app_notes"
                      " (stamp VARCHAR(64) PRIMARY KEY, note TEXT)")
    note = app.action("note")
    app.hook_dbs = []

    @note.on_submit
    def write_note(package, private, db, environ):
        app.hook_dbs.append(db)
        with db.cursor() as cur:
            cur.execute("INSERT INTO app_notes (stamp, note) VALUES (%s, %s)",
                        (package["_stamp"], package["text"]))

    @note.on_emit
    def refuse_marked(package, recipient, private, db):
        if package.get("refuse"):
            raise comet.Reject("refused after the note was written")
        return package

    app.notes = lambda stamps: {row[0] for row in server.query(
        url, "SELECT stamp FROM app_notes")} & set(stamps)
    return app


def note(recipient, refuse=False):
    return {"type": "note", "listeners": ["to"], "to": [recipient], "text": "noted",
            "refuse": refuse, "_stamp": "note" + secrets.token_hex(8)}


def test_hooks_get_the_drivers_connection(notes_app, server):
    [recipient] = new_ids("recipient")

    push(notes_app.web, "sender", note(recipient))

    assert len(notes_app.hook_dbs) == 1
    assert isinstance(notes_app.hook_dbs[0], server.connection_type())


def test_a_connection_lent_to_a_hook_goes_back_to_the_pool_with_the_loan_ended(app, server):
    @app.listener("refusing")
    def refusing(environ, package, db):     # handed it, then the part fails
        raise comet.Reject("not today")
    with pytest.raises(comet.CometError):
        app.push({"type": "note", "listeners": ["refusing"]})
    conn = app.store._checkout()            # the one the push ran on
    try:
        assert conn.lent is None
        if server.kind == "mysql":
            assert conn.several
    finally:
        app.store._checkin(conn)
    assert list(app.store._query("SELECT 7")) == [(7,)]


def test_what_on_submit_writes_commits_with_the_package(notes_app):
    [recipient] = new_ids("recipient")
    package = note(recipient)

    push(notes_app.web, "sender", package)

    assert notes_app.notes([package["_stamp"]]) == {package["_stamp"]}


def test_what_on_submit_writes_is_rolled_back_when_a_later_hook_rejects(notes_app, server, url):
    [recipient] = new_ids("recipient")
    package = note(recipient, refuse=True)

    answer = push(notes_app.web, "sender", package, status=403)

    assert answer["error"] == "rejected"
    assert notes_app.notes([package["_stamp"]]) == set()
    assert list(server.query(url, "SELECT COUNT(*) FROM comet_packages WHERE stamp = %s",
                             (package["_stamp"],))) == [(0,)]


def test_rejected_package_in_a_batch_keeps_what_the_packages_before_it_wrote(notes_app):
    [recipient] = new_ids("recipient")
    kept, refused = note(recipient), note(recipient, refuse=True)

    answer = push(notes_app.web, "sender", [kept, refused], status=403)

    assert (answer["index"], answer["accepted"]) == (1, [kept["_stamp"]])
    assert notes_app.notes([kept["_stamp"], refused["_stamp"]]) == {kept["_stamp"]}


# --------------------------------------------------------------------------
# Retention
# --------------------------------------------------------------------------

@pytest.fixture
def group(request, server, tmp_path):
    group = open_group(server.kind, request, tmp_path)
    yield group
    group.app.close()


def test_a_slow_hook_holds_up_four_pushes_and_the_fifth_commits_in_another_batch(group):
    threads = [group.push("hold")]
    assert group.held.wait(10)
    threads += [group.push(f"queued {n}") for n in range(4)]
    group.wait_queued(thread.name for thread in threads[1:])
    threads.append(group.push("fifth"))
    wait_until(lambda: "fifth" in group.results)
    assert isinstance(group.results["fifth"], str) and len(group.results) == 1
    group.released.set()
    for thread in threads:
        thread.join(10)
    assert len(group.results) == 6 and all(isinstance(r, str) for r in group.results.values())
    assert group.flushes == [1, 5]
    assert group.delivered()[0] == "fifth" and len(group.delivered()) == 6


def test_a_stamp_claimed_by_an_open_transaction_elsewhere_waits_for_it_and_is_stored_once(
        group, server):
    """Two processes (two Comets on one database): the second push of a stamp waits
    on the first's claim and, once that commits, answers it accepted without its hooks."""
    other = make_app(store=group.url, poll_timeout=0.2)
    try:
        stamp = "claimed" + secrets.token_hex(8)
        package = {"type": "note", "listeners": ["to"], "to": ["bob"], "text": "hold", "_stamp": stamp}
        first = threading.Thread(target=lambda: group.results.update(first=group.app.push(dict(package))))
        first.start()
        assert group.held.wait(10)
        second = threading.Thread(target=lambda: group.results.update(second=other.push(dict(package))))
        second.start()
        # INNODB_TRX is a cache refreshed only when it was not read for 0.1 s: ask less often.
        wait_until(lambda: server.lock_waits(group.url) > 0, interval=0.2)
        group.released.set()
        first.join(10)
        second.join(10)
        assert group.results == {"first": stamp, "second": stamp}
        assert group.log() == ["hold"] and group.delivered() == ["hold"]
    finally:
        other.close()


def test_a_push_never_waits_for_another_pushs_claim_of_the_next_stamp(app, url):
    """A claim another transaction holds (its push under way) on the stamp next to a
    push's own in the stamps' order never holds up that push's commit.  MySQL held
    claims in comet_packages once, and inserting a package whose own claim it had
    just deleted under the same key locked the next key too: the push waited for the
    other transaction's end (or, that one waiting for the positions it held, the two
    deadlocked)."""
    other = make_app(store=url, poll_timeout=0.2)
    tag = secrets.token_hex(4)
    holding, release, held = threading.Event(), threading.Event(), {}

    def claim_and_hold():
        with other.store.transaction() as tx:
            held["taken"] = tx.claim_stamp(f"{tag}-b")
            holding.set()
            held["released"] = release.wait(10)

    thread = threading.Thread(target=claim_and_hold)
    thread.start()
    try:
        assert holding.wait(10) and held["taken"] is False
        done = threading.Event()
        pusher = threading.Thread(target=lambda: done.set() if app.push(
            {"type": "note", "listeners": "bob", "_stamp": f"{tag}-a"}) else None)
        pusher.start()
        assert done.wait(5), "the push waited for the other transaction's claim"
        pusher.join(5)
    finally:
        release.set()
        thread.join(10)
        other.close()
    assert held["released"]
    assert app.push({"type": "note", "listeners": "bob", "_stamp": f"{tag}-b"}) == f"{tag}-b"


def test_cursor_older_than_what_is_retained_is_reset(app):
    [recipient] = new_ids("recipient")
    cursor = poll(app.web, recipient)["cursor"]
    push(app.web, "sender", {"type": "message", "listeners": ["to"], "to": [recipient]})
    purge(app, app.store.now() + 1000)      # on the store's clock, which stamped it

    answer = poll(app.web, recipient, cursor)

    assert (answer["reset"], answer["packages"]) == (True, [])
    assert answer["cursor"] == poll(app.web, recipient)["cursor"]     # the head


def test_client_whose_packages_were_not_purged_is_not_reset(app):
    purged, kept = new_ids("purged", "kept")
    cursors = {client: poll(app.web, client)["cursor"] for client in (purged, kept)}
    push(app.web, "sender", {"type": "message", "listeners": ["to"], "to": [purged]})
    # On the store's clock (the database's, learnt to within half a round trip),
    # with room on both sides for that reading to move between two pushes.
    cutoff = app.store.now() + 100
    wait_until(lambda: app.store.now() >= cutoff + 100)
    later = push(app.web, "sender", {"type": "message", "listeners": ["to"], "to": [kept]})
    purge(app, cutoff)
    assert poll(app.web, purged, cursors[purged])["reset"] is True

    answer = poll(app.web, kept, cursors[kept])

    assert answer["reset"] is False
    assert [p["_stamp"] for p in answer["packages"]] == later["accepted"]


# --------------------------------------------------------------------------
# A store outage (kill -9 of the process that answered: test_multiprocess.py)
# --------------------------------------------------------------------------

class Outage:
    """A server process under push and poll load while its database server is
    stopped and started."""

    def __init__(self, url):
        self.url = url
        self.requests = []          # (kind, sent, answered, status, retry_after, stamp, to)
        self.stopped = self.started = None
        self.alive = self.recovered = None
        self.expected = {}          # recipient -> stamps answered 200
        self.delivered = {}         # recipient -> stamps polled back after the outage
        self.errors = []

    def count(self, kind, status, after):
        return sum(1 for r in list(self.requests)
                   if r[0] == kind and r[3] == status and r[1] > after)

    def run(self, database):
        senders, recipients = new_ids("sender0", "sender1"), new_ids("recipient0", "recipient1")
        with ServerProcess(self.url, poll_timeout=1, tail_interval=0.1) as server:
            cursors = {r: Client(server.url, r).poll()["cursor"] for r in recipients}
            stop = threading.Event()
            threads = [threading.Thread(target=self._pushing, args=(server, s, recipients, stop))
                       for s in senders]
            threads += [threading.Thread(target=self._polling, args=(server, r, cursors[r], stop))
                        for r in recipients]
            for thread in threads:
                thread.start()
            try:
                wait_until(lambda: self.count("push", 200, 0) >= 10, timeout=10)
                try:
                    database.stop()
                    self.stopped = time.monotonic()
                    _wait(lambda: self.count("push", 503, self.stopped) >= 3
                          and self.count("poll", 503, self.stopped) >= 3, timeout=10)
                finally:
                    database.start()
                    self.started = time.monotonic()
                self.recovered = _wait(lambda: self.count("push", 200, self.started) >= 3
                                       and self.count("poll", 200, self.started) >= 1, timeout=15)
                self.alive = server.proc.poll() is None
            finally:
                stop.set()
                for thread in threads:
                    thread.join(20)
            self._drain(server, cursors)

    def _pushing(self, server, sender, recipients, stop):
        client, n = Client(server.url, sender), 0
        while not stop.is_set() and n < 5000:
            to = recipients[n % len(recipients)]
            package = {"type": "load", "listeners": ["to"], "to": [to],
                       "_stamp": f"{sender}-{n:05d}"}
            self._request("push", lambda: client.push(package, timeout=15), package["_stamp"], to)
            n += 1
            stop.wait(0.01)                 # pace the load; not a synchronisation

    def _polling(self, server, recipient, cursor, stop):
        client, n = Client(server.url, recipient), 0
        while not stop.is_set() and n < 5000:
            query = "?cursor=" + urllib.parse.quote(cursor)
            status, _, body = self._request(
                "poll", lambda: client.request("GET", "/comet/poll" + query, timeout=15))
            if status == 200:
                cursor = body["cursor"]
            n += 1
            stop.wait(0.01)

    def _request(self, kind, send, stamp=None, to=None):
        sent = time.monotonic()
        try:
            status, headers, body = send()
        except Exception as error:          # no answer at all: recorded as status None
            self.errors.append(error)
            status, headers, body = None, {}, None
        self.requests.append((kind, sent, time.monotonic(), status,
                              headers.get("Retry-After"), stamp, to))
        return status, headers, body

    def _drain(self, server, cursors):
        for recipient, cursor in cursors.items():
            self.expected[recipient] = {r[5] for r in self.requests
                                        if r[0] == "push" and r[3] == 200 and r[6] == recipient}
            client, got = Client(server.url, recipient), set()
            client.cursor = cursor
            end = time.monotonic() + 15
            while not self.expected[recipient] <= got and time.monotonic() < end:
                got.update(p["_stamp"] for p in client.poll(timeout=10)["packages"])
            self.delivered[recipient] = got


def _wait(predicate, timeout):
    """``wait_until`` that answers False instead of raising."""
    try:
        wait_until(predicate, timeout=timeout)
    except AssertionError:
        return False
    return True


@pytest.fixture(scope="module")
def outage(server, url):
    """One outage of the server under load, shared by the tests below (a restart
    costs seconds).  PostgreSQL is stopped in immediate mode, as a crash would
    stop it: what it answered 200 for must come back from its WAL."""
    need(server.can_restart(), f"cannot stop and start {server.kind} here ({server.restart_needs})")
    record = Outage(url)
    record.run(server)
    return record


@pytest.mark.outage
def test_store_outage_answers_503_with_retry_after_within_10_s_never_500(outage):
    during = [r for r in outage.requests if outage.stopped <= r[1] < outage.started]
    first_503 = {kind: min((r[2] for r in during if r[0] == kind and r[3] == 503), default=None)
                 for kind in ("push", "poll")}

    assert collections.Counter(r[3] for r in outage.requests).keys() <= {200, 503}, \
        collections.Counter(r[3] for r in outage.requests)
    assert all(r[4] is not None and int(r[4]) >= 1 for r in outage.requests if r[3] == 503)
    assert all(t is not None and t - outage.stopped <= 10 for t in first_503.values()), first_503
    assert max(r[2] - r[1] for r in outage.requests) <= 10


@pytest.mark.outage
def test_server_process_stays_up_through_a_store_outage(outage):
    assert outage.alive is True


@pytest.mark.outage
def test_pushes_and_polls_succeed_again_when_the_store_is_back_without_restart(outage):
    assert outage.recovered is True


@pytest.mark.outage
def test_every_push_answered_200_around_a_store_outage_is_delivered(outage):
    assert all(outage.expected.values())
    for recipient, stamps in outage.expected.items():
        assert stamps - outage.delivered[recipient] == set(), recipient


# --------------------------------------------------------------------------
# Never skip: concurrent writers, real positions (two processes: test_multiprocess.py)
# --------------------------------------------------------------------------

def test_concurrent_pushers_on_one_store_never_make_a_cursor_skip(url):
    clients = new_ids(*(f"c{i}" for i in range(6)))
    packages = plan_packages(clients, 480, seed=1)
    app = make_app(store=url, poll_timeout=0.5, rate=(10000, 10000),
                   address_rate=(10000, 10000))
    try:
        with ThreadedServer(app) as server:
            traffic = run_traffic([server.url], [server.url], clients, packages,
                                  pushers=6, poll_timeout=0.5)
    finally:
        app.close()

    assert_no_cursor_skipped(traffic, packages, positions_in_store(url))

