"""A package broadcast to a whole channel is one row in the SQL stores, its
recipients found by the spans of membership (from the position a member
joined at to the one it left at): on SQLite, MySQL and PostgreSQL, every
member reads exactly what it was a recipient of when the package was
accepted, the tail finds the same recipients, a purge marks the members who
lost one, a join committed while a push was under way never reaches back,
and tables made before there were channel rows are upgraded."""

import contextlib
import random
import threading

import pytest
import webtest

import comet
from support import fresh_store, make_app, purge_all, record_queries, wait_until


@pytest.fixture(params=["sqlite", "mysql", "postgresql"])
def url(request, tmp_path):
    return fresh_store(request.param, request, tmp_path)


def open_app(url, **options):
    app = make_app(store=url, poll_timeout=1, presence_timeout=3600, **options)
    app.web = webtest.TestApp(app)
    return app


def push(app, client, package, status=200):
    return app.web.post_json("/comet/push", package, headers={"X-Client": client},
                             status=status).json


def recorder(app):
    """``{position: {recipient: body}}`` of every commit of ``app``, as it was accepted."""
    seen = {}
    commit = app.store.on_commit

    def record(appended):
        for position, _, delivered in appended:
            seen[position] = dict(delivered)
        commit(appended)
    app.store.on_commit = record
    return seen


def read_all(store, client, after=0):
    """Every ``(position, body)`` ``Store.read`` gives ``client`` after ``after``."""
    rows = []
    while True:
        head, page, lost = store.read(client, after, 7)     # a small page: paging is tested too
        assert not lost
        rows += [(position, body) for position, _, body in page]
        if len(page) < 7:
            return rows
        after = page[-1][0]


def expected(seen, client):
    return [(position, seen[position][client]) for position in sorted(seen)
            if client in seen[position]]


def count(store, sql):
    return store._query(sql)[0][0]


def test_members_read_exactly_what_they_were_recipients_of_when_it_was_accepted(url):
    app = open_app(url)
    try:
        seen = recorder(app)
        rng = random.Random(7)
        clients = [f"c{i}" for i in range(6)]
        members = set()
        for n in range(160):
            client = rng.choice(clients)
            kind = rng.choice(["join", "leave", "msg", "msg", "note", "note", "to", "two"])
            if kind == "join":
                push(app, client, {"type": "join", "listeners": ["room"]})
                members.add(client)
            elif kind == "leave" and client in members:
                push(app, client, {"type": "leave", "listeners": ["room"]})
                members.discard(client)
            elif kind == "msg" and client in members:
                push(app, client, {"type": "msg", "listeners": ["room"], "n": n})
            elif kind == "note":            # from the server: no membership check
                app.push({"type": "note", "listeners": ["room"], "n": n})
            elif kind == "to":              # to clients by name: delivery rows
                app.push({"type": "to", "listeners": ["to"], "to": rng.sample(clients, 2), "n": n})
            elif kind == "two":             # two channels: delivery rows
                app.push({"type": "two", "listeners": ["room", "room:b"], "n": n})
        assert count(app.store, "SELECT COUNT(*) FROM comet_packages WHERE channel IS NOT NULL") > 40
        assert count(app.store, "SELECT COUNT(*) FROM comet_deliveries d JOIN comet_packages p"
                                " ON p.pos = d.pos WHERE p.channel IS NOT NULL") == 0
        for client in clients + ["never"]:
            assert read_all(app.store, client) == expected(seen, client), client
        # From a cursor in the middle, too: a span begun before it, ended after it.
        middle = sorted(seen)[len(seen) // 2]
        for client in clients:
            assert read_all(app.store, client, middle) == [
                row for row in expected(seen, client) if row[0] > middle], client
        # The tail (what other processes read) finds the same recipients.
        head, appended = app.store.tail(0)
        assert {position: dict(delivered) for position, _, delivered in appended} == {
            position: recipients for position, recipients in seen.items()}
    finally:
        app.close()


def test_a_push_to_a_channel_of_500_members_writes_one_row(url):
    app = open_app(url)
    try:
        ids = [f"m{i:03d}" for i in range(500)]
        with app.store.transaction() as tx:
            for client in ids:
                tx.add_member("room", client, '"x"', app.store.now())
        packages = count(app.store, "SELECT COUNT(*) FROM comet_packages")
        deliveries = count(app.store, "SELECT COUNT(*) FROM comet_deliveries")
        app.push({"type": "note", "listeners": ["room"]})
        assert count(app.store, "SELECT COUNT(*) FROM comet_packages") == packages + 1
        assert count(app.store, "SELECT COUNT(*) FROM comet_deliveries") == deliveries
        head = app.store.head()
        assert all(read_all(app.store, client, head - 1)[0][0] == head for client in ids)
        # Tailored by on_emit, or not every member: a delivery row each, as before.
        app.action("note").on_emit(lambda package, recipient, private, db:
                                   package if recipient != "m000" else None)
        app.push({"type": "note", "listeners": ["room"]})
        assert count(app.store, "SELECT COUNT(*) FROM comet_deliveries") == deliveries + 499
        assert read_all(app.store, "m000", head) == []
    finally:
        app.close()


def test_a_push_reads_a_channels_members_again_only_once_members_changed(url):
    apps = [open_app(url), open_app(url)]           # two processes' stores on one database
    try:
        app, other = apps
        seen = recorder(app)
        with app.store.transaction() as tx:
            for client in ("a", "b"):
                tx.add_member("room", client, '"x"', app.store.now())
        app.push({"type": "note", "listeners": ["room"]})
        assert set(seen[app.store.head()]) == {"a", "b"}
        # Behind the store's back, with comet_meta.changes as it was: the members known
        # are used, not read again.
        with app.store._connection() as conn:
            app.store._execute(conn.cursor(), "DELETE FROM comet_members WHERE client = ?",
                               ("b",))
            conn.commit()
        app.push({"type": "note", "listeners": ["room"]})
        assert set(seen[app.store.head()]) == {"a", "b"}
        # A join the other store commits counts in comet_meta.changes: read again.
        with other.store.transaction() as tx:
            tx.add_member("room", "c", '"x"', other.store.now())
        app.push({"type": "note", "listeners": ["room"]})
        assert set(seen[app.store.head()]) == {"a", "c"}
        with other.store.transaction() as tx:
            tx.remove_member("room", "a")
        app.push({"type": "note", "listeners": ["room"]})
        assert set(seen[app.store.head()]) == {"c"}
    finally:
        for app in apps:
            app.close()


def test_a_transaction_that_changed_members_reads_them_with_its_own_changes(url):
    app = open_app(url)
    try:
        with app.store.transaction() as tx:
            tx.add_member("room", "a", '"x"', app.store.now())
        app.push({"type": "note", "listeners": ["room"]})       # the members now known
        with app.store.transaction() as tx:
            tx.add_member("room", "d", '"x"', app.store.now())
            assert sorted(tx.member_ids("room")) == ["a", "d"]
            tx.remove_member("room", "a")
            assert sorted(tx.member_ids("room")) == ["d"]
        with app.store.transaction() as tx:
            assert sorted(tx.member_ids("room")) == ["d"]
        # Undone with its savepoint: the members as committed again.
        with contextlib.suppress(RuntimeError), app.store.transaction() as tx:
            with tx.savepoint():
                tx.add_member("room", "e", '"x"', app.store.now())
                assert sorted(tx.member_ids("room")) == ["d", "e"]
                raise RuntimeError("undone")
        with app.store.transaction() as tx:
            assert sorted(tx.member_ids("room")) == ["d"]
    finally:
        app.close()


def test_the_members_known_are_bounded_the_longest_read_forgotten_first():
    known = comet._Members(most=10)
    known.put("a", 1, ["x"] * 4)
    known.put("b", 1, ["y"] * 4)
    known.put("a", 2, ["x"] * 5)                # read again: now the latest
    assert known.get("a") == (2, ("x",) * 5) and known.get("b") == (1, ("y",) * 4)
    known.put("c", 1, ["z"] * 3)                # 12 ids: b, the longest read, goes
    assert known.get("b") is None and known.get("a") and known.get("c")
    known.put("d", 1, ["w"] * 11)               # more than all: not kept
    known.put("e", None, [])                    # no count read with it: not kept
    assert known.get("d") is None and known.get("e") is None and known._size == 8


def test_a_purged_channel_row_marks_the_members_it_reached_and_its_spans_go(url):
    app = open_app(url)
    try:
        push(app, "a", {"type": "join", "listeners": ["room"]})
        push(app, "b", {"type": "join", "listeners": ["room"]})
        push(app, "b", {"type": "leave", "listeners": ["room"]})
        before_c = app.store.head()
        push(app, "c", {"type": "join", "listeners": ["room"]})
        last = app.store.head()
        app.push({"type": "note", "listeners": ["room"]})
        assert count(app.store, "SELECT COUNT(*) FROM comet_spans") == 3
        purge_all(app.store, app.store.now() + 1000)
        marks = dict(app.store._query("SELECT recipient, pos FROM comet_purged"))
        assert {comet._text(k): v for k, v in marks.items()} == {
            "a": last + 1, "b": 3, "c": last + 1}
        assert app.store.read("c", before_c, 10)[2]         # lost its join and the note
        assert not app.store.read("d", before_c, 10)[2]     # never a member: lost nothing
        # b's span ended before everything purged: gone; a's and c's are open.
        assert sorted(comet._text(row[0]) for row in app.store._query(
            "SELECT client FROM comet_spans")) == ["a", "c"]
    finally:
        app.close()


def test_joins_and_leaves_with_no_package_between_leave_no_span_and_no_error(url):
    """Members enrolled and removed by the application, no package in between: each
    change is at the next position, so a span would begin and end at one position."""
    app = open_app(url)
    try:
        for _ in range(3):
            for joined in (True, False):
                with app.store.transaction() as tx:
                    if joined:
                        tx.add_member("room", "x", '"x"', app.store.now())
                    else:
                        assert tx.remove_member("room", "x")
        with app.store.transaction() as tx:       # and in one transaction
            tx.add_member("room", "x", '"x"', app.store.now())
            tx.remove_member("room", "x")
        push(app, "a", {"type": "join", "listeners": ["room"]})
        head = app.store.head()
        assert read_all(app.store, "x") == []
        assert [p for p, _ in read_all(app.store, "a")] == [head]
        assert count(app.store, "SELECT COUNT(*) FROM comet_spans") == 1
    finally:
        app.close()


@pytest.mark.parametrize("kind, way", [("mysql", "with_the_commit"),
                                       ("mysql", "positions_first"),
                                       ("postgresql", "with_the_positions"),
                                       ("postgresql", "after_the_positions")])
def test_a_join_committed_while_a_push_is_under_way_does_not_reach_back(
        request, tmp_path, monkeypatch, kind, way):
    """Two processes (here two stores) on one database: a push reads the members,
    then, before its commit, another process's join commits.  The push keeps the
    recipients it read: it writes delivery rows, and the joiner reads nothing of it.
    MySQL's UPDATE taking the positions finds it: sent with the inserts and the
    COMMIT, it fails (an overflow), nothing after it runs, and the push takes the
    positions again, as it does first (``positions_first``) without JSON_TABLE;
    PostgreSQL in the statement taking the positions, the members read going
    with it, or after it (more members than a flush sends)."""
    if way == "after_the_positions":
        monkeypatch.setattr(comet.PostgreSQLStore, "_fold_members", 0)
    url = fresh_store(kind, request, tmp_path)
    app, other = open_app(url), open_app(url)
    if way == "positions_first":
        app.store._json_table = False
    try:
        push(app, "a", {"type": "join", "listeners": ["room"]})
        read, joined = threading.Event(), threading.Event()

        @app.action("slow").on_emit
        def slow(package, recipient, private, db):
            read.set()                      # the members were read: let the join commit
            assert joined.wait(10)
            return package

        def join():
            assert read.wait(10)
            with other.store.transaction() as tx:
                tx.add_member("room", "late", '"late"', other.store.now())
            joined.set()
        joiner = threading.Thread(target=join)
        joiner.start()
        sent = record_queries(monkeypatch) if kind == "mysql" else []
        stamp = app.push({"type": "slow", "listeners": ["room"]})
        joiner.join(10)
        if way == "with_the_commit":        # the query stopped at its UPDATE; as before
            assert sent[-3:] == ["UPDATE+INSERT+COMMIT", "UPDATE", "INSERT+INSERT+COMMIT"]
        [(position, channel)] = app.store._query(
            "SELECT pos, channel FROM comet_packages WHERE stamp = %s", (stamp,))
        assert channel is None
        assert [p for p, _ in read_all(app.store, "a")][-1] == position
        assert read_all(app.store, "late") == []
        # Without a join in between, the next push is one row again, and both have it.
        stamp = app.push({"type": "note", "listeners": ["room"]})
        [(position, channel)] = app.store._query(
            "SELECT pos, channel FROM comet_packages WHERE stamp = %s", (stamp,))
        assert comet._text(channel) == "room"
        assert [p for p, _ in read_all(app.store, "late")] == [position]
    finally:
        app.close()
        other.close()


def test_a_mysql_push_to_a_channel_checks_its_members_in_the_statement_taking_positions(
        request, tmp_path, monkeypatch):
    """The race check above costs no round trip of its own: the UPDATE taking the
    positions, sent with the package and the COMMIT, fails only if the members
    changed since they were read."""
    app = open_app(fresh_store("mysql", request, tmp_path))
    try:
        push(app, "a", {"type": "join", "listeners": ["room"]})
        sent = record_queries(monkeypatch)
        stamp = app.push({"type": "note", "listeners": ["room"]})
        # Its START goes with the members' read, and the package with the COMMIT.
        assert sent == ["START+SELECT", "UPDATE+INSERT+COMMIT"]
        [(channel,)] = app.store._query("SELECT channel FROM comet_packages WHERE stamp = %s",
                                        (stamp,))
        assert comet._text(channel) == "room"
    finally:
        app.close()


def test_pushes_joins_and_leaves_from_two_processes_at_once_read_as_accepted(url):
    """Both stores' commits recorded as accepted; then every client's reads agree."""
    apps = [open_app(url), open_app(url)]
    try:
        seen = {}
        for app in apps:
            seen_here = recorder(app)
            app._seen_here = seen_here
        clients = [f"k{i}" for i in range(8)]
        errors = []

        def work(index):
            rng = random.Random(index)
            app = apps[index % 2]
            mine = [c for c in clients if int(c[1:]) % 4 == index]
            try:
                for n in range(40):
                    client = rng.choice(mine)
                    kind = rng.choice(["join", "leave", "note", "note"])
                    if kind == "note":
                        app.push({"type": "note", "listeners": ["room"], "by": index, "n": n})
                    else:
                        with app.store.transaction() as tx:
                            if kind == "join":
                                tx.add_member("room", client, '"x"', app.store.now())
                            else:
                                tx.remove_member("room", client)
            except Exception as error:      # reported below
                errors.append(error)
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors
        for app in apps:
            seen.update(app._seen_here)
        store = apps[0].store
        wait_until(lambda: store.head() == max(seen))
        for client in clients:
            assert read_all(store, client) == expected(seen, client), client
    finally:
        for app in apps:
            app.close()


def test_tables_made_before_channel_rows_are_upgraded_and_members_keep_getting_packages(url):
    app = open_app(url)
    push(app, "a", {"type": "join", "listeners": ["room"]})
    push(app, "b", {"type": "join", "listeners": ["room"]})
    app.close()
    store = comet.open_store(url)
    with store._connection() as conn:       # as an earlier version left them
        cur = conn.cursor()
        index = "DROP INDEX comet_packages_channel"
        for sql in (index + (" ON comet_packages" if url.startswith("mysql") else ""),
                    "ALTER TABLE comet_packages DROP COLUMN channel",
                    "ALTER TABLE comet_meta DROP COLUMN changes", "DROP TABLE comet_spans"):
            cur.execute(sql)
        if not url.startswith("sqlite"):
            conn.commit()
    store.close()
    app = open_app(url)
    try:
        head = app.store.head()
        app.push({"type": "note", "listeners": ["room"]})
        push(app, "c", {"type": "join", "listeners": ["room"]})
        assert count(app.store, "SELECT COUNT(*) FROM comet_packages WHERE channel IS NOT NULL") == 2
        assert [p for p, _ in read_all(app.store, "a", head)] == [head + 1, head + 2]
        assert [p for p, _ in read_all(app.store, "c", head)] == [head + 2]
        assert [p for p, _ in read_all(app.store, "b", head)] == [head + 1, head + 2]
    finally:
        app.close()


def test_a_store_of_its_own_whose_append_takes_no_channel_still_broadcasts():
    """A ``Store`` written for the protocol without channel rows (``channel_rows``
    false, ``append`` of four arguments) is never handed a channel."""
    class OwnStore(comet.MemoryStore):
        @contextlib.contextmanager
        def transaction(self):
            with super().transaction() as tx:
                append = tx.append
                tx.append = lambda stamp, ts, body, deliveries: append(stamp, ts, body, deliveries)
                yield tx

    app = open_app(OwnStore())
    try:
        push(app, "a", {"type": "join", "listeners": ["room"]})
        push(app, "b", {"type": "join", "listeners": ["room"]})
        push(app, "a", {"type": "msg", "listeners": ["room"]})
        app.push({"type": "note", "listeners": ["room"]})
        head = app.store.head()
        assert [p for p, _, _ in app.store.read("b", 1, 10)[1]] == [head - 2, head - 1, head]
    finally:
        app.close()
