"""comet.py -- real-time messaging for any WSGI application, by HTTP long polling.

One file, standard library only.  Wrap a WSGI application and its pages can
push packages to named listeners, channels with presence, or single clients,
and receive them exactly once, through a database (memory, SQLite, MySQL or
PostgreSQL) that every process and host shares::

    from comet import Comet

    comet = Comet(app, store="sqlite:///chat.db")
    room = comet.channel("home")            # join / leave / members
    rooms = comet.channels("room:")         # room:1, room:2, ...: channels in every process

    # the page:  <script src="/scripts/comet.js"></script>
    #   comet.start();
    #   comet.ping.message = function (pkg) { show(pkg.sender, pkg.text); };
    #   comet.push({type: "join", listeners: ["home"]});
    #   comet.push({type: "message", listeners: ["home"], text: "Hello!"});

The way of one package: ``POST /comet/push`` -> ``Comet._serve_push`` ->
``Comet._accept`` (validation, hooks and recipients, in one store transaction)
-> ``Store`` (a position in the log and a delivery row per recipient) ->
``_Parking.wake`` -> the recipient's parked ``GET /comet/poll`` ->
``Comet._poll`` reads it back after the client's cursor.

A Python rebirth of Comet.js v0.5 (node.js, 2013).  MIT licence.
"""

import _thread
import base64
import bisect
import collections
import contextlib
import copy
import errno
import functools
import hashlib
import http
import ipaddress
import itertools
import json
import logging
import math
import operator
import os
import re
import secrets
import select
import socket
import sqlite3
import struct
import sys
import threading
import time
import urllib.parse
import weakref

__version__ = "0.6.0"
__all__ = ["Comet", "CometError", "Reject", "Store", "MemoryStore",
           "SQLiteStore", "MySQLStore", "PostgreSQLStore", "open_store"]

log = logging.getLogger("comet")


# --------------------------------------------------------------------------
# Errors and helpers
# --------------------------------------------------------------------------

class CometError(Exception):
    """A refusal: an HTTP ``status``, an error ``code`` and a ``message``.

    Raised where the problem is found; ``Comet`` turns it into the JSON
    answer ``{"error": code, "message": message}`` in one place.
    """

    def __init__(self, status, code, message, retry_after=None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.fields = {}            # extra answer fields: a batch's index and accepted

    def body(self):
        return dict(error=self.code, message=str(self.message), **self.fields)


class Reject(CometError):
    """Raised by a hook to refuse a package: 403 ``rejected`` with its message."""

    def __init__(self, message="rejected"):
        super().__init__(403, "rejected", message)


def _bad_package(message):
    return CometError(400, "bad_package", message)


def _unavailable(message):
    return CometError(503, "unavailable", message, retry_after=1)


_STAMP = re.compile(r"[A-Za-z0-9_-]{8,64}\Z")
_SID = re.compile(r"(?:^|;)\s*comet_sid=([A-Za-z0-9_-]{22,64})\s*(?:;|$)")
_CURSOR = re.compile(r"(.*)\.([0-9]{1,19})", re.DOTALL)    # STOREID.POSITION, ASCII digits
# int() would also take "+5", " 5", "1_0" and other scripts' digits
_LENGTH = re.compile(r"[0-9]+")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")    # in a body: faster than bytes.find
_PAGE = 500                         # packages in one poll answer, at most
_MAX_ID = 256                       # characters in a client id or a channel name, at most
_MAX_DEPTH = 100                    # arrays and objects nested in a package, at most
_CONTAINERS = {dict, list}          # what the JSON parser makes them of
_MAX_POSITION = 2 ** 63 - 1         # a position no store issues past (SQL's BIGINT)
_WINDOW_BYTES = 16 << 20            # a process's window of recent deliveries, at most
_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)
_PURGE_ROWS = 1000                  # rows one purge step deletes, at most: a few ms of the writer
_MARKS_KEPT = 300_000               # ms a purge mark is kept at least, however short retention is
_GAP_WAIT = 10.0                    # seconds a tail waits for a package missing below the head


def _now_ms():
    return int(time.time() * 1000)


def _new_stamp():
    return secrets.token_urlsafe(12)


def _finite(text):
    number = float(text)
    if not math.isfinite(number):
        raise ValueError("number out of range")
    return number


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def _loads(data):
    """Parse a push body strictly, or refuse it with 400 ``bad_json``: UTF-8, no
    NaN or Infinity, no package nested deeper than ``_MAX_DEPTH`` (so copying
    and encoding it cannot run out of stack), and text that is Unicode (no lone
    UTF-16 surrogate, which ``JSON.stringify`` sends for a string cut inside an
    emoji, and which no UTF-8 encoder after this one would take)."""
    try:
        value = json.loads(data.decode("utf-8"), parse_float=_finite,
                           parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise CometError(400, "bad_json", "the body is not UTF-8 JSON") from None
    depth = _MAX_DEPTH + isinstance(value, list)     # a batch's array is not a package's level
    # Both checks cost a walk of the body only when a quick scan says they may fail.
    if data.count(b"[") + data.count(b"{") > depth and _nested_over(value, depth):
        raise CometError(400, "bad_json", f"a package nests deeper than {_MAX_DEPTH} levels")
    if _SURROGATE_ESCAPE.search(data) and not _encodable(value):
        raise CometError(400, "bad_json",
                         "the body holds a lone UTF-16 surrogate: text must be Unicode")
    return value


def _nested_over(value, limit):
    """True when ``value`` nests more than ``limit`` JSON arrays and objects,
    found level by level (no recursion, no stack to run out of)."""
    level = [value] if type(value) in _CONTAINERS else []
    for _ in range(limit):
        if not level:
            return False
        level = [child for item in level for child in
                 (item.values() if type(item) is dict else item) if type(child) in _CONTAINERS]
    return bool(level)


def _encodable(value):
    """True when ``value`` is JSON that encodes to UTF-8."""
    try:
        _dumps(value).encode("utf-8")
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def _unicode(text):
    """True when ``text`` (a str) encodes to UTF-8: no lone surrogate."""
    return text.isascii() or not _SURROGATE.search(text)


def _green():
    """True when threads are green (gevent's or eventlet's monkey patching)."""
    return type(threading.Lock()).__module__ != "_thread"


def _gevent():
    """True when the green threads are gevent's (its Event in place of threading's)."""
    return threading.Event.__module__.startswith("gevent")


def _section_lock():
    """The lock of short sections of plain Python that never wait inside (no I/O, no
    other lock taken).  Green threads switch only where one waits, so none enters
    such a section while another is in it, and a green lock's acquire and release
    are Python code costing more than the section.  For them it is the compiled
    RLock that monkey patching leaves alone: it still keeps out a real thread (a
    thread pool's), and lets through every green thread of the thread holding it."""
    if _green() and hasattr(_thread, "RLock"):
        return _thread.RLock()
    return threading.Lock()


def _single_recipient(listeners):
    """The client id a single listener names (a string, or the integer n: ``str(n)``),
    or None when it names none: not 1 to ``_MAX_ID`` characters of Unicode, a bool."""
    if isinstance(listeners, int) and not isinstance(listeners, bool):
        # Too long anyway; str() refuses past 4,300 digits.
        if listeners.bit_length() > 4 * _MAX_ID:
            return None
        listeners = str(listeners)
    if isinstance(listeners, str) and 0 < len(listeners) <= _MAX_ID and _unicode(listeners):
        return listeners
    return None


def _client_ids(found):
    """``found`` when it is a list of client ids that are all plain strings, checked
    at once (the common case, and a channel of thousands costs microseconds);
    else None, and each is checked on its own."""
    if set(map(type, found)) <= {str} and (not found or (
            min(map(len, found)) > 0 and max(map(len, found)) <= _MAX_ID
            and _unicode("".join(found)))):
        return found
    return None


def _text(value):
    """An id read back from a store: VARBINARY columns come back as bytes."""
    return value.decode() if isinstance(value, bytes) else value


def _texts(values):
    """A column of ids read back from a store, as ``_text`` makes each."""
    values = list(values)
    return [_text(value) for value in values] if bytes in set(map(type, values)) else values


def _public_id(sid):
    """The client id of a ``comet_sid`` cookie.  The id is the default sender, so
    every recipient sees it: a hash of the cookie, never the cookie itself, which
    would let them poll and push as this client."""
    return base64.urlsafe_b64encode(hashlib.sha256(sid.encode()).digest())[:22].decode()


def _dumps(value):
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False)


# --------------------------------------------------------------------------
# Stores
# --------------------------------------------------------------------------

class Store:
    """The protocol every store implements; ``Comet`` uses nothing else.

    A store keeps a log of packages, each at a *position* (an integer that
    grows in commit order: once position p is visible, every smaller
    position that will ever be visible already is), a delivery row per
    (recipient, position), channel members and when each client last polled.
    The SQL stores keep a package broadcast to a whole channel as one row,
    its recipients found by when each member joined and left (see
    ``_SQLStore``).

    Attributes: ``url`` (for ``stats``, no password), ``id`` (a short token
    naming this store in cursors; durable stores keep it in the database),
    ``shared`` (other processes may write it, so ``Comet`` tails it),
    ``holds_nul`` (client ids and channel names may hold U+0000: ``Comet``
    refuses them before they reach a store that cannot).

    ``transaction()`` is a context manager yielding a transaction ``tx``
    that commits on a clean exit and rolls back on an exception.  ``tx.db``
    is the DB-API connection handed to hooks (``None`` for memory), and:

    - ``tx.savepoint()``: a context manager; an exception inside undoes only
      what was done inside (one package of a batch);
    - ``tx.claim_stamp(stamp)``: True when a package with this stamp was
      accepted (or is being, in a transaction that then commits, this one
      included); else the stamp is this transaction's until it ends (or the
      savepoint it was claimed in is undone);
    - ``tx.append(stamp, ts, body, deliveries, channel=None)``: store a
      package (``body`` its JSON) for ``deliveries``, a list of ``(recipient,
      body or None)``, None meaning ``body``, under a stamp claimed or freshly
      made; raises ``CometError`` 413 if a body is larger than the store keeps
      (checked here, so that nothing of this package can fail the commit
      later).  ``channel`` (given only to a store whose ``channel_rows`` is
      true): the recipients are exactly that channel's members as
      ``tx.member_ids`` read them, each getting ``body``;
    - ``tx.is_member(channel, client)``, ``tx.member_ids(channel)`` (given
      ``sender=`` too by a store whose ``assumes_members`` is true: the members
      are for a broadcast of ``sender``'s own, sent as a channel row with
      nothing tailored; the store may take them as it last read them if
      ``sender`` was among them, and must then check at the commit that none
      changed since, and if one did, read them again and refuse that push with
      ``CometError`` 403 if ``sender`` left),
      ``tx.add_member(channel, client, sender_json, ts)``,
      ``tx.remove_member(channel, client) -> bool`` (True for the one
      transaction that removed it);

    After each commit the store calls ``on_commit`` (set by ``Comet``) with
    what it appended, ``[(position, ts, [(recipient, body)])]`` in position
    order, each body as that recipient receives it (one string object for
    every recipient that gets the package as stored); once per commit,
    before the transactions in it return.

    Times (``ts``, ``before``) are ms since the epoch on the store's clock,
    ``now()``: the one clock that every process sharing the store compares
    times by, whatever its own host's clock says.

    Outside transactions, each raising ``CometError`` 503 when the database
    cannot be reached:
    """

    url = ""
    id = ""
    shared = False
    channel_rows = False                    # append takes ``channel``: see above
    assumes_members = False                 # member_ids takes ``sender``: see above
    holds_nul = True
    on_commit = None

    def _committed(self, appended):
        if appended and self.on_commit is not None:
            try:
                self.on_commit(appended)
            except Exception:
                log.exception("comet: on_commit failed")

    def transaction(self):
        raise NotImplementedError

    def now(self):
        """The store's clock, in ms since the epoch (the host's, unless hosts share the store)."""
        return _now_ms()

    def head(self):
        """The newest committed position."""
        raise NotImplementedError

    def read(self, recipient, after, limit):
        """``(head, rows, lost)``: up to ``limit`` rows ``(position, ts, body)``
        for ``recipient`` after position ``after`` and at or before ``head``;
        ``lost`` is true when one of its packages after ``after`` was purged,
        or when ``after`` is older than the purge marks still kept (see ``purge``)."""
        raise NotImplementedError

    def tail(self, after):
        """``(head, appended)``: every package after position ``after`` and at or
        before ``head``, shaped as ``on_commit`` gets them (one body object per
        position, shared by the recipients that get it as stored)."""
        raise NotImplementedError

    def members(self, channel):
        """``{client: sender}`` of a channel."""
        raise NotImplementedError

    def touch(self, clients, ts):
        """Record that ``clients`` polled at ``ts``."""
        raise NotImplementedError

    def stale_members(self, before):
        """``[(channel, client, sender)]`` for members not seen since ``before``."""
        raise NotImplementedError

    def purge(self, before):
        """One short step of forgetting, in this order: packages stored before
        ``before`` and their delivery rows (a recipient that loses one keeps a
        purge mark, so that its older cursor is answered ``reset``); purge marks
        written before ``before``, and at least ``_MARKS_KEPT`` ago (a cursor older
        than the newest mark forgotten is answered ``reset`` whatever its client
        lost); clients not seen since
        ``before`` that are no channel's members.  Each step deletes a bounded
        number of rows; returns True while there is more to do."""
        raise NotImplementedError

    def listen(self, callback):
        """Call ``callback(head)`` from a thread of the store's soon after another
        process commits through position ``head`` (None: commits may have been
        missed, as when the store reconnects).  Stores that cannot do nothing, and
        ``Comet`` finds other processes' commits by tailing every ``tail_interval``."""

    def close(self):
        """Release connections."""


class MemoryStore(Store):
    """Everything in this process's memory: fast, gone on restart."""

    url = "memory:"

    def __init__(self):
        self.id = secrets.token_hex(4)      # a restart makes old cursors foreign
        self._writer = threading.RLock()    # one transaction at a time, as in SQLite
        self._lock = _section_lock()        # the committed state below, held briefly
        self._head = 0
        self._log = collections.deque()     # (position, ts, stamp, deliveries), oldest first
        self._inbox = collections.defaultdict(list)     # recipient -> [(position, ts, body)]
        self._lost = {}                     # recipient -> its newest purged position
        self._purges = collections.deque([(0, 0)])  # (purged through, when); the first is the floor
        self._stamps = set()
        self._members = {}                  # channel -> {client: (sender_json, joined)}
        self._seen = {}                     # client -> ts of the last poll

    @contextlib.contextmanager
    def transaction(self):
        with self._writer:
            tx = _MemoryTransaction(self)
            yield tx
            tx.commit()
        self._committed(tx.appended)

    def head(self):
        return self._head

    def read(self, recipient, after, limit):
        with self._lock:
            inbox = self._inbox.get(recipient, ())
            start = bisect.bisect_right(inbox, (after, math.inf))    # past every row at after
            lost = self._lost.get(recipient, 0) > after or after < self._purges[0][0]
            return self._head, inbox[start:start + limit], lost

    def members(self, channel):
        with self._lock:
            return {client: json.loads(sender)
                    for client, (sender, _) in self._members.get(channel, {}).items()}

    def touch(self, clients, ts):
        with self._lock:
            self._seen.update(dict.fromkeys(clients, ts))

    def stale_members(self, before):
        with self._lock:
            return [(channel, client, json.loads(sender))
                    for channel, members in self._members.items()
                    for client, (sender, joined) in members.items()
                    if self._seen.get(client, joined) < before]

    def purge(self, before):
        now = self.now()
        with self._lock:                    # polls wait for this: a bounded step at a time
            deleted = 0
            while self._log and self._log[0][1] < before and deleted < _PURGE_ROWS:
                position, _, stamp, deliveries = self._log.popleft()
                self._stamps.discard(stamp)
                for recipient, _ in deliveries:
                    inbox = self._inbox[recipient]
                    del inbox[0]
                    self._lost[recipient] = position
                    if not inbox:
                        del self._inbox[recipient]
                deleted += 1 + len(deliveries)
            if deleted:
                self._purges.append((position, now))
                return True
            while len(self._purges) > 1 and self._purges[1][1] < min(before, now - _MARKS_KEPT):
                self._purges.popleft()      # the floor rises before the marks below it go
            floor = self._purges[0][0]
            forgotten = [r for r, position in self._lost.items() if position <= floor]
            members = {client for members in self._members.values() for client in members}
            gone = [c for c, seen in self._seen.items() if seen < before and c not in members]
            for recipient in forgotten[:_PURGE_ROWS]:
                del self._lost[recipient]
            for client in gone[:_PURGE_ROWS]:
                del self._seen[client]
            return len(forgotten) > _PURGE_ROWS or len(gone) > _PURGE_ROWS


class _MemoryTransaction:
    """Changes kept aside until commit; the store's writer lock is held."""

    db = None

    def __init__(self, store):
        self._store = store
        self._packages = []                 # (stamp, ts, body, deliveries)
        self._changes = []                  # (channel, client, sender_json or None, ts)
        self._stamps = []                   # claimed or appended here, in order
        self.appended = []

    @contextlib.contextmanager
    def savepoint(self):
        marks = len(self._packages), len(self._changes), len(self._stamps)
        try:
            yield
        except BaseException:
            del self._packages[marks[0]:]
            del self._changes[marks[1]:]
            del self._stamps[marks[2]:]
            raise

    def claim_stamp(self, stamp):
        # Claimed from the moment it is looked up, as the SQL stores' claim row: a hook
        # pushing the stamp of the package it is running for pushes that package again.
        if stamp in self._store._stamps or stamp in self._stamps:
            return True
        self._stamps.append(stamp)
        return False

    def append(self, stamp, ts, body, deliveries):
        self._packages.append((stamp, ts, body, deliveries))
        self._stamps.append(stamp)          # a stamp the server made was never claimed

    def member_ids(self, channel):
        members = set(self._store._members.get(channel, ()))
        for changed, client, sender, _ in self._changes:
            if changed == channel:
                (members.add if sender is not None else members.discard)(client)
        return members

    def is_member(self, channel, client):
        return client in self.member_ids(channel)

    def add_member(self, channel, client, sender, ts):
        self._changes.append((channel, client, sender, ts))

    def remove_member(self, channel, client):
        present = self.is_member(channel, client)
        if present:
            self._changes.append((channel, client, None, None))
        return present

    def commit(self):
        store = self._store
        with store._lock:
            for stamp, ts, body, deliveries in self._packages:
                store._head += 1
                position = store._head
                delivered = [(recipient, tailored or body) for recipient, tailored in deliveries]
                row = position, ts, body    # shared by every recipient of the package as stored
                for recipient, tailored in deliveries:
                    store._inbox[recipient].append(
                        row if tailored is None else (position, ts, tailored))
                store._log.append((position, ts, stamp, deliveries))
                store._stamps.add(stamp)
                self.appended.append((position, ts, delivered))
            for channel, client, sender, ts in self._changes:
                members = store._members.setdefault(channel, {})
                if sender is None:
                    members.pop(client, None)
                else:
                    members[client] = (sender, ts)


def _json_text(values):
    """``values`` as JSON for the database to take apart: UTF-8 as it is (a string
    the database cannot store fails as it would as a value of its own)."""
    return json.dumps(values, ensure_ascii=False, separators=(",", ":"))


def _escaped_size(value):
    """No fewer than the bytes ``value`` takes in a statement: PyMySQL writes values
    into its text, escaping quotes and backslashes (twice the UTF-8 at worst)."""
    if isinstance(value, str):
        return 2 * (len(value) if value.isascii() else 4 * len(value)) + 8
    return 24


class _Slots:
    """At most ``n`` of something held at once (a pool's connections).

    ``threading.Semaphore`` would do, but its condition rests on a plain lock,
    and a condition asks whether its lock is held by trying to take it again.
    Under gevent a lock that cannot be taken at once first lets every ready
    greenlet run, so every release did: a push on SQLite, between its commit
    and its answer, waited there for all the polls it had just woken.  An
    RLock knows its owner without a try.
    """

    def __init__(self, n):
        self._free = n
        self._cond = threading.Condition(threading.RLock())

    def acquire(self, timeout):
        with self._cond:
            if not self._cond.wait_for(lambda: self._free, timeout):
                return False
            self._free -= 1
            return True

    def release(self):
        with self._cond:
            self._free += 1
            self._cond.notify()


class _Members:
    """Channels' members as transactions last read them, each with comet_meta.changes
    as the read saw it (``_SQLTransaction._members_now``): a push to a channel whose
    members did not change reads one number, not every member.  At most ``most``
    member ids in all; the channels read longest ago are forgotten first."""

    def __init__(self, most=100_000):
        self._most = most
        self._size = 0
        self._known = {}                    # channel -> (changes, ids)
        self._lock = threading.Lock()

    def get(self, channel):
        """``(changes, ids)`` as last read, or None."""
        return self._known.get(channel)

    def put(self, channel, changes, ids):
        if changes is None or len(ids) > self._most:
            return
        with self._lock:
            old = self._known.pop(channel, None)
            self._size += len(ids) - (len(old[1]) if old else 0)
            self._known[channel] = changes, tuple(ids)
            while self._size > self._most:
                self._size -= len(self._known.pop(next(iter(self._known)))[1])


class _SQLStore(Store):
    """What SQLite, MySQL and PostgreSQL share: the tables, the queries, a connection pool.

    Queries are written with ``?`` placeholders; a subclass with another
    paramstyle sets ``_placeholder``.  Subclasses supply ``_connect``,
    ``_schema``, ``_begin``, ``_take_positions`` (or a ``_flush`` of their
    own) and ``_errors`` (driver exceptions meaning the database is
    unavailable), and ``_upsert`` where ``REPLACE`` is not SQL the database
    speaks.

    A package broadcast to a whole channel (every member getting it as
    stored) is one row of comet_packages naming the channel, whatever the
    channel's size: no delivery row is written for it.  Its recipients are
    the clients whose *span* in comet_spans covers its position: a span is
    written when a client joins (from the position of the first package the
    join's transaction stores, its own join package included) and closed when
    it leaves (at the position after the leave package), so the members a
    read finds at a position are the members the push saw.  Two pushes
    cannot disagree about that order: where transactions run side by side
    (MySQL, PostgreSQL), a batch whose channel members were read before
    another transaction's join or leave committed (comet_meta.changes, a count
    of the transactions that changed members, has grown since its read) writes
    delivery rows for those packages instead.
    """

    shared = True
    channel_rows = True
    _clock = None                           # SQL for the database's clock in ms (hosts share it)
    _offset = 0                             # the database's clock minus this host's, in ms
    _placeholder = "?"
    _errors = ()
    _insert_ignore = "INSERT OR IGNORE"
    _max_variables = 999                    # values bound in one statement (SQLite before 3.32)
    _statement_bytes = math.inf             # the text of one statement, at most (MySQL: a packet)
    _max_text = 1_000_000_000               # bytes of a body or a sender (SQLite's longest string)
    _max_sender = _max_text
    _pool_size = 32
    _batch_parts = 64                       # transactions sharing one commit, at most
    _batches = 1                            # batches open at once in a process
    _batch_queue = 4                        # parts waiting in each before another opens
    _turn_timeout = 10                      # seconds a part waits for its turn, then 503 busy
    _one_writer = False                     # SQLite: this process's batches queue on a lock
    _transaction_type = None                # _SQLTransaction, once it is defined below
    _claims = "comet_packages WHERE pos"    # the rows claims are, by what batch.claims holds

    def __init__(self):
        self._pool_lock = threading.Lock()
        self._pid = None
        self._gap = None                    # (position, since): a package the tail waits for
        self._forked()
        with self._connection() as conn:
            cur = conn.cursor()
            for statement in self._schema:
                cur.execute(statement)
            if not self._has_column(cur, "comet_packages", "channel"):
                self._upgrade(cur)
            for statement in self._indexes:
                cur.execute(statement)
            into, conflict = self._upsert("comet_meta", ("one", "id", "head", "purged"), ("one",),
                                          replace=False)
            self._execute(cur, f"{into} VALUES (1, ?, 0, 0){conflict}", (secrets.token_hex(4),))
            into, conflict = self._upsert("comet_purge_log", ("pos", "ts"), ("pos",), replace=False)
            self._execute(cur, f"{into} VALUES (0, 0){conflict}")
            # The purged position has a row of its own, which pushes never lock: tables
            # made by earlier versions kept it in comet_meta, where it starts from.
            into, conflict = self._upsert("comet_purge", ("one", "purged"), ("one",),
                                          replace=False)
            self._execute(cur, f"{into} SELECT 1, purged FROM comet_meta{conflict}")
            self._execute(cur, "SELECT id FROM comet_meta")
            self.id = cur.fetchone()[0]
            conn.commit()
            self._sync_clock(cur, "SELECT 0")

    _indexes = ()                           # made after _upgrade: on its columns

    def _has_column(self, cur, table, column):
        try:
            self._execute(cur, f"SELECT {column} FROM {table} WHERE 1 = 0").fetchall()
            return True
        except Exception:                   # no such column (each driver has its own error)
            return False

    def _upgrade(self, cur):
        """Tables made by an earlier version, without channel rows: current members get
        an open span from the next position on (their older packages have delivery
        rows); comet_packages.channel comes last, as the mark that the rest is done.
        Processes upgrading at once each try; a column another added is no error."""
        if not self._has_column(cur, "comet_meta", "changes"):
            with contextlib.suppress(Exception):
                cur.execute(self._upgrades[0])
        into, conflict = self._open_span()
        self._execute(cur, f"{into} SELECT channel, client, head + 1, ? FROM comet_members,"
                           f" comet_meta{conflict}", (_MAX_POSITION,))
        try:
            for statement in self._upgrades[1:]:
                cur.execute(statement)
        except Exception:
            if not self._has_column(cur, "comet_packages", "channel"):
                raise

    def _forked(self):
        """Fresh pool and locks in a new process: the parent's sockets are not ours."""
        if self._pid == os.getpid():        # the common case, on every transaction: no lock
            return
        with self._pool_lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._green = _green()              # gevent's worker patches after the fork
            self._pool = []
            self._slots = _Slots(self._pool_size)
            self._writer = threading.Lock()
            self._batching = threading.Lock()   # guards _open and each batch's queue
            self._open = []                     # the batches new transactions may join
            self._local = threading.local()
            self._member_cache = _Members()

    # -- connections

    def _execute(self, cur, sql, args=()):
        if self._placeholder != "?":
            sql = sql.replace("?", self._placeholder)
        cur.execute(sql, args)
        return cur

    def _insert(self, cur, sql, rows, conflict=""):
        """``sql`` ending in ``VALUES``, for ``rows`` (then ``conflict``, as ``_upsert``
        makes it): one statement per chunk of at most 500 rows, ``_max_variables``
        values and ``_statement_bytes``.

        Not ``executemany``: SQLite would step (and release the GIL) once a
        row, and under load each step waits its turn to get it back.
        """
        if not rows:
            return
        for chunk in self._chunks(rows, min(500, self._max_variables // len(rows[0]))):
            values = ", ".join(["(" + ", ".join(["?"] * len(chunk[0])) + ")"] * len(chunk))
            self._execute(cur, f"{sql} {values}{conflict}",
                          list(itertools.chain.from_iterable(chunk)))

    def _chunks(self, rows, most):
        """``rows`` in runs of at most ``most`` rows and ``_statement_bytes``."""
        if self._statement_bytes == math.inf:
            return [rows[start:start + most] for start in range(0, len(rows), most)]
        chunks, size = [[]], 0
        for row in rows:
            cost = sum(_escaped_size(value) for value in row)
            if chunks[-1] and (len(chunks[-1]) == most or size + cost > self._statement_bytes):
                chunks.append([])
                size = 0
            chunks[-1].append(row)
            size += cost
        return chunks

    def _fits(self, text, limit):
        """True when ``text`` is at most ``limit`` bytes and its row fits a statement."""
        if _escaped_size(text) + 4096 <= min(limit, self._statement_bytes):
            return True                     # the quick bound says so
        size = len(text.encode("utf-8"))
        return size <= limit and 2 * size + 4096 <= self._statement_bytes

    def _upsert(self, table, columns, key, replace=True):
        """``(into, conflict)``: the statement ``into`` + its rows (``VALUES ...`` or a
        ``SELECT``) + ``conflict`` inserts ``columns`` into ``table``; a row whose
        ``key`` is taken already replaces the one there, or with ``replace=False``
        is left out."""
        verb = "REPLACE" if replace else self._insert_ignore
        return f"{verb} INTO {table} ({', '.join(columns)})", ""

    def _checkout(self):
        """A pooled connection.  At most ``_pool_size`` are out at once: a
        thousand polls woken together take turns on them, none opens (and
        closes) one of its own."""
        self._forked()
        if not self._slots.acquire(timeout=2):
            raise _unavailable("every store connection is busy")
        with self._pool_lock:
            conn = self._pool.pop() if self._pool else None
        if conn is None:
            try:
                conn = self._connect()
            except BaseException as error:
                self._slots.release()
                raise self._lost(None, error) if isinstance(error, self._errors) else error
        return conn

    def _checkin(self, conn):
        if isinstance(conn, _Lending):
            conn.lent = None                # lent to a hook: the loan ends here
        with self._pool_lock:
            if len(self._pool) < self._pool_size:
                self._pool.append(conn)
                conn = None
        if conn is not None:
            conn.close()
        self._slots.release()

    def _drop(self, conn):
        """Close ``conn`` instead of pooling it (its state is unknown); free its slot."""
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
            self._slots.release()

    def _lost(self, conn, error):
        """A driver error: the connection is dropped, and so are the idle ones (a
        server that went away took them all), a 503 returned."""
        with self._pool_lock:
            idle, self._pool = self._pool, []
        for each in idle:
            with contextlib.suppress(Exception):
                each.close()
        self._drop(conn)
        log.warning("comet: store %s unavailable: %s", self.url, error)
        return _unavailable("the store is unavailable")

    @contextlib.contextmanager
    def _connection(self):
        conn = self._checkout()
        try:
            yield conn
        except self._errors as error:
            raise self._lost(conn, error) from error
        except Exception:
            self._checkin(conn)             # the statement failed whole: the connection is sound
            raise
        except BaseException:
            self._drop(conn)                # interrupted mid-call (gevent.Timeout, say)
            raise
        self._checkin(conn)

    def _query(self, sql, args=()):
        with self._connection() as conn:
            return self._execute(conn.cursor(), sql, args).fetchall()

    # -- write transactions, committed in batches

    @contextlib.contextmanager
    def transaction(self, alone=False):
        """This thread's part of a write transaction (group commit).

        A transaction opened while another runs in this process joins it and takes its
        turn on the same connection once the parts before it are done (SQLite: one batch
        at a time; MySQL: up to ``_batches``, another opening when each has
        ``_batch_queue`` parts waiting, so that a slow hook holds up a few pushes, not
        all); the last part writes every package (the positions taken in one statement)
        and commits once for all.  A part that fails is rolled back alone: to its
        savepoint, or the whole transaction when it is the first.  Every part waits for
        the commit before it returns, and all of them fail if the commit does.  A
        ``BaseException`` (gevent.Timeout, GreenletExit) in a part, the flush or the
        commit may have cut a driver call short: the connection is dropped, every part
        fails with a 503, and the interruption goes on in its own thread.  ``alone``: a
        transaction that no other joins, nor it another (housekeeping's: a purge step
        never holds up a push's commit, though on SQLite the two still take turns).
        """
        batch = self._join(alone)
        self._local.batch = batch
        try:
            self._begin_part(batch)
            tx = self._transaction_type(self, batch)
            first = not batch.kept
            try:
                with contextlib.nullcontext() if first else tx.savepoint():
                    yield tx
            except self._errors as error:
                raise self._break(batch, error) from error
            except Exception:
                if first:
                    self._rollback(batch)
                raise
            except BaseException as error:  # interrupted, maybe inside a driver call
                self._break(batch, error)
                raise
            batch.kept += 1
        finally:
            self._local.batch = None
            self._pass(batch)
        batch.done.wait()
        if batch.error is not None:
            raise _unavailable(batch.error.message)
        if tx in batch.refused:
            raise batch.refused[tx]

    def _join(self, alone=False):
        """The batch this transaction is a part of, once it is this part's turn."""
        self._forked()
        if getattr(self._local, "batch", None) is not None:
            raise RuntimeError("a store transaction is open in this thread already"
                               " (a hook cannot open another)")
        with self._batching:
            batch = None if alone else min(self._open, key=lambda open: open.queued, default=None)
            if batch is None or (batch.queued >= self._batch_queue
                                 and len(self._open) < self._batches):
                batch = _Batch(alone)       # its first part has the turn
                if not alone:
                    self._open.append(batch)
                return batch
            batch.queued += 1
            batch.parts += 1
            if batch.parts >= self._batch_parts:
                self._open.remove(batch)    # full: later transactions go elsewhere
        try:
            turn = batch.turn.acquire(timeout=self._turn_timeout)
        except BaseException:               # interrupted while waiting: leave the queue
            self._withdraw(batch)
            raise
        if not turn:
            with self._batching:
                turn = batch.turn.acquire(blocking=False)
                if not turn:
                    batch.queued -= 1
            if not turn:
                raise _unavailable("the store is busy")
        with self._batching:
            batch.queued -= 1
        return batch

    def _withdraw(self, batch):
        """Leave ``batch``'s queue without taking a turn; a turn handed over
        meanwhile is passed on, so the parts behind (or the commit) still come."""
        with self._batching:
            batch.queued -= 1
            handed = batch.turn.acquire(blocking=False)
        if handed:
            self._pass(batch)

    def _begin_part(self, batch):
        if batch.error is not None:
            raise _unavailable(batch.error.message)
        if batch.begun:
            return
        try:
            if self._one_writer and not batch.writing:
                if not self._writer.acquire(timeout=5):
                    raise _unavailable("the store is busy")
                batch.writing = True
            if batch.conn is None:
                batch.conn = self._checkout()
                batch.cur = self._cursor(batch)
            self._begin(batch.cur)
            batch.begun = True
        except self._errors as error:
            raise self._break(batch, error) from error
        except CometError as error:
            self._fail(batch, error)
            raise
        except BaseException as error:
            self._break(batch, error)
            raise

    def _cursor(self, batch):
        """The cursor ``batch``'s own statements run on: the store's held one
        (``_held_cursor``) where it has one, but not for a purge step, which lets
        the other threads run, nor under gevent, where the hub's one thread has the
        GIL to itself (and a held wait for the database would stop the loop)."""
        if batch.alone or self._green:
            return batch.conn.cursor()
        return self._held_cursor(batch) or batch.conn.cursor()

    def _held_cursor(self, batch):
        """A cursor whose statements run holding the GIL, with a ``commit`` of its own;
        None where the store has none."""
        return None

    def _commit_connection(self, batch):
        commit = getattr(batch.cur, "commit", None)     # a held cursor's
        (commit or batch.conn.commit)()

    def _rollback(self, batch):
        """Undo the whole open transaction (only its first part ran in it).  What its
        cursor keeps to send with its next statement (its BEGIN) is never sent."""
        forget = getattr(batch.cur, "forget_later", None)
        if forget is not None:
            forget()
        if batch.conn is None:              # dropped with the connection (_break)
            return
        try:
            batch.conn.rollback()
        except self._errors as error:
            self._break(batch, error)
            return
        except BaseException as error:
            self._break(batch, error)
            raise
        batch.begun = False
        batch.pending.clear()
        batch.assumed.clear()
        batch.stamps.clear()
        batch.claims.clear()
        batch.changes.clear()
        batch.due.clear()

    def _break(self, batch, error):
        """The connection failed, or a part was interrupted (a ``BaseException``)
        with the transaction in an unknown state: the connection is dropped, never
        pooled, and every part of the batch fails with a 503."""
        if isinstance(error, self._errors):
            self._fail(batch, self._lost(batch.conn, error))
        else:
            log.error("comet: a transaction on %s was interrupted by %r; its batch fails",
                      self.url, error)
            self._drop(batch.conn)
            self._fail(batch, _unavailable("the transaction was interrupted; try again"))
        batch.conn = batch.cur = None
        batch.begun = False
        return _unavailable(batch.error.message)

    def _fail(self, batch, error):
        """Every part of ``batch`` fails with ``error``; later transactions start another."""
        batch.error = error
        with self._batching:
            if batch in self._open:
                self._open.remove(batch)

    def _pass(self, batch):
        """This part is done: the next part's turn, or the commit if none waits."""
        with self._batching:
            if batch.queued:
                batch.turn.release()
                return
            if batch in self._open:
                self._open.remove(batch)
        try:
            # Every part's packages at once, in position order, while the
            # writer lock still keeps the next commit out of the window.
            self._committed(self._commit(batch))
        finally:
            if batch.writing:
                self._writer.release()
            batch.done.set()

    def _commit(self, batch):
        """Write and commit the batch's packages; returns what was appended, as
        ``on_commit`` takes it ([] when the batch failed: ``batch.error`` says why).
        The connection is pooled again only with no transaction open on it."""
        appended, clean = [], False
        try:
            if batch.begun and batch.error is None:
                appended = self._flush(batch)
                self._commit_connection(batch)
            clean = batch.error is None or not batch.begun
        except self._errors as error:
            self._break(batch, error)
        except Exception:                   # the parts were checked: nothing should be left
            log.exception("comet: store %s refused a commit", self.url)
            self._fail(batch, _unavailable("the store refused the commit; try again"))
        except BaseException as error:
            self._break(batch, error)
            raise
        finally:
            if batch.conn is not None:
                (self._checkin if clean else self._drop)(batch.conn)
                batch.conn = batch.cur = None
        return appended if clean else []

    def _flush(self, batch):
        """Write the batch's packages and membership changes: positions taken
        last, then the inserts.  Returns what was appended, as ``on_commit`` takes it."""
        writes = self._writes(batch)
        self._forget_claims(writes, batch.claims)
        if not batch.pending and not batch.changes:
            return []
        first, changed = self._positions(batch)
        if changed:
            self._unchannel(batch)
        self._insert(writes, "INSERT INTO comet_packages (pos, stamp, ts, body, channel)"
                     " VALUES", [(position, stamp, ts, body, channel) for position,
                                 (stamp, ts, body, _, channel) in enumerate(batch.pending, first)])
        self._insert_deliveries(writes, batch.pending, first)
        self._write_changes(batch, first, writes)
        return self._appended(batch, first)

    @staticmethod
    def _writes(batch):
        """The cursor for the flush's statements whose results are not read: where
        the batch's cursor can keep statements to send with its next one (its
        ``later``), they go with the next statement read or with the COMMIT."""
        later = getattr(batch.cur, "later", None)
        return batch.cur if later is None else _Later(batch.cur)

    def _positions(self, batch):
        """``(first, changed)``: the positions taken for the batch's packages, the
        first of them, and whether the batch has a channel row whose members it read
        before another transaction's membership change committed (asked once the
        positions are taken, so that every change committed before is seen)."""
        n = len(batch.pending)
        first = self._take_positions(batch.cur, n) - n + 1
        if not self._check_members(batch):
            return first, False
        changes, = self._execute(batch.cur, "SELECT changes FROM comet_meta").fetchone()
        return first, changes > batch.read_changes

    def _check_members(self, batch):
        """True when the batch has channel rows and another transaction could have
        changed their members since it read them (not on SQLite: one writer)."""
        return not self._one_writer and batch.read_changes != math.inf and any(
            channel for *_, channel in batch.pending)

    def _assumes(self, batch):
        """Whether ``batch``'s broadcasts may take their channel's members as last read
        (``_SQLTransaction.member_ids``): only where the commit checks them, so not
        in this store, which reads them each time."""
        return False

    def _recheck(self, batch):
        """Members changed since the batch's broadcasts took them as last read: each
        channel's are read again, as committed now, and are the recipients of its
        broadcasts; a part whose sender has left since is refused (403, as it would
        have been had it read them) and its package dropped, the others go on."""
        fresh, refused = {}, set()
        for part, index in batch.assumed:
            stamp, ts, body, _, channel = batch.pending[index]
            if channel not in fresh:
                fresh[channel] = part._members_now(channel)[0]
            ids = fresh[channel]
            if part._assumed[channel] in ids:
                batch.pending[index] = stamp, ts, body, [(member, None) for member in ids], channel
            else:
                refused.add(index)
                batch.stamps.discard(stamp)
                batch.refused[part] = CometError(403, "not_member",
                                                 f"not a member of channel {channel!r}")
        batch.assumed.clear()
        if refused:
            batch.pending[:] = [package for index, package in enumerate(batch.pending)
                                if index not in refused]
            batch.changes[:] = [(*change[:3], change[3] - sum(i < change[3] for i in refused))
                                for change in batch.changes]

    @staticmethod
    def _unchannel(batch):
        """Delivery rows, not channel rows, for every package of the batch."""
        batch.pending[:] = [(*package[:4], None) for package in batch.pending]

    def _write_changes(self, batch, first, cur):
        """The spans of the batch's joins and leaves, at positions counted from ``first``
        (each change at the position of the next package its transaction stored),
        and one more in comet_meta.changes, on ``cur``."""
        if not batch.changes:
            return
        into, conflict = self._open_span()
        for channel, client, joined, index in batch.changes:
            if joined:                      # a member joining again keeps the span it has
                self._execute(cur, f"{into} VALUES (?, ?, ?, ?){conflict}",
                              (channel, client, first + index, _MAX_POSITION))
            else:                           # a span ending where it began covered nothing
                self._execute(cur, "DELETE FROM comet_spans WHERE client = ? AND channel = ?"
                              " AND to_pos = ? AND from_pos >= ?",
                              (client, channel, _MAX_POSITION, first + index))
                self._execute(cur, "UPDATE comet_spans SET to_pos = ? WHERE client = ?"
                              " AND channel = ? AND to_pos = ?",
                              (first + index, client, channel, _MAX_POSITION))
        self._execute(cur, "UPDATE comet_meta SET changes = changes + 1")

    def _open_span(self):
        """``_upsert`` of a span into comet_spans; one open already is kept."""
        return self._upsert("comet_spans", ("channel", "client", "from_pos", "to_pos"),
                            ("client", "channel", "to_pos"), replace=False)

    def _insert_deliveries(self, cur, pending, first):
        """The delivery rows of ``pending`` (a batch's packages, the first at
        position ``first``) into comet_deliveries; none for a channel row."""
        # A delivery of the package as stored leaves its body NULL by leaving it out:
        # a None bound is a value the driver adapts, one at a time (SQLite looks up
        # __adapt__ and __conform__, raising and dropping an AttributeError for each).
        plain, tailored = [], []
        for position, (_, _, _, targets, channel) in enumerate(pending, first):
            if channel is not None:
                continue
            plain += [(recipient, position) for recipient, body in targets if body is None]
            tailored += [(recipient, position, body) for recipient, body in targets
                         if body is not None]
        if plain:
            self._insert(cur, "INSERT INTO comet_deliveries (recipient, pos) VALUES", plain)
        if tailored:
            self._insert(cur, "INSERT INTO comet_deliveries (recipient, pos, body) VALUES",
                         tailored)

    def _forget_claims(self, cur, claims):
        """Delete the rows that held these client stamps (``_claims``)."""
        for start in range(0, len(claims), self._max_variables):
            chunk = claims[start:start + self._max_variables]
            self._execute(cur, f"DELETE FROM {self._claims} IN ("
                          + ", ".join(["?"] * len(chunk)) + ")", chunk)

    @staticmethod
    def _appended(batch, first):
        """The batch's packages from position ``first`` on, as ``on_commit`` takes them."""
        return [(position, ts, [(recipient, tailored or body) for recipient, tailored in targets])
                for position, (stamp, ts, body, targets, _) in enumerate(batch.pending, first)]

    def close(self):
        with self._pool_lock:
            pool, self._pool = self._pool, []
        for conn in pool:
            with contextlib.suppress(Exception):
                conn.close()

    # -- the protocol

    def now(self):
        return _now_ms() + self._offset

    def _sync_clock(self, cur, sql):
        """Run ``sql`` (its row first) with the database's clock read beside it, and
        learn how far this host's clock is from it (to half a round trip)."""
        if self._clock is None:
            return self._execute(cur, sql).fetchone()
        sent = _now_ms()
        row = self._execute(cur, sql.replace("SELECT ", f"SELECT {self._clock}, ", 1)).fetchone()
        self._offset = int(row[0]) - (sent + _now_ms()) // 2
        return row[1:]

    def head(self):
        return self._query("SELECT head FROM comet_meta")[0][0]

    def read(self, recipient, after, limit):
        # One statement is one snapshot: the head, the rows up to it and any purge agree.
        # The recipient's packages are its delivery rows and the channel rows its spans
        # cover, the first ``limit`` of each.
        rows = self._query(
            "SELECT m.head, (SELECT pos FROM comet_purged WHERE recipient = ?),"
            " (SELECT MIN(pos) FROM comet_purge_log), x.pos, x.ts, x.body FROM comet_meta m"
            " LEFT JOIN (SELECT * FROM (SELECT d.pos, p.ts, COALESCE(d.body, p.body) AS body"
            "   FROM comet_deliveries d JOIN comet_packages p ON p.pos = d.pos"
            "   WHERE d.recipient = ? AND d.pos > ? ORDER BY d.pos LIMIT ?) AS d"
            "  UNION ALL SELECT * FROM (SELECT p.pos, p.ts, p.body FROM comet_spans s"
            "   JOIN comet_packages p ON p.channel = s.channel AND p.pos >= s.from_pos"
            "    AND p.pos < s.to_pos"
            "   WHERE s.client = ? AND s.to_pos > ? AND p.pos > ? ORDER BY p.pos LIMIT ?) AS c"
            " ) AS x ON x.pos <= m.head ORDER BY x.pos LIMIT ?",
            (recipient, recipient, after, limit, recipient, after, after, limit, limit))
        head, mark, floor = rows[0][:3]
        lost = bool(mark and mark > after) or after < floor
        return head, [row[3:] for row in rows if row[3] is not None], lost

    def tail(self, after):
        with self._connection() as conn:
            cur = conn.cursor()
            # The tail runs every tail_interval: it measures the clock too, for free.
            head, purged = self._sync_clock(
                cur, "SELECT head, (SELECT purged FROM comet_purge) FROM comet_meta")
            if head <= after:
                return head, []
            # Each body once: the package's, and a delivery's own only where on_emit made one.
            packages = self._execute(
                cur, "SELECT pos, ts, body FROM comet_packages WHERE pos > ? AND pos <= ?"
                     " ORDER BY pos", (after, head)).fetchall()
            deliveries = self._execute(
                cur, "SELECT pos, recipient, body FROM comet_deliveries WHERE pos > ? AND pos <= ?"
                     " UNION ALL SELECT p.pos, s.client, NULL FROM comet_packages p"
                     " JOIN comet_spans s ON s.channel = p.channel AND s.from_pos <= p.pos"
                     " AND s.to_pos > p.pos WHERE p.pos > ? AND p.pos <= ? ORDER BY 1",
                (after, head, after, head)).fetchall()
        appended = {position: (position, ts, body, []) for position, ts, body in packages}
        for position, recipient, tailored in deliveries:
            package = appended.get(position)
            if package is not None:         # else purged between the two reads
                package[3].append((_text(recipient), package[2] if tailored is None else tailored))
        head = self._seen_through(max(after, purged or 0), head, appended)
        return head, [(position, ts, delivered)
                      for position, ts, _, delivered in appended.values() if position <= head]

    def _seen_through(self, after, head, appended):
        """The head a tail may hand on: ``head``, unless a position after ``after``
        has no package in ``appended``.  Every transaction takes its positions and
        writes their packages in one commit, so that cannot be; if a store ever
        showed it, a process that went past the gap would skip that package for
        good.  The tail stops before it instead, and says so, until the package
        shows or ``_GAP_WAIT`` has passed (then it is taken to be lost)."""
        if len(appended) >= head - after:  # each position has its package: the usual tail
            self._gap = None
            return head
        gap = next(position for position in range(after + 1, head + 1)
                   if position not in appended)
        now = time.monotonic()
        if self._gap is None or self._gap[0] != gap:
            self._gap = gap, now
            log.warning("comet: store %s is at position %d and has no package at %d yet;"
                        " its tail waits for it", self.url, head, gap)
        if now - self._gap[1] < _GAP_WAIT:
            return gap - 1
        log.error("comet: store %s has no package at position %d after %.1f s; it is"
                  " passed over", self.url, gap, now - self._gap[1])
        self._gap = None
        return self._seen_through(gap, head, appended)

    def members(self, channel):
        rows = self._query("SELECT client, sender FROM comet_members WHERE channel = ?",
                           (channel,))
        return {_text(client): json.loads(sender) for client, sender in rows}

    def touch(self, clients, ts):
        if not clients:
            return
        into, conflict = self._upsert("comet_clients", ("client", "seen"), ("client",))
        with self.transaction(alone=True) as tx:
            self._insert(tx.cur, f"{into} VALUES", [(client, ts) for client in clients], conflict)

    def stale_members(self, before):
        rows = self._query(
            "SELECT m.channel, m.client, m.sender FROM comet_members m"
            " LEFT JOIN comet_clients c ON c.client = m.client"
            " WHERE COALESCE(c.seen, m.joined) < ?", (before,))
        return [(_text(channel), _text(client), json.loads(sender))
                for channel, client, sender in rows]

    def purge(self, before):
        # Each step: what to delete is found by reads, then deleted by keys in one write
        # transaction of at most _PURGE_ROWS rows, so that pushes wait a few ms at most.
        return (self._purge_packages(before)
                or self._forget_marks(min(before, self.now() - _MARKS_KEPT))
                or self._forget_clients(before))

    def _purge_packages(self, before):
        """Packages stored before ``before`` and their deliveries, in position order, a
        slice of rows at a time; each recipient that loses one keeps a purge mark."""
        # Up to the first package still retained: none goes before its time.
        purged, kept, last = self._query(
            "SELECT purged, (SELECT MIN(pos) FROM comet_packages WHERE pos > m.purged"
            " AND pos <= ? + m.purged AND ts >= ?), (SELECT MAX(pos) FROM comet_packages"
            " WHERE pos > m.purged AND pos <= ? + m.purged) FROM comet_purge m",
            (_PURGE_ROWS, before, _PURGE_ROWS))[0]
        upto = last if kept is None else kept - 1
        if upto is None or upto <= purged:
            return False
        # The slice ends at the _PURGE_ROWS-th delivery row, in (pos, recipient) order:
        # a package with more recipients than that is purged in several steps.
        last = self._query(
            "SELECT pos, recipient FROM comet_deliveries WHERE pos > ? AND pos <= ?"
            " ORDER BY pos, recipient LIMIT 1 OFFSET ?", (purged, upto, _PURGE_ROWS - 1))
        slices = [("pos > ? AND pos <= ?", (purged, upto))]
        if last:                            # whole positions before it, then part of its own
            position, recipient = last[0]
            upto = position - 1
            slices = [("pos > ? AND pos <= ?", (purged, upto)),
                      ("pos = ? AND recipient <= ?", (position, recipient))]
        marks, marked = self._upsert("comet_purged", ("recipient", "pos"), ("recipient",))
        logged, conflict = self._upsert("comet_purge_log", ("pos", "ts"), ("pos",), replace=False)
        with self.transaction(alone=True) as tx:
            if upto > purged:
                # Another process purging the same packages at the same time waits here
                # and then rolls back (no mark is ever lowered).  The row is comet_purge's,
                # which pushes never touch: they do not wait for this step's commit.
                if tx._run("UPDATE comet_purge SET purged = ? WHERE purged = ?",
                           (upto, purged)).rowcount != 1:
                    raise _unavailable("another process is purging")
            for index, (rows, args) in enumerate(slices):  # marks first, from what goes next
                found = f"SELECT recipient, pos FROM comet_deliveries WHERE {rows}"
                found_args = args
                if index == 0:              # whole packages: the members of channel rows too
                    # Per span of a channel in the slice, its newest package there, not
                    # every package joined to every member (a slice of 1,000 pushes to
                    # 2,000 members held SQLite's writer for 0.6 s that way): the channel's
                    # newest in the slice where the span covers it, as a member's mostly
                    # does, else a look-up in the channel's index.
                    lo, hi = args
                    found += (" UNION ALL SELECT s.client, CASE WHEN s.to_pos > c.top THEN c.top"
                              "  ELSE (SELECT MAX(p.pos) FROM comet_packages p"
                              "   WHERE p.channel = s.channel AND p.pos > ? AND p.pos <= ?"
                              "   AND p.pos >= s.from_pos AND p.pos < s.to_pos) END"
                              " FROM comet_spans s JOIN (SELECT channel, MAX(pos) AS top"
                              "  FROM comet_packages WHERE pos > ? AND pos <= ?"
                              "  AND channel IS NOT NULL GROUP BY channel) c"
                              " ON c.channel = s.channel"
                              " WHERE s.from_pos <= c.top AND s.to_pos > ?")
                    found_args = args + (lo, hi, lo, hi, lo + 1)
                tx._run(f"{marks} SELECT recipient, MAX(pos) FROM ({found}) AS r"
                        f" WHERE pos IS NOT NULL GROUP BY recipient{marked}", found_args)
                tx._run(f"DELETE FROM comet_deliveries WHERE {rows}", args)
            if upto > purged:
                tx._run("DELETE FROM comet_packages WHERE pos > ? AND pos <= ?", (purged, upto))
                # A span whose every position is purged now has nothing left to find.
                tx._run("DELETE FROM comet_spans WHERE to_pos <= ?", (upto + 1,))
                tx._run(f"{logged} VALUES (?, ?){conflict}", (upto, self.now()))
        return True

    def _keys(self):
        """How many keys one step deletes by: a step's rows, and one value to spare."""
        return min(_PURGE_ROWS, self._max_variables - 1)

    def _forget_marks(self, before):
        """Purge marks written before ``before``: first the floor rises over them (the
        oldest row of comet_purge_log, below which every cursor is answered reset),
        then they go."""
        floor, risen = self._query(
            "SELECT MIN(pos), (SELECT MAX(pos) FROM comet_purge_log WHERE ts < ?)"
            " FROM comet_purge_log", (before,))[0]
        if risen is not None and risen > floor:
            with self.transaction(alone=True) as tx:
                tx._run("DELETE FROM comet_purge_log WHERE pos < ?", (risen,))
            floor = risen
        marks = [row[0] for row in self._query(
            "SELECT recipient FROM comet_purged WHERE pos <= ? LIMIT ?", (floor, self._keys()))]
        if not marks:
            return False
        with self.transaction(alone=True) as tx:
            tx._run("DELETE FROM comet_purged WHERE pos <= ? AND recipient IN ("
                    + ", ".join(["?"] * len(marks)) + ")", [floor] + marks)
        return True

    def _forget_clients(self, before):
        """Clients not seen since ``before`` that are no channel's members."""
        clients = [row[0] for row in self._query(
            "SELECT client FROM comet_clients WHERE seen < ? AND client NOT IN"
            " (SELECT client FROM comet_members) LIMIT ?", (before, self._keys()))]
        if not clients:
            return False
        with self.transaction(alone=True) as tx:
            tx._run("DELETE FROM comet_clients WHERE seen < ? AND client IN ("
                    + ", ".join(["?"] * len(clients)) + ") AND client NOT IN"
                    " (SELECT client FROM comet_members)", [before] + clients)
        return True


class _Batch:
    """One write transaction of an ``_SQLStore`` and the parts that share it."""

    def __init__(self, alone=False):
        self.alone = alone                  # housekeeping's: no other part joins
        self.turn = threading.Lock()        # held by the part running now
        self.turn.acquire()                 # by the first, from the start
        self.queued = 0                     # parts waiting for their turn
        self.parts = 1                      # parts that joined
        self.kept = 0                       # parts done, and not rolled back
        self.conn = self.cur = None
        self.begun = False                  # a transaction is open on conn
        self.writing = False                # this batch holds the store's writer lock
        self.pending = []                   # (stamp, ts, body, deliveries, channel) to insert
        self.changes = []                   # (channel, client, joined, index in pending)
        self.read_changes = math.inf        # comet_meta.changes as the first members' read saw it
        self.due = []                       # savepoints not opened yet in the database
        self.stamps = set()                 # their stamps
        self.claims = []                    # what holds client stamps (the store's _claims)
        self.assumed = []                   # (part, index in pending): members as last read
        self.refused = {}                   # part -> the CometError it fails with at the commit
        self.savepoints = itertools.count()
        self.error = None                   # why every part fails
        self.done = threading.Event()       # committed, or failed


class _SQLTransaction:
    """One part of a batch: its packages wait in the batch until the commit."""

    def __init__(self, store, batch):
        self._store = store
        self._batch = batch
        self.cur = batch.cur
        self._read = set()                  # channels whose members this part read
        self._assumed = {}                  # channel -> sender: its members as last read

    @property
    def db(self):
        """The connection, for a hook's call: a hook may write, so what the cursor
        keeps to send is sent and the savepoints due open first, before the hook's
        first statement where the connection can tell (``_Lending``: MySQL's and
        PostgreSQL's), else now.  What fails there is the store's, a 503, not the hook's."""
        conn = self._batch.conn
        lend = getattr(conn, "lend", None)
        if lend is None:
            self._ready()
        else:
            lend(self._ready)
        return conn

    def _ready(self):
        try:
            self._send_kept()
            self._writing()
        except self._store._errors as error:
            raise self._store._break(self._batch, error) from error

    def _send_kept(self):
        """Send what the cursor keeps to send with its next statement (its BEGIN,
        where it has ``send_later``): the hook's statements run in the transaction."""
        send = getattr(self.cur, "send_later", None)
        if send is not None:
            send()

    def _run(self, sql, args=()):
        return self._store._execute(self.cur, sql, args)

    def _writing(self):
        """Open the savepoints not yet opened, outermost first: a write follows."""
        batch = self._batch
        for name in batch.due:
            self._run(f"SAVEPOINT {name}")
        batch.due.clear()

    @contextlib.contextmanager
    def savepoint(self):
        # Opened in the database only before the first write inside it (``_writing``):
        # a part that reads, claims stamps and appends, as most pushes do, is undone in
        # memory and by deleting its claims, and a batch of several parts costs no round
        # trips for their savepoints.
        batch = self._batch
        name = f"comet_{next(batch.savepoints)}"
        marks = len(batch.pending), len(batch.claims), len(batch.changes)
        batch.due.append(name)
        try:
            yield
        except Exception:                   # (an interruption fails the whole batch instead)
            if name in batch.due:
                batch.due.remove(name)      # nothing was written inside
            else:
                self._run(f"ROLLBACK TO SAVEPOINT {name}")
                self._run(f"RELEASE SAVEPOINT {name}")
            claims = batch.claims[marks[1]:]
            if claims:                      # made outside the savepoint maybe: undone here
                self._store._forget_claims(self.cur, claims)
            batch.stamps.difference_update(pending[0] for pending in batch.pending[marks[0]:])
            batch.assumed[:] = [(part, index) for part, index in batch.assumed
                                if index < marks[0]]
            del batch.pending[marks[0]:]
            del batch.claims[marks[1]:]
            del batch.changes[marks[2]:]
            raise
        if name in batch.due:
            batch.due.remove(name)
        else:
            self._run(f"RELEASE SAVEPOINT {name}")

    def claim_stamp(self, stamp):
        # A row at a provisional (negative) position holds the stamp's unique key,
        # so a transaction claiming it at the same time waits for this one's end.
        # No savepoint for it: a part that fails deletes its claims (``savepoint``).
        if stamp in self._batch.stamps:
            return True
        claim = -1 - secrets.randbits(62)
        into, conflict = self._store._upsert("comet_packages", ("pos", "stamp", "ts", "body"),
                                             ("stamp",), replace=False)
        if self._run(f"{into} VALUES (?, ?, 0, ''){conflict}", (claim, stamp)).rowcount == 0:
            return True                     # taken, by a transaction that committed since
        self._batch.claims.append(claim)
        return False

    def append(self, stamp, ts, body, deliveries, channel=None):
        batch = self._batch
        # Checked now, in this package's part, not at the flush that writes every part's.
        if not all(self._store._fits(text, self._store._max_text) for text in itertools.chain(
                [body], (tailored for _, tailored in deliveries if tailored is not None))):
            raise CometError(413, "too_large", "the package is too large for the store")
        if channel is not None and channel not in self._read:
            channel = None                  # its members were not read here: rows it is
        if channel in self._assumed:        # checked at the commit (_SQLStore._recheck)
            batch.assumed.append((self, len(batch.pending)))
        batch.pending.append((stamp, ts, body, deliveries, channel))
        batch.stamps.add(stamp)

    def member_ids(self, channel, sender=None):
        # Read by each part, never taken from an earlier part's read: a join that
        # committed (and was answered) before this part's push arrived is a member.
        # A broadcast's (``sender``) may take them as last read, with no round trip,
        # where the store's commit checks that none changed since (``_assumes``).
        batch = self._batch
        known = self._store._member_cache.get(channel) if sender is not None else None
        if known is not None and sender in known[1] and not batch.changes \
                and self._store._assumes(batch):
            changes, ids = known
            self._assumed[channel] = sender
        else:
            ids, changes = self._members_now(channel)
        if ids:                             # with no members, a push to it has no row
            self._read.add(channel)
            batch.read_changes = min(batch.read_changes, changes)
        return ids

    def _members_now(self, channel):
        """``(ids, changes)`` as committed now.  The members come from the store's
        cache (``_Members``) when comet_meta.changes, read now, is the count it had
        when they were read: every transaction that changes members adds one to it,
        in the same commit.  A batch with joins or leaves of its own reads them."""
        cache = self._store._member_cache
        if self._batch.changes:             # uncommitted, seen only by this transaction
            return self._members(channel)
        known = cache.get(channel)
        ids, changes = self._members(channel, None if known is None else known[0])
        if ids is None:                     # none changed since: the members known
            return known[1], changes
        cache.put(channel, changes, ids)
        return ids, changes

    def _members(self, channel, unless=None):
        """``(ids, changes)``: the channel's members and comet_meta.changes, read at
        once.  A store may leave ``ids`` None, unread, when ``changes`` is ``unless``
        (the count the members it knows were read at); this one always reads them."""
        rows = self._run("SELECT client, (SELECT changes FROM comet_meta) FROM comet_members"
                         " WHERE channel = ?", (channel,)).fetchall()
        return _texts(row[0] for row in rows), rows[0][1] if rows else None

    def is_member(self, channel, client):
        return self._run("SELECT 1 FROM comet_members WHERE channel = ? AND client = ?",
                         (channel, client)).fetchone() is not None

    def add_member(self, channel, client, sender, ts):
        if not self._store._fits(sender, self._store._max_sender):
            log.error("comet: a sender of %d characters is too large for %s",
                      len(sender), self._store.url)
            raise CometError(500, "internal", "the sender is too large for the store")
        self._writing()
        into, conflict = self._store._upsert(
            "comet_members", ("channel", "client", "sender", "joined"), ("channel", "client"))
        self._run(f"{into} VALUES (?, ?, ?, ?){conflict}", (channel, client, sender, ts))
        self._batch.changes.append((channel, client, True, len(self._batch.pending)))

    def remove_member(self, channel, client):
        self._writing()
        removed = self._run("DELETE FROM comet_members WHERE channel = ? AND client = ?",
                            (channel, client)).rowcount == 1
        if removed:
            self._batch.changes.append((channel, client, False, len(self._batch.pending)))
        return removed


_SQLStore._transaction_type = _SQLTransaction


class _SQLiteTransaction(_SQLTransaction):

    def _members(self, channel, unless=None):
        # One row, not one a member: each row is a step of SQLite's, which lets go of
        # the GIL, and under load each step waits for its turn to take it back (on
        # cheroot, a push to 100 members waited ~10 ms more with rows).
        if not self._store._json_members:
            return super()._members(channel)
        changes, members = self._run(
            "SELECT changes, CASE WHEN changes = ? THEN NULL ELSE (SELECT json_group_array(client)"
            " FROM comet_members WHERE channel = ?) END FROM comet_meta",
            (unless, channel)).fetchone()
        return (None if members is None else json.loads(members)), changes


def _declare(target, library, signatures, strip=0, prefix=""):
    """Each function of the ctypes ``library`` named in ``signatures`` (name ->
    ``(restype, argtypes)``), declared, as an attribute of ``target``: its name
    less its first ``strip`` characters, after ``prefix``."""
    for name, (restype, argtypes) in signatures.items():
        function = getattr(library, name)
        function.restype, function.argtypes = restype, argtypes
        setattr(target, prefix + name[strip:], function)


class _Quick:
    """Whether a call may hold the GIL while it waits: yes while one of the last 8
    held calls took under ``limit`` ms (a thread switch around a call can only make
    it look slower), and one call in 64 whatever they took, to time it again."""

    def __init__(self, limit):
        self.limit = limit                  # ms
        self.times = collections.deque(maxlen=8)    # the last held calls', ms
        self.calls = 0

    def hold(self):
        self.calls += 1
        return min(self.times, default=0) < self.limit or self.calls % 64 == 0

    def took(self, started):
        """A held call that began at ``started`` (``time.perf_counter()``) is done."""
        self.times.append((time.perf_counter() - started) * 1000)


class _HeldSQLite:
    """libsqlite3 as the ``sqlite3`` module has it loaded, called through ctypes,
    so that a push's statements run without letting go of the GIL.

    The module lets go of the GIL at every step and reset of a statement.  On a
    threaded server each time the pushing thread wants it back it waits for the
    threads answering polls to give it up, at their next socket call or when the
    switch interval (5 ms) makes them: beside 8 threads running Python, a push
    to 100 recipients took 81 ms through the module and 1.1 ms held, in
    process (``bench/push_under_load.py``).  A statement holding the GIL stops
    every other thread for as long as it runs, so only a batch's own statements
    hold it (a few each, each a fraction of a millisecond on pages in memory),
    and the COMMIT while the disk syncs in under ``fast_sync`` ms.  Hooks'
    statements, reads, purges and a ``BEGIN IMMEDIATE`` that must wait for
    another process's transaction let it go.

    The connection's ``sqlite3 *`` is read from the module's connection object,
    where CPython 3.8 to 3.14 keep it first after the object's header; anywhere
    else (another Python, a build without a GIL, a library ctypes cannot
    reach, a handle that does not answer as the connection does) the store
    runs every statement through the module.
    """

    _ROW, _DONE, _BUSY, _LOCKED = 100, 101, 5, 6
    _TRANSIENT = -1                         # SQLite copies the bound text at once
    fast_sync = 1.0                         # ms: a COMMIT this quick holds the GIL

    def __init__(self, module):
        import ctypes
        self._ctypes = ctypes
        self.syncs = _Quick(self.fast_sync)         # whether a COMMIT holds the GIL
        held, free = ctypes.PyDLL(module.__file__), ctypes.CDLL(module.__file__)
        pointer, integer, text = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
        signatures = {
            "sqlite3_prepare_v2": (integer, [pointer, text, integer, ctypes.POINTER(pointer),
                                             pointer]),
            "sqlite3_step": (integer, [pointer]),
            "sqlite3_reset": (integer, [pointer]),
            "sqlite3_finalize": (integer, [pointer]),
            "sqlite3_bind_int64": (integer, [pointer, integer, ctypes.c_int64]),
            "sqlite3_bind_double": (integer, [pointer, integer, ctypes.c_double]),
            "sqlite3_bind_text": (integer, [pointer, integer, text, integer, pointer]),
            "sqlite3_bind_blob": (integer, [pointer, integer, text, integer, pointer]),
            "sqlite3_bind_null": (integer, [pointer, integer]),
            "sqlite3_column_count": (integer, [pointer]),
            "sqlite3_column_type": (integer, [pointer, integer]),
            "sqlite3_column_int64": (ctypes.c_int64, [pointer, integer]),
            "sqlite3_column_double": (ctypes.c_double, [pointer, integer]),
            "sqlite3_column_text": (pointer, [pointer, integer]),
            "sqlite3_column_blob": (pointer, [pointer, integer]),
            "sqlite3_column_bytes": (integer, [pointer, integer]),
            "sqlite3_changes": (integer, [pointer]),
            "sqlite3_total_changes": (integer, [pointer]),
            "sqlite3_get_autocommit": (integer, [pointer]),
            "sqlite3_busy_timeout": (integer, [pointer, integer]),
            "sqlite3_errmsg": (text, [pointer]),
            "sqlite3_stmt_readonly": (integer, [pointer]),
            "sqlite3_libversion": (text, []),
        }
        _declare(self, held, signatures, strip=len("sqlite3_"))
        # The one call made with the GIL let go: a step that waits (the disk, the file).
        self.step_released = free.sqlite3_step
        self.step_released.restype, self.step_released.argtypes = integer, [pointer]
        if self.libversion().decode() != sqlite3.sqlite_version:
            raise OSError("ctypes reached another libsqlite3 than the sqlite3 module's")

    @classmethod
    def load(cls):
        """The library, or None where the store cannot hold the GIL through it."""
        module = sys.modules.get("_sqlite3")
        if (sys.implementation.name != "cpython" or not (3, 8) <= sys.version_info < (3, 15)
                or not getattr(sys, "_is_gil_enabled", lambda: True)()
                or getattr(module, "__file__", None) is None):
            return None
        try:
            return cls(module)
        except (ImportError, OSError, AttributeError) as error:
            log.debug("comet: SQLite statements through the sqlite3 module only: %s", error)
            return None

    def handle(self, conn):
        """``conn``'s ``sqlite3 *``, or None when it does not answer as ``conn`` does."""
        db = self._ctypes.c_void_p.from_address(id(conn) + object.__basicsize__).value
        if not db or self.total_changes(db) != conn.total_changes \
                or bool(self.get_autocommit(db)) == conn.in_transaction:
            return None
        return db


class _SQLiteConnection(sqlite3.Connection):
    """A connection of the SQLite store, with a cursor (``held``) whose statements run
    holding the GIL where the library allows (``_HeldSQLite``)."""

    _held = None

    def held(self, library, timeout_ms):
        """The cursor for a batch's statements: held if it can be, else a plain one."""
        if self._held is None:
            db = library.handle(self) if library is not None else None
            self._held = _HeldCursor(self, library, db, timeout_ms) if db else False
        return self._held or self.cursor()

    def close(self):
        if self._held:
            self._held.finalize()           # before the database is closed, or it lingers
        super().close()

    def __del__(self):
        try:
            self.close()
        except Exception:                   # (at interpreter exit, say)
            pass


class _HeldCursor:
    """A cursor that runs each statement to its end holding the GIL, keeps its rows,
    and keeps the statement prepared for the next time (64 statements at most).

    Outside a transaction (its ``BEGIN IMMEDIATE``) a statement SQLite would wait
    on, the file busy with another process's transaction, is tried without a wait,
    then again with the GIL let go, waiting as the module's statements do.  Inside
    the transaction, which holds the file's write lock in WAL mode, no statement
    waits for another connection."""

    _cached = 64
    # A value bound through ctypes costs ~8,000 instructions, several times the
    # module's (a push's 100 delivery rows, 200 values, took 3.6M instructions
    # instead of 1.9M): a statement binding more values than this, which would hold
    # the GIL for over half a millisecond, goes through the module and lets it go.
    _most_bound = 256

    def __init__(self, conn, library, db, timeout_ms):
        self._conn = weakref.ref(conn)      # (the connection holds this cursor)
        self._lib = library
        self._db = db
        self._timeout = timeout_ms
        self._statements = {}               # SQL text -> (statement, its columns, read-only)
        self._rows = []
        self._changed = -1                  # True: the last statement wrote (SQLite counts)

    @property
    def rowcount(self):
        """Rows the last statement changed, -1 when it writes nothing (as the module's)."""
        return self._lib.changes(self._db) if self._changed is True else self._changed

    def execute(self, sql, args=()):
        self._open()
        if len(args) > self._most_bound:   # many rows: the module binds them for less
            cur = self._conn().execute(sql, args)
            self._rows, self._changed = cur.fetchall(), cur.rowcount
            return self
        lib, db = self._lib, self._db
        statement, columns, read_only = self._statements.get(sql) or self._prepare(sql)
        try:
            for index, value in enumerate(args, 1):
                self._bind(statement, index, value)
            if lib.get_autocommit(db):      # not in a transaction: it may find the file busy
                lib.busy_timeout(db, 0)
                try:
                    rows, code = self._step_all(statement, columns, lib.step)
                finally:
                    lib.busy_timeout(db, self._timeout)
                if code in (_HeldSQLite._BUSY, _HeldSQLite._LOCKED):
                    lib.reset(statement)    # again, waiting for the file with the GIL let go
                    rows, code = self._step_all(statement, columns, lib.step_released)
            else:
                rows, code = self._step_all(statement, columns, lib.step)
            if code != _HeldSQLite._DONE:
                raise self._error(code)
            self._rows, self._changed = rows, -1 if read_only else True
        finally:
            lib.reset(statement)
            if sql not in self._statements:
                lib.finalize(statement)
        return self

    def commit(self):
        """COMMIT, holding the GIL while the disk syncs fast (one of the last 8 held
        commits took under ``_HeldSQLite.fast_sync`` ms: a thread switch around the
        call can only make one look slower); on a slower disk letting it go, so that
        the other threads run while it syncs, and holding it one commit in 64 to time
        the disk again.  (The store's commits are one at a time: ``_one_writer``.)"""
        self._open()
        lib = self._lib
        statement = (self._statements.get("COMMIT") or self._prepare("COMMIT"))[0]
        hold = lib.syncs.hold()
        started = time.perf_counter()
        code = (lib.step if hold else lib.step_released)(statement)
        if hold:
            lib.syncs.took(started)
        lib.reset(statement)
        if code != _HeldSQLite._DONE:
            raise self._error(code)

    def fetchone(self):
        return self._rows[0] if self._rows else None

    def fetchall(self):
        return self._rows

    def close(self):
        pass                                # its statements go with the connection

    def finalize(self):
        """Finalize the prepared statements; the cursor is closed with its connection."""
        statements, self._statements, self._db = self._statements, {}, None
        for statement, _, _ in statements.values():
            self._lib.finalize(statement)

    def _open(self):
        if self._db is None:                # a closed database's handle is freed memory
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")

    def _prepare(self, sql):
        """``(statement, its columns, read-only)``, kept for the next time if there is room."""
        lib, ctypes = self._lib, self._lib._ctypes
        statement = ctypes.c_void_p()
        code = lib.prepare_v2(self._db, sql.encode(), -1, ctypes.byref(statement), None)
        if code:
            lib.finalize(statement)
            raise self._error(code)
        prepared = (statement, range(lib.column_count(statement)),
                    bool(lib.stmt_readonly(statement)))
        if len(self._statements) < self._cached:
            self._statements[sql] = prepared
        return prepared

    def _bind(self, statement, index, value):
        lib, kind = self._lib, type(value)
        if value is None:
            code = lib.bind_null(statement, index)
        elif kind is int or kind is bool:
            if not -2 ** 63 <= value < 2 ** 63:     # ctypes would wrap it round silently
                raise OverflowError("Python int too large to convert to SQLite INTEGER")
            code = lib.bind_int64(statement, index, value)
        elif kind is str:
            data = value.encode()
            code = lib.bind_text(statement, index, data, len(data), _HeldSQLite._TRANSIENT)
        elif kind is float:
            code = lib.bind_double(statement, index, value)
        elif kind is bytes:
            code = lib.bind_blob(statement, index, value, len(value), _HeldSQLite._TRANSIENT)
        else:
            raise sqlite3.ProgrammingError(f"cannot bind a {kind.__name__} here")
        if code:
            raise self._error(code)

    def _step_all(self, statement, columns, step):
        """Every row of ``statement`` and the code its last ``step`` returned."""
        rows = []
        while True:
            code = step(statement)
            if code != _HeldSQLite._ROW:
                return rows, code
            rows.append(tuple(self._column(statement, column) for column in columns))

    def _column(self, statement, column):
        lib = self._lib
        kind = lib.column_type(statement, column)
        if kind == 1:
            return lib.column_int64(statement, column)
        if kind == 3:
            data = lib.column_text(statement, column)
            return lib._ctypes.string_at(data, lib.column_bytes(statement, column)).decode() \
                if data else ""
        if kind == 5:
            return None
        if kind == 2:
            return lib.column_double(statement, column)
        data = lib.column_blob(statement, column)
        return lib._ctypes.string_at(data, lib.column_bytes(statement, column)) if data else b""

    def _error(self, code):
        message = (self._lib.errmsg(self._db) or b"").decode(errors="replace")
        if code & 0xff in (19, 20):         # SQLITE_CONSTRAINT, SQLITE_MISMATCH
            return sqlite3.IntegrityError(message)
        if code & 0xff in (11, 26):         # SQLITE_CORRUPT, SQLITE_NOTADB
            return sqlite3.DatabaseError(message)
        return sqlite3.OperationalError(message)


class SQLiteStore(_SQLStore):
    """An SQLite file in WAL mode: durable, shared by the processes of one host.

    Every write transaction starts with ``BEGIN IMMEDIATE``, so writers take
    turns and positions are handed out in commit order.  A process's own
    transactions queue on a lock rather than in SQLite's busy handler, which
    sleeps 1 to 100 ms between tries.
    """

    _errors = (sqlite3.OperationalError,)
    _timeout = 5.0                          # seconds a statement waits for another process
    _one_writer = True
    _transaction_type = _SQLiteTransaction
    _json_members = False                   # SQLite has json_group_array (JSON1)
    _schema = (
        "CREATE TABLE IF NOT EXISTS comet_meta (one INTEGER PRIMARY KEY, id TEXT NOT NULL,"
        " head INTEGER NOT NULL, purged INTEGER NOT NULL, changes INTEGER NOT NULL DEFAULT 0)",
        "CREATE TABLE IF NOT EXISTS comet_packages (pos INTEGER PRIMARY KEY,"
        " stamp TEXT NOT NULL UNIQUE, ts INTEGER NOT NULL, body TEXT NOT NULL, channel TEXT)",
        "CREATE INDEX IF NOT EXISTS comet_packages_ts ON comet_packages (ts)",
        "CREATE TABLE IF NOT EXISTS comet_deliveries (recipient TEXT NOT NULL,"
        " pos INTEGER NOT NULL, body TEXT, PRIMARY KEY (recipient, pos)) WITHOUT ROWID",
        "CREATE INDEX IF NOT EXISTS comet_deliveries_pos ON comet_deliveries (pos)",
        "CREATE TABLE IF NOT EXISTS comet_purged (recipient TEXT PRIMARY KEY,"
        " pos INTEGER NOT NULL)",
        "CREATE TABLE IF NOT EXISTS comet_purge_log (pos INTEGER PRIMARY KEY,"
        " ts INTEGER NOT NULL)",
        "CREATE TABLE IF NOT EXISTS comet_purge (one INTEGER PRIMARY KEY,"
        " purged INTEGER NOT NULL)",
        "CREATE TABLE IF NOT EXISTS comet_members (channel TEXT NOT NULL, client TEXT NOT NULL,"
        " sender TEXT NOT NULL, joined INTEGER NOT NULL, PRIMARY KEY (channel, client))",
        "CREATE TABLE IF NOT EXISTS comet_clients (client TEXT PRIMARY KEY,"
        " seen INTEGER NOT NULL)",
        "CREATE TABLE IF NOT EXISTS comet_spans (channel TEXT NOT NULL, client TEXT NOT NULL,"
        " from_pos INTEGER NOT NULL, to_pos INTEGER NOT NULL,"
        " PRIMARY KEY (client, channel, to_pos)) WITHOUT ROWID",
        "CREATE INDEX IF NOT EXISTS comet_spans_channel ON comet_spans (channel, from_pos)",
    )
    _upgrades = ("ALTER TABLE comet_meta ADD COLUMN changes INTEGER NOT NULL DEFAULT 0",
                 "ALTER TABLE comet_packages ADD COLUMN channel TEXT")
    _indexes = ("CREATE INDEX IF NOT EXISTS comet_packages_channel ON comet_packages"
                " (channel, pos) WHERE channel IS NOT NULL",)

    def __init__(self, path):
        if sqlite3.sqlite_version_info < (3, 8, 2):        # WITHOUT ROWID tables
            raise RuntimeError(f"comet: the sqlite store needs SQLite 3.8.2 or later;"
                               f" this Python has {sqlite3.sqlite_version}")
        self.path = path
        self.url = "sqlite:///" + path
        self._library = _HeldSQLite.load()
        super().__init__()
        with contextlib.closing(sqlite3.connect(":memory:")) as conn:
            with contextlib.suppress(sqlite3.OperationalError):     # built without JSON1
                self._json_members = bool(conn.execute("SELECT json_group_array(1)").fetchone())

    def _connect(self):
        conn = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None,
                               check_same_thread=False, factory=_SQLiteConnection)
        # Turning WAL on needs the file alone for a moment, and SQLite answers "locked"
        # at once rather than waiting its busy timeout: processes opening a new file
        # together (gunicorn's workers) try again for as long.
        deadline = time.monotonic() + 5.0
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    conn.close()
                    raise
                time.sleep(0.01)
        conn.execute("PRAGMA synchronous=FULL")     # a 200 survives a crash of the machine too
        return conn

    def _held_cursor(self, batch):
        # (Under gevent ctypes' calls would cost a push an eighth more instructions
        # than the module's, which lets go of nothing there.)
        return batch.conn.held(self._library, int(self._timeout * 1000))

    def _begin(self, cur):
        cur.execute("BEGIN IMMEDIATE")

    def _take_positions(self, cur, n):
        # Not RETURNING (SQLite 3.35): one GIL release fewer, more instructions, and no
        # throughput shown (bench/README.md, change 17).
        cur.execute("UPDATE comet_meta SET head = head + ?", (n,))
        return cur.execute("SELECT head FROM comet_meta").fetchone()[0]


class _MySQLTransaction(_SQLTransaction):

    def claim_stamp(self, stamp):
        # A row of comet_claims holds the stamp: a transaction claiming it at the same
        # time waits for this one's end, and whether a package with the stamp is stored
        # is then read, as committed (one round trip, the insert sent with the read).
        # Not a provisional row of comet_packages, as the other stores have: the flush
        # deleted it before it inserted the package under the same key, and InnoDB,
        # finding a row of that key in the stamps' unique index, locks the next key too,
        # often another push's claim, whose transaction waited for the positions' row
        # this one held: a deadlock, each failing a batch (40 in six runs of 500 pushes
        # from three processes, bench/mysql_claims.py).  In a table of their own, claims
        # share no index with packages, and a transaction holding the positions waits
        # on none.
        if stamp in self._batch.stamps or stamp in self._batch.claims:
            return True                     # this transaction's (a hook pushing it again)
        getattr(self.cur, "later", self.cur.execute)(
            "INSERT IGNORE INTO comet_claims (stamp) VALUES (%s)", (stamp,))
        inserted, stored = self._run(
            "SELECT ROW_COUNT(), (SELECT COUNT(*) FROM comet_packages WHERE stamp = ?)",
            (stamp,)).fetchone()
        if inserted:
            self._batch.claims.append(stamp)    # deleted by the flush, taken or not
        return stored > 0

    def _members(self, channel, unless=None):
        # One row, not one a member: PyMySQL parses each row in Python (a channel of
        # 10,000 took 13 ms as rows, 5 ms as one array).  An array the server cut short
        # (at group_concat_max_len or max_allowed_packet) is read again as rows.
        # The count alone first, where it may do: MySQL and MariaDB work out a subquery
        # that names no column of the outer query (to be a constant) whether or not a
        # CASE or IF would take it, so one statement would read every member each time.
        if unless is not None:
            changes, = self._run("SELECT changes FROM comet_meta").fetchone()
            if changes == unless:
                return None, changes
        count, members, changes = self._run(
            "SELECT COUNT(*), JSON_ARRAYAGG(CAST(client AS CHAR CHARACTER SET utf8mb4)),"
            " (SELECT changes FROM comet_meta) FROM comet_members WHERE channel = ?",
            (channel,)).fetchone()
        with contextlib.suppress(ValueError):
            ids = json.loads(members) if count else []
            if len(ids) == count:
                return ids, changes
        return super()._members(channel)


class _HeldReader:
    """What PyMySQL reads from its socket (in place of its buffered file): while
    ``held``, through ``_HeldIO``, waiting for the server holding the GIL while it
    answers quickly; otherwise, and once such a wait goes on too long, through the
    socket, letting the GIL go and keeping its timeout."""

    _chunk = 65536

    def __init__(self, sock, io):
        self._sock = sock
        self._fd = sock.fileno()
        self._io = io
        self._buffer = io.ctypes.create_string_buffer(self._chunk)
        self._data = b""
        self._at = 0
        self.held = False                   # set for a push's own statements

    def read(self, size):
        if len(self._data) - self._at < size:
            parts = [self._data[self._at:]]
            missing = size - len(parts[0])
            while missing > 0:              # joined once: a 16 MB body is 256 reads
                more = self._fill()
                if not more:
                    break                   # the end: PyMySQL finds it short, a lost connection
                parts.append(more)
                missing -= len(more)
            self._data, self._at = b"".join(parts), 0
        piece = self._data[self._at:self._at + size]
        self._at += len(piece)
        return piece

    def _fill(self):
        if self.held:
            io = self._io
            started, deadline = io.begin()
            try:
                # Waited for first: a read follows a statement sent, whose answer is
                # never there yet (a recv tried first costs two calls more).
                while io.wait(self._fd, io.POLLIN, deadline):
                    data = io.recv(self._fd, self._buffer)
                    if data is not None:
                        return data
                    if io.ctypes.get_errno() not in (errno.EAGAIN, errno.EINTR):
                        break               # an error: the socket's own raises it
            finally:
                io.end(started, deadline)
        return self._sock.recv(self._chunk)

    def send(self, data):
        """How much of ``data`` went out at once, holding the GIL, while ``held``."""
        return self._io.send(self._fd, data) if self.held else 0

    def close(self):
        pass                                # the socket is PyMySQL's to close


class _Lending:
    """A driver's connection that can be lent to a hook (``lend``, by ``tx.db``):
    ``ready`` (what the transaction keeps to send, sent) runs before the hook's first
    statement (``_end_loan``, called by the subclass there), and not at all if it
    makes none.  The transaction's own next statement, or going back to the pool
    (``_SQLStore._checkin``), ends the loan."""

    lent = None

    def lend(self, ready):
        self.lent = ready

    def _end_loan(self):
        ready, self.lent = self.lent, None
        if ready is not None:
            ready()


_MYSQL_OUT_OF_RANGE = 1690                 # ER_DATA_OUT_OF_RANGE: an overflow


def _mysql_classes(pymysql, io):
    """PyMySQL's connection and cursor classes, such that the cursor's statements
    (and its ``commit``, the connection's) read and write through a ``_HeldReader``
    (with ``io``, not None: ``_HeldIO``), and statements whose results are not read
    wait to go with the next one.

    A push's transaction is then two round trips to the server, not five: its
    ``START TRANSACTION`` goes with its first statement, and the flush's
    statements with its ``COMMIT`` (``MySQLStore._flush``), several a query.  The
    server takes several only once told it may (``COM_SET_OPTION``, at connect).
    A connection handed to an application's hook is told it may not before the
    hook's first statement (and not at all if the hook makes none), so a hook's
    statement is one statement however its text was made; it is told it may again
    when the transaction next keeps a statement to send, once the hook's call is
    over."""

    class Connection(_Lending, pymysql.connections.Connection):

        several = False                     # statements may go several to a query
        takes_several = False               # the server said it would, at connect
        _contexts = {}                      # (pid, TLS options) -> ssl.SSLContext

        def _create_ssl_ctx(self, options):
            # PyMySQL makes an SSL context for every connection, to use TLS where the
            # server offers it: loading the system's CA certificates costs ~35 ms of
            # CPU, the GIL held, each time the pool grows.  One context a process for
            # the same options; a context serves many connections at once.
            if not isinstance(options, dict):
                return super()._create_ssl_ctx(options)
            key = os.getpid(), repr(sorted(options.items()))
            context = self._contexts.get(key)
            if context is None:
                context = self._contexts[key] = super()._create_ssl_ctx(options)
            return context

        def connect(self, sock=None):
            super().connect(sock)
            if io is not None and type(self._sock) is socket.socket:    # not TLS
                self._rfile = _HeldReader(self._sock, io)
            with contextlib.suppress(pymysql.err.ProgrammingError,
                                     pymysql.err.NotSupportedError, pymysql.err.InternalError):
                self.allow_several(True)    # (a server that cannot: one at a time)
                self.takes_several = True

        def query(self, sql, unbuffered=False):
            self._end_loan()                # a hook's first statement, if lent to one
            return super().query(sql, unbuffered)

        def allow_several(self, allow):
            """Tell the server whether a query may hold several statements."""
            self._execute_command(pymysql.constants.COMMAND.COM_SET_OPTION,
                                  struct.pack("<H", 0 if allow else 1))
            self._read_packet()             # its EOF or OK; an error raises
            self.several = allow

        def _write_bytes(self, data):
            if isinstance(self._rfile, _HeldReader):
                data = data[self._rfile.send(data):]
                if not data:
                    return
            super()._write_bytes(data)

    class Cursor(pymysql.cursors.Cursor):

        most_bytes = math.inf               # a query's text at most (the store's packet)
        last_id = 0                         # set by LAST_INSERT_ID(expr) (one batch a cursor)
        committed = False                   # the transaction's COMMIT went (``commit_now``)

        def __init__(self, connection):
            super().__init__(connection)
            self._later = []                # statements to send with the next one

        def later(self, sql, args=()):
            """``sql`` goes with the next statement, in its query (a START
            TRANSACTION, an insert whose count is not wanted); at once where the
            server takes one statement a query.  A connection a hook's statement
            turned to one a query takes several again: the hook's call is over."""
            conn = self.connection
            conn.lent = None
            if not conn.several and conn.takes_several:
                with _holding(conn._rfile):
                    conn.allow_several(True)
            if conn.several:
                self._later.append(self.mogrify(sql, args or None))
            else:
                self.execute(sql, args or None)

        def send_later(self):
            """What waits to go with the next statement, now, and one statement a
            query from now on: a hook's statement comes next (``lend``)."""
            if self._later:
                self.execute("DO 0")
            if self.connection.several:
                with _holding(self.connection._rfile):
                    self.connection.allow_several(False)

        def forget_later(self):
            """What waits is not sent: the transaction it was for is rolled back."""
            self._later.clear()

        def execute(self, query, args=None):
            self.connection.lent = None     # the transaction's own: a hook's call is over
            with _holding(self.connection._rfile):
                if not self._later:
                    return self._ran(super().execute(query, args))
                statements, self._later = self._later + [self.mogrify(query, args)], []
                query = "; ".join(statements)
                if len(query) * 4 > self.most_bytes and len(query.encode()) > self.most_bytes:
                    for statement in statements[:-1]:   # too long together: one at a time
                        self._ran(super().execute(statement))
                    return self._ran(super().execute(statements[-1]))
                self._ran(super().execute(query))
                while self.nextset():       # the last statement's result is the cursor's
                    self._ran(None)
                return self.rowcount

        def _ran(self, result):
            """Keep the id a statement set with ``LAST_INSERT_ID(expr)`` (``last_id``),
            whichever statement of a query it was, or a query of its own (where the
            server takes one statement a query)."""
            if self.lastrowid:
                self.last_id = self.lastrowid
            return result

        def commit(self):
            if self.committed:              # it went with the flush's statements
                return
            if self._later:
                self.execute("COMMIT")
                return
            with _holding(self.connection._rfile):
                self.connection.commit()

        def commit_now(self):
            """Send what waits and the COMMIT now; the transaction's ``commit`` then
            sends nothing.  Returns the id the last ``LAST_INSERT_ID(expr)`` set."""
            self.commit()
            self.committed = True
            return self.last_id

    return Connection, Cursor


@contextlib.contextmanager
def _holding(reader):
    if not isinstance(reader, _HeldReader):
        yield
        return
    reader.held = True
    try:
        yield
    finally:
        reader.held = False


class MySQLStore(_SQLStore):
    """A MySQL or MariaDB database through PyMySQL: shared by processes and hosts.

    Positions come from one counter row updated at the end of each
    transaction: its row lock makes writers commit in position order, so a reader that
    sees position p has every smaller position already.  Client ids, channel
    names and stamps are VARBINARY, compared byte for byte as in SQLite (a
    text collation would make "bob", "Bob" and "bob " one client).  Times
    compared across hosts (retention, presence) are on the database's clock:
    each process measures its own clock's distance from it at every tail read.
    """

    _placeholder = "%s"
    _insert_ignore = "INSERT IGNORE"
    _max_variables = 65535                  # PyMySQL writes the values into the text itself
    _max_text = 16_777_215                  # a MEDIUMTEXT body
    _max_sender = 65_535                    # a TEXT sender
    _json_table = False                     # the server has JSON_TABLE
    # UTC and arithmetic only: no time zone or daylight-saving rule of the session applies.
    _clock = "TIMESTAMPDIFF(MICROSECOND, '1970-01-01', UTC_TIMESTAMP(6)) DIV 1000"
    _batches = 4                            # a slow hook holds up a few pushes, not all
    _transaction_type = _MySQLTransaction
    _claims = "comet_claims WHERE stamp"    # a table of their own (_MySQLTransaction)
    _schema = (
        "CREATE TABLE IF NOT EXISTS comet_meta (one INT PRIMARY KEY, id VARCHAR(16) NOT NULL,"
        " head BIGINT NOT NULL, purged BIGINT NOT NULL, changes BIGINT NOT NULL DEFAULT 0)"
        " ENGINE=InnoDB",
        "CREATE TABLE IF NOT EXISTS comet_packages (pos BIGINT PRIMARY KEY,"
        " stamp VARBINARY(64) NOT NULL UNIQUE, ts BIGINT NOT NULL, body MEDIUMTEXT NOT NULL,"
        " channel VARBINARY(1024), INDEX comet_packages_ts (ts),"
        " INDEX comet_packages_channel (channel, pos)) ENGINE=InnoDB",
        "CREATE TABLE IF NOT EXISTS comet_deliveries (recipient VARBINARY(1024) NOT NULL,"
        " pos BIGINT NOT NULL, body MEDIUMTEXT, PRIMARY KEY (recipient, pos),"
        " INDEX comet_deliveries_pos (pos)) ENGINE=InnoDB",
        "CREATE TABLE IF NOT EXISTS comet_purged (recipient VARBINARY(1024) PRIMARY KEY,"
        " pos BIGINT NOT NULL) ENGINE=InnoDB",
        "CREATE TABLE IF NOT EXISTS comet_purge_log (pos BIGINT PRIMARY KEY,"
        " ts BIGINT NOT NULL) ENGINE=InnoDB",
        "CREATE TABLE IF NOT EXISTS comet_purge (one INT PRIMARY KEY,"
        " purged BIGINT NOT NULL) ENGINE=InnoDB",
        "CREATE TABLE IF NOT EXISTS comet_members (channel VARBINARY(1024) NOT NULL,"
        " client VARBINARY(1024) NOT NULL, sender TEXT NOT NULL, joined BIGINT NOT NULL,"
        " PRIMARY KEY (channel, client)) ENGINE=InnoDB",
        "CREATE TABLE IF NOT EXISTS comet_clients (client VARBINARY(1024) PRIMARY KEY,"
        " seen BIGINT NOT NULL) ENGINE=InnoDB",
        "CREATE TABLE IF NOT EXISTS comet_spans (channel VARBINARY(1024) NOT NULL,"
        " client VARBINARY(1024) NOT NULL, from_pos BIGINT NOT NULL, to_pos BIGINT NOT NULL,"
        " PRIMARY KEY (client, channel, to_pos), INDEX comet_spans_channel (channel, from_pos))"
        " ENGINE=InnoDB",
        "CREATE TABLE IF NOT EXISTS comet_claims (stamp VARBINARY(64) PRIMARY KEY) ENGINE=InnoDB",
    )
    _upgrades = ("ALTER TABLE comet_meta ADD COLUMN changes BIGINT NOT NULL DEFAULT 0",
                 "ALTER TABLE comet_packages ADD COLUMN channel VARBINARY(1024),"
                 " ADD INDEX comet_packages_channel (channel, pos)")

    def __init__(self, url):
        try:
            import pymysql
        except ImportError:
            raise ImportError("a mysql:// store needs PyMySQL: pip install pymysql") from None
        self._pymysql = pymysql
        self._errors = (pymysql.err.OperationalError, pymysql.err.InterfaceError)
        io = _HeldIO.load()
        self._held = _mysql_classes(pymysql, io) if io is not None else None
        self._several = _mysql_classes(pymysql, None)      # holding nothing (gevent's)
        parts = urllib.parse.urlsplit(url)
        self._params = dict(
            host=parts.hostname or "127.0.0.1", port=parts.port or 3306,
            user=urllib.parse.unquote(parts.username or "root"),
            password=urllib.parse.unquote(parts.password or ""),
            database=parts.path.lstrip("/"))
        self.url = "mysql://{user}@{host}:{port}/{database}".format(**self._params)
        super().__init__()
        # A statement longer than the server's max_allowed_packet fails whole.
        self._statement_bytes = self._query("SELECT @@max_allowed_packet")[0][0] - 65536
        try:
            self._query("SELECT COUNT(*) FROM JSON_TABLE('[1]', '$[*]' COLUMNS"
                        " (v INT PATH '$')) AS t")
            self._json_table = True
        except pymysql.err.ProgrammingError:        # a syntax error: an older server
            pass

    def _classes(self):
        """The connection and cursor classes of ``_mysql_classes`` this process uses:
        under gevent, on PyMySQL's own socket file (C), nothing holds the GIL."""
        return self._held if self._held and not self._green else self._several

    def _connect(self):
        conn = self._classes()[0](
            **self._params, charset="utf8mb4", autocommit=True,
            connect_timeout=3, read_timeout=4, write_timeout=4)
        with conn.cursor() as cur:
            # Each read sees what is committed now; no gap locks between writers.
            cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            cur.execute("SET SESSION group_concat_max_len = 4294967295")   # JSON_ARRAYAGG's
        return conn

    def _cursor(self, batch):
        """A batch's cursor keeps the statements whose results are not read to send
        them with its next (``_mysql_classes``), and holds the GIL where it can,
        as the base's does; a purge step's is PyMySQL's own."""
        if batch.alone:
            return batch.conn.cursor()
        cur = self._classes()[1](batch.conn)
        cur.most_bytes = self._statement_bytes
        return cur

    def _begin(self, cur):
        # A batch's cursor sends it with the transaction's first statement.
        getattr(cur, "later", cur.execute)("START TRANSACTION")

    def _take_positions(self, cur, n):
        cur.execute("UPDATE comet_meta SET head = LAST_INSERT_ID(head + %s)", (n,))
        return cur.lastrowid

    def _positions(self, batch):
        if not self._check_members(batch):
            return super()._positions(batch)
        # The new head and whether members changed since they were read, from the one
        # statement: LAST_INSERT_ID hands back twice the head (assignments run left to
        # right: the head updated), plus one if changed.  A round trip fewer.
        n = len(batch.pending)
        batch.cur.execute("UPDATE comet_meta SET head = head + %s, changes = changes"
                          " + 0 * LAST_INSERT_ID(2 * head + (changes > %s))",
                          (n, batch.read_changes))
        head, changed = divmod(batch.cur.lastrowid, 2)
        return head - n + 1, bool(changed)

    def _flush(self, batch):
        """The batch's packages and deliveries sent with the COMMIT, in one round trip
        with the positions' UPDATE (``commit_now``), not a round trip for the
        positions and one more for the rest: the inserts count their positions back
        from the head the UPDATE left, ``LAST_INSERT_ID()``, which the flush learns
        from the UPDATE's result.  The delivery rows come from one JSON text
        (``JSON_TABLE``), as ``_insert_deliveries`` sends them.

        Whether another transaction changed members since a channel row's members
        were read (``_check_members``) is asked by the UPDATE itself: it adds the
        largest BIGINT to the head if they did, and the overflow fails it (in every
        SQL mode), so the server runs nothing of the query after it, the COMMIT
        included.  The flush then goes the way ``_SQLStore._flush`` goes, in the
        transaction still open (its claims' deletion sent again, deleting nothing).
        A batch with joins or leaves, too large for a statement, or on a server
        without JSON_TABLE goes that way too: the positions first, a round trip of
        their own."""
        if not self._json_table or not batch.pending or batch.changes \
                or not hasattr(batch.cur, "commit_now"):
            return super()._flush(batch)
        n = len(batch.pending)
        packages = self._chunks([(n - index, stamp, ts, body, channel) for index, (
            stamp, ts, body, _, channel) in enumerate(batch.pending, 1)], 500)
        deliveries = self._deliveries_text(batch.pending, 1)
        if len(packages) > 1 or not self._fits(deliveries, math.inf):
            return super()._flush(batch)
        writes = self._writes(batch)
        self._forget_claims(writes, batch.claims)
        check = self._check_members(batch)
        try:                                # (where the server takes one statement a
            if check:                       # query, each goes as it is kept)
                writes.execute("UPDATE comet_meta SET head = LAST_INSERT_ID(head + %s + (changes"
                               " > %s) * 9223372036854775807)", (n, batch.read_changes))
            else:
                writes.execute("UPDATE comet_meta SET head = LAST_INSERT_ID(head + %s)", (n,))
            writes.execute("INSERT INTO comet_packages (pos, stamp, ts, body, channel) VALUES "
                           + ", ".join(["(LAST_INSERT_ID() - %s, %s, %s, %s, %s)"] * n),
                           list(itertools.chain.from_iterable(packages[0])))
            if deliveries != "[]":          # their positions counted from 1 here
                writes.execute(self._json_deliveries.format(
                    position="LAST_INSERT_ID() - %s + pos"), (n, deliveries))
            head = batch.cur.commit_now()
        except self._pymysql.err.OperationalError as error:
            if not check or error.args[0] != _MYSQL_OUT_OF_RANGE or batch.cur.last_id:
                raise
            return super()._flush(batch)    # members changed: nothing ran from the UPDATE
        return self._appended(batch, head - n + 1)

    def _insert_deliveries(self, cur, pending, first):
        """As one JSON text the server takes apart (``JSON_TABLE``): PyMySQL escapes
        it at once, where it would escape each value in Python (a channel of 10,000
        is 20,000 of them).  Without JSON_TABLE (MySQL before 8.0.4, MariaDB before
        10.6), or for rows whose text could outgrow a statement, as values."""
        if not self._json_table:
            return super()._insert_deliveries(cur, pending, first)
        text = self._deliveries_text(pending, first)
        if text == "[]":                    # channel rows only: nothing to send
            return
        if not self._fits(text, math.inf):
            return super()._insert_deliveries(cur, pending, first)
        cur.execute(self._json_deliveries.format(position="pos"), (text,))

    # The delivery rows of a JSON text of [recipient, position, body] (as
    # ``_deliveries_text`` makes it), each at the SQL ``position`` made of ``pos``.
    _json_deliveries = (
        "INSERT INTO comet_deliveries (recipient, pos, body) SELECT recipient, {position}, body"
        " FROM JSON_TABLE(%s, '$[*]' COLUMNS (recipient VARCHAR(256) CHARACTER SET utf8mb4"
        " PATH '$[0]', pos BIGINT PATH '$[1]', body MEDIUMTEXT CHARACTER SET utf8mb4"
        " PATH '$[2]')) AS d")

    @staticmethod
    def _deliveries_text(pending, first):
        """The delivery rows of ``pending`` (the first package at position ``first``)
        as JSON text, ``[recipient, position, body]`` each; none for a channel row."""
        return _json_text([(recipient, position, body)
                           for position, (_, _, _, targets, channel) in enumerate(pending, first)
                           if channel is None for recipient, body in targets])


class _HeldIO:
    """libc's ``poll``, ``recv`` and ``send`` through ``ctypes.PyDLL``: socket calls that
    keep the GIL, for the drivers' round trips of a push (``_HeldPQ``, ``_HeldReader``).

    Each wait for the server holds the GIL for ``budget`` ms at most, and only while
    the server answers quickly (``waits``); a wait that goes on past it lets the GIL go."""

    POLLIN, POLLOUT = 1, 4
    _DONTWAIT, _NOSIGNAL = 0x40, 0x4000     # Linux's MSG_ flags
    budget = 5                              # ms a wait for the server holds the GIL

    def __init__(self):
        import ctypes
        self.ctypes = ctypes
        self.waits = _Quick(1.0)            # a server on the same host answers in under 1 ms
        libc = ctypes.PyDLL(None, use_errno=True)
        pointer, integer, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        _declare(self, libc, {
            "poll": (integer, [pointer, ctypes.c_ulong, integer]),
            "recv": (ctypes.c_ssize_t, [integer, pointer, size, integer]),
            "send": (ctypes.c_ssize_t, [integer, ctypes.c_char_p, size, integer]),
        }, prefix="_")
        self._pollfd = type("pollfd", (ctypes.Structure,), {"_fields_": [
            ("fd", integer), ("events", ctypes.c_short), ("revents", ctypes.c_short)]})

    @classmethod
    def load(cls):
        """The calls, or None where they cannot hold the GIL (not Linux, not CPython, no GIL)."""
        if (sys.implementation.name != "cpython" or not sys.platform.startswith("linux")
                or not getattr(sys, "_is_gil_enabled", lambda: True)()):
            return None
        try:
            return cls()
        except (ImportError, OSError, AttributeError) as error:
            log.debug("comet: socket calls through the drivers only: %s", error)
            return None

    def begin(self):
        """``(started, deadline)`` of a round trip: its waits may hold the GIL until
        ``deadline`` (``started`` itself while the server has not been answering quickly)."""
        started = time.perf_counter()
        return started, (started + self.budget / 1000 if self.waits.hold() else started)

    def end(self, started, deadline):
        """The round trip ``begin`` gave these is done: timed if it held the GIL."""
        if deadline > started:
            self.waits.took(started)

    def wait(self, fd, events, deadline):
        """Whether ``fd`` became ready before ``deadline``, waiting holding the GIL."""
        left = math.ceil((deadline - time.perf_counter()) * 1000)
        pollfd = self.ctypes.byref(self._pollfd(fd, events, 0))
        return left > 0 and self._poll(pollfd, 1, left) > 0

    def recv(self, fd, buffer):
        """What ``fd`` has now (b"" at its end), or None if nothing yet or an error."""
        got = self._recv(fd, buffer, len(buffer), self._DONTWAIT)
        return self.ctypes.string_at(buffer, got) if got >= 0 else None

    def send(self, fd, data):
        """How much of ``data`` went out now (0 when none could)."""
        return max(self._send(fd, data, len(data), self._DONTWAIT | self._NOSIGNAL), 0)


class _HeldPQ:
    """libpq as psycopg has it loaded, called through ctypes, so that a push's
    statements go to PostgreSQL letting go of the GIL once a round trip.

    psycopg lets go of the GIL around each libpq call and while it waits for the
    server, several times a statement.  On a threaded server each time the
    pushing thread wants it back it waits for the threads answering polls to give
    it up (at their next socket call, or when the switch interval, 5 ms, makes
    them): beside 8 threads running Python, a push to 100 recipients took 215 ms
    through psycopg and 2.8 ms held throughout (``bench/push_under_load.py``).

    Through ctypes a push's statements are sent and read holding the GIL, and
    the wait for the server's answer lets it go (``budget``: 0 ms held; ``_HeldIO``
    can hold it while the server answers quickly, as MySQL's waits do).  A push
    is two round trips (``_HeldPQCursor``), and a wait held stopped every thread
    answering polls while PostgreSQL answered, its COMMIT syncing the WAL among
    them: served on cheroot, six interleaved invocations each, a push's waits let
    go delivered a sixth more than held for 5 ms at most (beside threads that
    only compute, in process, the same push took 25 ms instead of 3.5 ms: a
    WSGI server's threads mostly wait on their sockets).

    psycopg still turns the parameters into PostgreSQL's (``PostgresQuery``) and
    the values read back into Python's (its loaders), so both are what its own
    cursor makes of them; where its internals or the library cannot be reached
    (not Linux, another psycopg, a library that is not psycopg's), the store runs
    every statement through psycopg.
    """

    _COMMAND_OK, _TUPLES_OK, _PIPELINE_SYNC, _PIPELINE_ABORTED = 1, 2, 10, 11
    budget = 0                              # ms a wait for the server holds the GIL

    def __init__(self, psycopg, path, io):
        import ctypes
        from psycopg._queries import PostgresQuery
        self._ctypes = ctypes
        self._psycopg = psycopg
        self.query = PostgresQuery
        self.io = io
        io.budget = self.budget
        lib = ctypes.PyDLL(path)
        pointer, integer, text, oid = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint
        signatures = {
            "PQsendQueryParams": (integer, [pointer, text, integer, ctypes.POINTER(oid),
                                            ctypes.POINTER(text), ctypes.POINTER(integer),
                                            ctypes.POINTER(integer), integer]),
            "PQsendPrepare": (integer, [pointer, text, text, integer, ctypes.POINTER(oid)]),
            "PQsendQueryPrepared": (integer, [pointer, text, integer, ctypes.POINTER(text),
                                              ctypes.POINTER(integer), ctypes.POINTER(integer),
                                              integer]),
            "PQflush": (integer, [pointer]),
            "PQconsumeInput": (integer, [pointer]),
            "PQisBusy": (integer, [pointer]),
            "PQgetResult": (pointer, [pointer]),
            "PQresultStatus": (integer, [pointer]),
            "PQntuples": (integer, [pointer]),
            "PQnfields": (integer, [pointer]),
            "PQftype": (oid, [pointer, integer]),
            "PQgetvalue": (pointer, [pointer, integer, integer]),
            "PQgetlength": (integer, [pointer, integer, integer]),
            "PQgetisnull": (integer, [pointer, integer, integer]),
            "PQcmdTuples": (text, [pointer]),
            "PQresultErrorField": (text, [pointer, integer]),
            "PQresultErrorMessage": (text, [pointer]),
            "PQerrorMessage": (text, [pointer]),
            "PQclear": (None, [pointer]),
            "PQenterPipelineMode": (integer, [pointer]),     # libpq 14 and later
            "PQexitPipelineMode": (integer, [pointer]),
            "PQpipelineSync": (integer, [pointer]),
            "PQsocket": (integer, [pointer]),
            "PQlibVersion": (integer, []),
        }
        _declare(self, lib, signatures, strip=len("PQ"))
        if self.libVersion() != psycopg.pq.version():
            raise OSError("ctypes reached another libpq than psycopg's")
        self.prepared = weakref.WeakKeyDictionary()     # connection -> {statement: name}
        self.names = itertools.count()      # never one name twice in a process

    @classmethod
    def load(cls, psycopg):
        """The library, or None where the store cannot hold the GIL through it."""
        io = _HeldIO.load()
        if io is None:
            return None
        try:
            with open("/proc/self/maps") as maps:   # the file psycopg's libpq was loaded from
                paths = {line.split(None, 5)[-1].strip() for line in maps if "libpq" in line}
            paths = [path for path in paths if os.path.basename(path).startswith("libpq")]
            if len(paths) != 1:
                raise OSError(f"libpq loaded from {len(paths)} files")
            return cls(psycopg, paths[0], io)
        except (ImportError, OSError, AttributeError) as error:
            log.debug("comet: PostgreSQL statements through psycopg only: %s", error)
            return None


def _lending_psycopg(psycopg):
    """psycopg's connection class, ``_Lending``: a hook's statements go through a
    cursor, a transaction block or a pipeline, so the first of those it makes ends
    the loan (the transaction's kept ``BEGIN`` sent)."""

    class Connection(_Lending, psycopg.Connection):

        def cursor(self, *args, **kwargs):
            self._end_loan()
            return super().cursor(*args, **kwargs)

        def transaction(self, *args, **kwargs):
            self._end_loan()
            return super().transaction(*args, **kwargs)

        def pipeline(self):
            self._end_loan()
            return super().pipeline()

    return Connection


class _HeldPQCursor:
    """A cursor of a psycopg connection whose statements run through ``_HeldPQ``,
    each to its end (every result read), so that psycopg finds the connection as
    its own statements leave it; its rows are kept until the next.

    A statement with parameters is prepared on its connection the first time
    (``_most_prepared`` of them a connection), as psycopg prepares a statement
    run often: PostgreSQL then plans a push's statements once, not at each push
    (planning the members' read took it longer than running it).  psycopg
    prepares nothing of its own on these connections (``PostgreSQLStore._connect``):
    a rollback through psycopg deallocates every statement of the connection if
    psycopg has prepared one.  A statement deallocated all the same (``DEALLOCATE``
    sent by an application's hook) fails its transaction once, and the
    connection's statements are prepared again, under new names."""

    _most_prepared = 64

    def __init__(self, conn, library):
        self._conn = conn
        self._lib = library
        self._tx = library._psycopg.adapt.Transformer(conn)
        self._loaders = {}                  # type oid -> psycopg's loader of its text
        self._rows = []
        self.rowcount = -1
        self._later = []                    # statements to send with the next one
        self._committed = False             # a COMMIT went with the last statement

    def later(self, sql, args=()):
        """``sql`` is sent with the next statement, in its round trip (a BEGIN, a
        DELETE whose count is not wanted); nothing of its result is kept."""
        self._later.append(self._statement(sql, args))

    def send_later(self):
        """What waits to go with the next statement, now: the connection is wanted as
        it is (a hook's)."""
        if self._later:
            statements, self._later = self._later, []
            self._run(statements, None)

    def forget_later(self):
        """What waits to go with the next statement is not sent: the transaction it
        was for is rolled back."""
        self._later.clear()

    def execute(self, sql, args=(), commit=False):
        """Runs ``sql`` after what waits to go with it; with ``commit``, a COMMIT after
        it.  Several statements go in one round trip (libpq's pipeline mode)."""
        self._conn.lent = None              # the transaction's own: a hook's call is over
        statement = self._statement(sql, args)
        statements, self._later = self._later + [statement], []
        if commit:
            statements.append(self._statement("COMMIT"))
        self._run(statements, len(statements) - 1 - commit)
        self._committed = commit
        return self

    def _pgconn(self):
        pgconn = self._conn.pgconn.pgconn_ptr
        if pgconn is None:
            raise self._lib._psycopg.OperationalError("the connection is closed")
        return pgconn

    def _statement(self, sql, args=()):
        """A call sending ``sql`` with ``args`` on a connection: prepared, if it has
        parameters (preparing it now if need be), else as it is."""
        lib, ctypes = self._lib, self._lib._ctypes
        query = lib.query(self._tx)
        query.convert(sql, args)
        params = [None if value is None else bytes(value) for value in query.params or ()]
        n = len(params)
        types = (ctypes.c_uint * n)(*query.types) if query.types else None
        name = self._prepared(self._pgconn(), query, n, types)
        values = (ctypes.c_char_p * n)(*params)
        lengths = (ctypes.c_int * n)(*(0 if value is None else len(value) for value in params))
        formats = (ctypes.c_int * n)(*query.formats or ())
        if name:
            return lambda pgconn: lib.sendQueryPrepared(pgconn, name, n, values, lengths,
                                                        formats, 0)
        return lambda pgconn: lib.sendQueryParams(pgconn, query.query, n, types, values,
                                                  lengths, formats, 0)

    def _run(self, statements, keep):
        """Sends ``statements`` (in a pipeline if several) and reads their results,
        keeping the rows of statement ``keep``."""
        lib = self._lib
        pgconn = self._pgconn()
        pipeline = len(statements) > 1
        if pipeline and not lib.enterPipelineMode(pgconn):
            raise self._lost(pgconn)
        try:
            if not (all(send(pgconn) for send in statements)
                    and (not pipeline or lib.pipelineSync(pgconn))):
                raise self._lost(pgconn)
            self._finish(pgconn, keep, pipeline)
        except lib._psycopg.errors.InvalidSqlStatementName as error:
            # Deallocated behind the store's back: prepared again, and this push's
            # transaction fails as on a connection lost, with a 503.
            lib.prepared.pop(self._conn, None)
            raise lib._psycopg.OperationalError(f"a prepared statement is gone: {error}") from error
        finally:
            if pipeline:
                lib.exitPipelineMode(pgconn)

    def _prepared(self, pgconn, query, n, types):
        """The name ``query`` is prepared under on this connection (prepared now if it
        was not), or None to send it with its parameters."""
        if not n:
            return None
        prepared = self._lib.prepared.setdefault(self._conn, {})
        key = query.query, tuple(query.types)    # the same text with other types: another
        name = prepared.get(key)
        if name is None and len(prepared) < self._most_prepared:
            name = b"comet_%d" % next(self._lib.names)
            if not self._lib.sendPrepare(pgconn, name, query.query, n, types):
                raise self._lost(pgconn)
            self._finish(pgconn)
            prepared[key] = name
        return name

    def _finish(self, pgconn, keep=0, pipeline=False):
        """Waits for what was sent and reads every result (in a pipeline, up to its
        sync); keeps the rows of statement ``keep``; raises the first error."""
        lib = self._lib
        started, deadline = lib.io.begin()
        while lib.flush(pgconn):            # the rest of a large statement, as it drains
            self._wait(pgconn, deadline, _HeldIO.POLLIN | _HeldIO.POLLOUT)
        error, statement = None, 0
        while True:
            while lib.isBusy(pgconn):
                self._wait(pgconn, deadline, _HeldIO.POLLIN)
            result = lib.getResult(pgconn)
            if not result:                  # a statement's results end
                if not pipeline:
                    break
                statement += 1
                continue
            try:
                status = lib.resultStatus(result)
                if status == lib._PIPELINE_SYNC:
                    break
                if status != lib._PIPELINE_ABORTED:     # (not run: an error came before)
                    error = error or self._read(result, status, statement == keep)
            finally:
                lib.clear(result)
        lib.io.end(started, deadline)
        if error is not None:
            raise error

    def _wait(self, pgconn, deadline, events):
        """Until the server's answer (or room to send) comes: holding the GIL until
        ``deadline``, then letting it go."""
        lib = self._lib
        fd = lib.socket(pgconn)
        ready = lib.io.wait(fd, events, deadline)
        if not ready:                       # letting go of the GIL (poll: any fd number)
            poller = select.poll()
            poller.register(fd, events)
            ready = poller.poll(1000)
        if ready and not lib.consumeInput(pgconn):
            raise self._lost(pgconn)

    def _read(self, result, status, keep=True):
        """Keeps ``result``'s rows and count (if ``keep``), or returns its error."""
        lib = self._lib
        if status not in (lib._TUPLES_OK, lib._COMMAND_OK):
            return self._error(result)
        if not keep:
            return None
        if status == lib._TUPLES_OK:
            loaders = [self._loader(lib.ftype(result, column))
                       for column in range(lib.nfields(result))]
            string_at, value, length, isnull = (
                lib._ctypes.string_at, lib.getvalue, lib.getlength, lib.getisnull)
            self._rows = [tuple(
                None if isnull(result, row, column)
                else load(string_at(value(result, row, column), length(result, row, column)))
                for column, load in enumerate(loaders)) for row in range(lib.ntuples(result))]
        else:
            self._rows = []
        count = lib.cmdTuples(result)
        self.rowcount = int(count) if count else -1
        return None

    def _loader(self, oid):
        load = self._loaders.get(oid)
        if load is None:
            load = self._loaders[oid] = self._tx.get_loader(oid, 0).load    # text format
        return load

    def _error(self, result):
        psycopg = self._lib._psycopg
        message = (self._lib.resultErrorMessage(result) or b"").decode(errors="replace").strip()
        state = (self._lib.resultErrorField(result, ord("C")) or b"").decode()
        try:
            kind = psycopg.errors.lookup(state)
        except KeyError:
            kind = psycopg.DatabaseError
        return kind(message or "the statement failed")

    def _lost(self, pgconn):
        message = (self._lib.errorMessage(pgconn) or b"").decode(errors="replace").strip()
        return self._lib._psycopg.OperationalError(message or "the connection was lost")

    def commit(self):
        if not self._committed:             # (else it went with the last statement)
            self.execute("COMMIT")
        self._committed = False

    def fetchone(self):
        return self._rows[0] if self._rows else None

    def fetchall(self):
        return self._rows

    def close(self):
        pass



class _Later:
    """A cursor with ``later`` (MySQL's, PostgreSQL's held one) as a cursor whose
    ``execute`` keeps each statement to go with its next one."""

    def __init__(self, cursor):
        self.execute = cursor.later


class _PostgreSQLTransaction(_SQLTransaction):

    def _members(self, channel, unless=None):
        # One row, not one a member: each value read back through ctypes costs a
        # few calls of libpq's (``_HeldPQ``), and json.loads reads them all in C.
        changes, members = self._run(
            "SELECT changes, CASE WHEN changes = ?::bigint THEN NULL ELSE (SELECT"
            " coalesce(json_agg(client), '[]')::text FROM comet_members WHERE channel = ?) END"
            " FROM comet_meta", (unless, channel)).fetchone()
        return (None if members is None else json.loads(members)), changes


class PostgreSQLStore(_SQLStore):
    """A PostgreSQL database through psycopg 3: shared by processes and hosts,
    which wake each other's polls at commit by ``LISTEN``/``NOTIFY``.

    Positions come from one counter row updated at the end of each
    transaction, as in MySQL: its row lock makes writers commit in position
    order.  The same statement NOTIFYs the new head and a token naming the
    process on the channel ``comet`` (once a commit, a whole group-commit
    batch included; PostgreSQL sends it at the commit, and not at all on a
    rollback), and each process keeps one connection LISTENing on a thread of
    its own, so that it tails at once for the other processes' commits rather
    than at its next ``tail_interval``.  ``notify=False`` leaves both
    out (every NOTIFY takes a lock of the whole cluster for a moment at
    commit): processes then find each other's commits by tailing alone.

    Client ids, channel names and stamps are ``text COLLATE "C"``: compared and
    indexed byte for byte whatever the database's locale, as in SQLite.

    The URL is libpq's (``?sslmode=require``, ``?host=/run/postgresql``...);
    unless it says otherwise, a connection attempt gives up after 3 s and a
    connection to a host that went away fails within about 8 s.
    """

    _placeholder = "%s"
    assumes_members = True                  # a broadcast's members as last read (_assumes)
    holds_nul = False                       # text cannot hold U+0000
    _max_variables = 65535                  # parameters of one statement in PostgreSQL's protocol
    # UTC by definition: no time zone of the session applies.
    _clock = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT"
    _batches = 4                            # as MySQL: a slow hook holds up a few pushes
    _pool_size = 16                         # connections of a process, besides the LISTEN one
    _fold_members = 1000                    # channel rows' members a flush sends (_flush)
    _transaction_type = _PostgreSQLTransaction
    # One statement, so one transaction: the tables are made together or not at
    # all, by one process at a time (two CREATE TABLE IF NOT EXISTS at once can
    # fail), and a database that has them all is left alone (CREATE INDEX IF NOT
    # EXISTS would take a lock that deadlocks with the pushes of other processes);
    # comet_purge, which tables made by earlier versions lack, is made on its own.
    _schema = ("""DO $$ BEGIN
        PERFORM pg_advisory_xact_lock(6909, 1);
        CREATE TABLE IF NOT EXISTS comet_purge (one INT PRIMARY KEY, purged BIGINT NOT NULL);
        IF (SELECT count(to_regclass(name)) FROM unnest(ARRAY['comet_meta', 'comet_packages',
                'comet_deliveries', 'comet_purged', 'comet_purge_log', 'comet_members',
                'comet_clients', 'comet_spans']) AS name) = 8 THEN
            RETURN;
        END IF;
        CREATE TABLE IF NOT EXISTS comet_meta (one INT PRIMARY KEY, id TEXT NOT NULL,
            head BIGINT NOT NULL, purged BIGINT NOT NULL, changes BIGINT NOT NULL DEFAULT 0);
        CREATE TABLE IF NOT EXISTS comet_packages (pos BIGINT PRIMARY KEY,
            stamp TEXT COLLATE "C" NOT NULL UNIQUE, ts BIGINT NOT NULL, body TEXT NOT NULL,
            channel TEXT COLLATE "C");
        CREATE INDEX IF NOT EXISTS comet_packages_ts ON comet_packages (ts);
        CREATE TABLE IF NOT EXISTS comet_deliveries (recipient TEXT COLLATE "C" NOT NULL,
            pos BIGINT NOT NULL, body TEXT, PRIMARY KEY (recipient, pos));
        CREATE INDEX IF NOT EXISTS comet_deliveries_pos ON comet_deliveries (pos);
        CREATE TABLE IF NOT EXISTS comet_purged (recipient TEXT COLLATE "C" PRIMARY KEY,
            pos BIGINT NOT NULL);
        CREATE TABLE IF NOT EXISTS comet_purge_log (pos BIGINT PRIMARY KEY, ts BIGINT NOT NULL);
        CREATE TABLE IF NOT EXISTS comet_members (channel TEXT COLLATE "C" NOT NULL,
            client TEXT COLLATE "C" NOT NULL, sender TEXT NOT NULL, joined BIGINT NOT NULL,
            PRIMARY KEY (channel, client));
        CREATE TABLE IF NOT EXISTS comet_clients (client TEXT COLLATE "C" PRIMARY KEY,
            seen BIGINT NOT NULL);
        -- Tables made by an earlier version: see _SQLStore._upgrade.
        ALTER TABLE comet_meta ADD COLUMN IF NOT EXISTS changes BIGINT NOT NULL DEFAULT 0;
        CREATE TABLE IF NOT EXISTS comet_spans (channel TEXT COLLATE "C" NOT NULL,
            client TEXT COLLATE "C" NOT NULL, from_pos BIGINT NOT NULL, to_pos BIGINT NOT NULL,
            PRIMARY KEY (client, channel, to_pos));
        CREATE INDEX IF NOT EXISTS comet_spans_channel ON comet_spans (channel, from_pos);
        INSERT INTO comet_spans SELECT channel, client, head + 1, 9223372036854775807
            FROM comet_members, comet_meta ON CONFLICT DO NOTHING;
        ALTER TABLE comet_packages ADD COLUMN IF NOT EXISTS channel TEXT COLLATE "C";
        CREATE INDEX IF NOT EXISTS comet_packages_channel ON comet_packages (channel, pos)
            WHERE channel IS NOT NULL;
    END $$""",)

    def __init__(self, url, notify=True):
        try:
            import psycopg
        except ImportError:
            raise ImportError('a postgresql:// store needs psycopg:'
                              ' pip install "comet-py[postgresql]"') from None
        self._psycopg = psycopg
        self._errors = (psycopg.OperationalError, psycopg.InterfaceError)
        self._library = _HeldPQ.load(psycopg)
        self._connection_class = _lending_psycopg(psycopg)
        self.notify = notify
        # keepalives: a connection whose host is gone fails in 5 + 3 x 1 s, not hours.
        self._params = dict(connect_timeout=3, keepalives=1, keepalives_idle=5,
                            keepalives_interval=1, keepalives_count=3, tcp_user_timeout=8000,
                            application_name="comet")
        self._params.update(psycopg.conninfo.conninfo_to_dict(url))
        self.url = "postgresql://{}@{}:{}/{}".format(*(self._params.get(name, "") for name in (
            "user", "host", "port", "dbname")))
        self._closed = threading.Event()
        self._listening = None              # the process whose listening thread runs
        self._origins = {}                  # pid -> the token its NOTIFYs carry
        super().__init__()

    def members(self, channel):
        return {} if "\x00" in channel else super().members(channel)   # none can be stored

    def _connect(self):
        # Every write transaction is opened by _begin; every read is one statement.
        # Where a push's statements are held (and prepared by _HeldPQCursor), psycopg
        # prepares none of its own, whose rollback would deallocate those.
        held = self._library is not None and not _green()
        return self._connection_class.connect(**self._params, autocommit=True,
                                              prepare_threshold=None if held else 5)

    def _held_cursor(self, batch):
        return _HeldPQCursor(batch.conn, self._library) if self._library else None

    def _assumes(self, batch):
        # Where the flush's statement and COMMIT go in one round trip: the members'
        # read saved is one of two.  (psycopg's cursor would send the savepoint alone.)
        return isinstance(batch.cur, _HeldPQCursor)

    def _begin(self, cur):
        # Each statement sees what is committed now, whatever the database's default.
        # A held cursor sends it with the transaction's first statement.
        getattr(cur, "later", cur.execute)("BEGIN ISOLATION LEVEL READ COMMITTED")

    def _flush(self, batch):
        """The batch's packages in one statement: the positions taken (and the
        NOTIFY), the packages and their deliveries inserted, each in a WITH clause
        of its own, at positions counted back from the new head.  With the COMMIT,
        a batch's end costs two round trips to the server, not four, which under
        gevent is two fewer waits for every other ready greenlet to run; a held
        cursor sends the COMMIT with the statement, one round trip, unless the batch
        has joins or leaves to write after it, or channel rows of more than
        ``_fold_members`` members in all.

        Where another transaction changed members since a channel row's members
        were read (``_check_members``), the statement itself writes the row as a
        package with delivery rows for the members read, as ``_SQLStore._flush``
        would."""
        if not batch.pending:
            return super()._flush(batch)    # claims, joins or leaves alone
        held = isinstance(batch.cur, _HeldPQCursor)
        writes = self._writes(batch)
        self._forget_claims(writes, batch.claims)
        n = len(batch.pending)
        stamps, times, bodies, targets, channels = zip(*batch.pending)
        # The packages and their deliveries as JSON arrays: psycopg would quote each
        # value of a text array in Python (17 ms for a channel of 10,000 recipients,
        # a fifth of a push's Python for one package), json.dumps does it in C.
        args = dict(n=n, stamp=_json_text(stamps), ts=_json_text(times),
                    body=_json_text(bodies), channel=_json_text(channels), read=None)
        positions = range(1 - n, 1)
        check = self._check_members(batch)
        recipients, to, tailored, members, at = [], [], [], [], []
        for position, each, channel in zip(positions, targets, channels):
            if channel is not None:         # a channel row: its members are its recipients
                if check:                   # (wanted only if they changed since read)
                    members += map(_FIRST, each)
                    at += [position] * len(each)
                continue
            recipients += map(_FIRST, each)
            to += [position] * len(each)
            tailored += map(_SECOND, each)                     # None: the package's
        args.update(recipient=_json_text(recipients), to=_json_text(to),
                    tailored=_json_text(tailored), members="[]", at="[]")
        fold = len(members) <= self._fold_members
        if check and fold:
            args.update(read=batch.read_changes, members=_json_text(members), at=_json_text(at))
        notify = ""
        if self.notify:
            notify = ", pg_notify('comet', head || ' ' || %(origin)s)"
            args["origin"] = self._origin()
        overflow = ""
        if batch.assumed:
            # Members taken as last read (_SQLTransaction.member_ids) are checked by
            # the UPDATE: it overflows the head if any changed since, so that nothing
            # of the statement runs, and the flush reads them again (_recheck).
            overflow = " + CASE WHEN changes > %(read)s THEN 9223372036854775807 ELSE 0 END"
            args["read"] = batch.read_changes
        # The meta row is returned as the UPDATE left it, after waiting for its lock:
        # ``changes`` then counts every membership change committed before, and
        # ``moved`` is whether one committed since the channel rows' members were read.
        sql = (f"WITH meta AS (UPDATE comet_meta SET head = head + %(n)s{overflow}"
               f"  RETURNING head, changes, coalesce(changes > %(read)s, false) AS moved{notify}),"
               " packages AS (INSERT INTO comet_packages (pos, stamp, ts, body, channel)"
               "  SELECT head - %(n)s + i, stamp, ts::bigint, body,"
               "   CASE WHEN moved THEN NULL ELSE channel END"
               "  FROM meta, ROWS FROM (json_array_elements_text(%(stamp)s::text::json),"
               "   json_array_elements_text(%(ts)s::text::json),"
               "   json_array_elements_text(%(body)s::text::json),"
               "   json_array_elements_text(%(channel)s::text::json))"
               "   WITH ORDINALITY AS p (stamp, ts, body, channel, i)),"
               " deliveries AS (INSERT INTO comet_deliveries (recipient, pos, body)"
               "  SELECT recipient, head + pos::bigint, body FROM meta, ROWS FROM ("
               "   json_array_elements_text(%(recipient)s::json),"
               "   json_array_elements_text(%(to)s::json),"
               "   json_array_elements_text(%(tailored)s::json)) AS d (recipient, pos, body)"
               "  UNION ALL SELECT recipient, head + pos::bigint, NULL FROM meta, ROWS FROM ("
               "   json_array_elements_text(%(members)s::text::json),"
               "   json_array_elements_text(%(at)s::text::json)) AS m (recipient, pos)"
               "  WHERE moved)"
               " SELECT head FROM meta")
        if batch.assumed:                   # what a failing statement undoes
            batch.cur.later("SAVEPOINT comet_assumed")
        try:
            if held and fold and not batch.changes:
                head, = batch.cur.execute(sql, args, commit=True).fetchone()
            else:
                head, = batch.cur.execute(sql, args).fetchone()
        except self._psycopg.errors.NumericValueOutOfRange:
            if not batch.assumed:
                raise
            batch.cur.execute("ROLLBACK TO SAVEPOINT comet_assumed")
            self._recheck(batch)
            return self._flush(batch)
        first = head - n + 1
        if check and not fold:
            # Too many members to send them each time: written after, if they changed.
            changes, = batch.cur.execute("SELECT changes FROM comet_meta").fetchone()
            if changes > batch.read_changes:
                batch.cur.execute("UPDATE comet_packages SET channel = NULL WHERE pos >= %s"
                                  " AND pos <= %s AND channel IS NOT NULL", (first, head))
                self._insert_deliveries(batch.cur, [
                    (*package[:3], package[3] if package[4] is not None else [], None)
                    for package in batch.pending], first)
        self._write_changes(batch, first, writes)
        return self._appended(batch, first)

    def _take_positions(self, cur, n):
        return cur.execute("UPDATE comet_meta SET head = head + %s RETURNING head",
                           (n,)).fetchone()[0]

    def _origin(self):
        """The token of this process's NOTIFYs, by which its listener knows its own
        (made once a process: each token costs a system call, which lets the GIL go)."""
        pid = os.getpid()
        origin = self._origins.get(pid)
        if origin is None:
            origin = self._origins.setdefault(pid, secrets.token_hex(4))
        return origin

    # Each column's type, for _insert's arrays.
    _column_types = {"pos": "bigint", "ts": "bigint", "seen": "bigint", "stamp": "text",
                     "body": "text", "recipient": "text", "client": "text", "channel": "text"}

    def _insert(self, cur, sql, rows, conflict=""):
        """``sql`` ending in ``VALUES``, for ``rows``: one statement whatever their
        number, each column sent as one array (``SELECT * FROM unnest(...)``).  Its
        text is the same for ten rows or ten thousand, so psycopg parses it once and
        PostgreSQL plans it once, and no value needs a placeholder of its own (a push
        to a channel of 10,000 members was 20,000 of them, parsed in Python)."""
        if not rows:
            return
        columns = sql[sql.rindex("(") + 1:sql.rindex(")")].split(", ")
        arrays = ", ".join(f"%s::{self._column_types[column]}[]" for column in columns)
        cur.execute(f"{sql[:-len('VALUES')]}SELECT * FROM unnest({arrays}){conflict}",
                    [list(values) for values in zip(*rows)])

    def _upsert(self, table, columns, key, replace=True):
        updates = ", ".join(f"{column} = EXCLUDED.{column}" for column in columns
                            if column not in key)
        action = "UPDATE SET " + updates if replace else "NOTHING"
        return (f"INSERT INTO {table} ({', '.join(columns)})",
                f" ON CONFLICT ({', '.join(key)}) DO {action}")

    def listen(self, callback):
        with self._pool_lock:
            if not self.notify or self._listening == os.getpid() or self._closed.is_set():
                return
            self._listening = os.getpid()
        threading.Thread(target=self._listen, args=(callback,), name="comet-listen",
                         daemon=True).start()

    def _listen(self, callback):
        """LISTEN on a connection of its own, calling back at each NOTIFY of another
        process, and with None each time it is connected again, for what it may
        have missed."""
        again = False
        while not self._closed.is_set():
            try:
                with contextlib.closing(self._connect()) as conn:
                    conn.execute("LISTEN comet")
                    if again:
                        callback(None)
                    again = True
                    while not self._closed.is_set():
                        for notify in conn.notifies(timeout=1.0):
                            head, _, origin = notify.payload.partition(" ")
                            if origin != self._origin():    # this process knows its own
                                callback(int(head) if head.isdigit() else None)
            except Exception as error:
                if self._closed.is_set():
                    return                  # closed while it listened
                if isinstance(error, self._errors):
                    log.warning("comet: listening to %s failed: %s; again in 1 s", self.url, error)
                else:
                    log.exception("comet: listening to %s failed; again in 1 s", self.url)
            self._closed.wait(1.0)

    def close(self):
        self._closed.set()
        super().close()


def open_store(url):
    """A store from its URL: ``memory:``, ``sqlite:///PATH``, ``mysql://USER:PASS@HOST:PORT/DB``
    or ``postgresql://USER:PASS@HOST:PORT/DB`` (``postgres://`` too)."""
    if url == "memory:":
        return MemoryStore()
    if url.startswith("sqlite:///"):
        return SQLiteStore(url[len("sqlite:///"):])
    if url.startswith("mysql://"):
        return MySQLStore(url)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgreSQLStore(url)
    raise ValueError(f"unknown store URL {url!r}: use memory:, sqlite:///PATH, mysql://..."
                     " or postgresql://...")


# --------------------------------------------------------------------------
# Delivery: parked polls and their wake-ups
# --------------------------------------------------------------------------

class _Waiter:
    """One parked poll: ``wait`` blocks on a held lock until ``wake`` releases it.
    ``relayed`` is true while the poll holds the relay of its threads' wake-up
    (``_Parking``), ``gone`` once it has left the parking."""

    __slots__ = ("client", "address", "after", "_signal", "relayed", "gone")

    def __init__(self, client, address, after):
        self.client = client
        self.address = address
        self.after = after
        self._signal = threading.Lock()     # cheaper than an Event: one lock, no Condition
        self._signal.acquire()
        self.relayed = self.gone = False

    def wait(self, timeout):
        return self._signal.acquire(timeout=timeout)

    def wake(self):
        """Release the poll; false if it was released already, and not waiting again yet."""
        if not self._signal.locked():
            return False
        try:
            self._signal.release()
        except RuntimeError:                # woken meanwhile by another waker
            return False
        return True


class _GreenWaiter(_Waiter):
    """A ``_Waiter`` for green threads, on an Event: gevent's is compiled, its lock
    is Python code.  A green thread is never switched between ``wait`` returning
    and the ``clear`` after it, so no wake-up is lost there."""

    __slots__ = ()

    def __init__(self, client, address, after):
        self.client = client
        self.address = address
        self.after = after
        self._signal = threading.Event()
        self.relayed = self.gone = False

    def wait(self, timeout):
        woken = self._signal.wait(timeout)
        self._signal.clear()
        return woken

    def wake(self):
        self._signal.set()


class _GeventWaiter(_GreenWaiter):
    """A ``_GreenWaiter`` whose timeout is a timer of gevent's loop, which sets its
    Event: ``Event.wait(timeout)`` makes a ``gevent.Timeout`` (Python code) for
    every wait, about 21,000 instructions a parked poll, an eighth of what a poll
    answer costs comet under gevent."""

    __slots__ = ()

    def wait(self, timeout):
        timer = sys.modules["gevent"].get_hub().loop.timer(timeout)    # made under gevent only
        timer.start(self._signal.set)
        try:
            self._signal.wait()
            woken = timer.active            # not fired: a wake-up set the Event
        finally:
            timer.close()
        self._signal.clear()
        return woken


class _Parking:
    """The polls held now, by client, and the limits on how many: per client,
    per remote address (a client can shed its cookie, not its address) and in all.

    On a threaded server the polls one wake-up is for are woken one after
    another, a relay: the waker wakes the first and goes on with its own work,
    and each woken poll wakes the next once it has made its answer, or before
    it queries the store (``hand_on``; ``unpark`` too, for one that leaves).  A
    thousand threads let go at once contend for the GIL with each other and with
    the thread still waking them, and all of them end up later (fan-out to 1,000
    on wsgiref and cheroot took twice the time of an ideal long poll, whose woken
    threads queue on its condition's lock); in a relay a woken thread sleeps
    once, on its own lock, and never waits for another's.  Green threads
    (gevent) do not contend, and are woken all at once.
    """

    def __init__(self, per_client, per_address, total):
        self.per_client = per_client
        self.per_address = per_address
        self.total = total
        self.count = 0
        self.wakes = 0                      # wake-ups begun so far: see Comet._poll
        self._waiters = {}                  # client -> [_Waiter]
        self._addresses = {}                # address -> polls parked
        self._lock = _section_lock()
        self.threads = threads = not _green()
        self._relay = collections.deque() if threads else None  # polls still to wake
        self._relaying = False              # a woken poll holds the relay
        self._waiter = _Waiter if threads else _GeventWaiter if _gevent() else _GreenWaiter
        self._hub = None                    # under gevent: the hub the polls park on
        if self._waiter is _GeventWaiter:   # and the thread it runs in
            import gevent.monkey
            self._thread_id = gevent.monkey.get_original("_thread", "get_ident")

    def in_hub(self):
        """True under gevent in the thread of the hub the polls park on."""
        return self._hub is not None and self._hub.thread_ident == self._thread_id()

    def soon(self, function, *args):
        """Call ``function(*args)`` now or, under gevent in the thread of the hub the
        polls park on, from its loop once this green thread next waits: a push is
        answered before it wakes its recipients, and a full garbage collection met
        while waking thousands of polls (~250 ms with 10,000 parked) no longer
        delays that answer."""
        if self.in_hub():
            self._hub.loop.run_callback(function, *args)
        else:
            function(*args)

    def later(self, seconds, function):
        """Under gevent in the hub's thread (``in_hub``): call ``function()`` from its
        loop in ``seconds``."""
        timer = self._hub.loop.timer(seconds)
        timer.start(self._ring, timer, function)

    @staticmethod
    def _ring(timer, function):
        timer.close()
        function()

    def park(self, client, address, after):
        with self._lock:
            if self.count >= self.total:
                raise _unavailable("too many polls are parked: try again")
            waiters = self._waiters.get(client, [])
            if len(waiters) >= self.per_client:
                raise CometError(429, "rate_limited", "too many polls at once for this client",
                                 retry_after=1)
            if address is not None and self._addresses.get(address, 0) >= self.per_address:
                raise CometError(429, "rate_limited", "too many polls at once from this address",
                                 retry_after=1)
            waiter = self._waiter(client, address, after)
            if self._waiter is _GeventWaiter:
                self._hub = sys.modules["gevent"].get_hub()
            self._waiters[client] = waiters + [waiter]
            if address is not None:
                self._addresses[address] = self._addresses.get(address, 0) + 1
            self.count += 1
            return waiter

    def unpark(self, waiter):
        with self._lock:
            waiter.gone = True
            if waiter.relayed:              # woken as it timed out, or it failed: hand on
                waiter.relayed = False
                self._wake_next()
            waiters = [w for w in self._waiters[waiter.client] if w is not waiter]
            if waiters:
                self._waiters[waiter.client] = waiters
            else:
                del self._waiters[waiter.client]
            if waiter.address is not None:
                parked = self._addresses[waiter.address] - 1
                if parked:
                    self._addresses[waiter.address] = parked
                else:
                    del self._addresses[waiter.address]
            self.count -= 1

    def wake(self, positions):
        """Wake each parked poll that has a package at a position past its cursor
        (committed, and readable, before this is called)."""
        waiters = self._waiters             # its lists are replaced, never changed
        with self._lock:                    # its keys are not
            self.wakes += 1
            # In the order they parked, as a condition's waiters are: under gevent that
            # is the order their connections, greenlets and timers were made in, and a
            # fan-out to 1,000 took an eighth less CPU than in the order of a set.
            # Through the recipients instead when they are a few of the polls parked.
            if 4 * len(positions) < len(waiters):
                clients = [client for client in positions if client in waiters]
            else:
                clients = [client for client in waiters if client in positions]
        due = [waiter for client in clients for waiter in waiters.get(client, ())
               if positions[client] > waiter.after]
        if self._relay is None:
            for waiter in due:
                waiter.wake()
            return
        with self._lock:
            self._relay.extend(due)
            if not self._relaying:
                self._wake_next()

    def _wake_next(self):
        """Hand the relay to the next poll in it still parked (under the lock)."""
        relay = self._relay
        while relay:
            waiter = relay.popleft()
            if not waiter.gone and waiter.wake():
                waiter.relayed = self._relaying = True
                return
        self._relaying = False

    def hand_on(self, waiter):
        """If ``waiter`` holds the relay, the next poll in it is woken (once, however
        often this is called)."""
        with self._lock:
            if waiter.relayed:
                waiter.relayed = False
                self._wake_next()

    def clients(self):
        return list(self._waiters)


class _Window:
    """The newest deliveries of a shared store, kept in this process so that
    woken polls are answered from memory, not by a query each.

    It holds every delivery at positions after ``base`` up to ``horizon``, and
    nothing beyond: this process's own commits extend it as soon as they are
    contiguous, the tail fills the gaps other processes' commits leave.
    Positions at or before ``base`` were let go, oldest first, to keep the
    window within ``max_bytes`` (each body counted once however many
    recipients share it, and each delivery its bookkeeping) and within
    retention.  The rows let go are cut from their recipients' inboxes later,
    an eighth of ``max_bytes`` at a time, one cut an inbox (a read never
    looks before ``base``): cutting each package's rows as it went moved every
    one of its recipients' rows behind it, 47 us a push to a channel of 100
    once the window was full.
    """

    _DELIVERY = 120                         # bytes a delivery costs besides its body, about

    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.base = self.horizon = None     # unknown until ``start``
        self._inbox = collections.defaultdict(list)     # recipient -> [(position, ts, body)]
        self._log = collections.deque()     # (position, ts, delivered, bytes), oldest first
        self._ahead = {}                    # position -> (ts, delivered): ours, past a gap
        self._ahead_to = frozenset()        # the recipients of what is ahead
        self._let_go_to = set()             # recipients with rows at or before base
        self._let_go_bytes = 0              # what those rows counted
        self._lock = _section_lock()

    def start(self, head):
        with self._lock:
            self.base = self.horizon = head

    def stop(self):
        """Forget everything: reads go to the store until ``start`` again."""
        with self._lock:
            self.base = self.horizon = None
            self._inbox, self._log = collections.defaultdict(list), collections.deque()
            self._ahead, self._ahead_to, self.bytes = {}, frozenset(), 0
            self._let_go_to, self._let_go_bytes = set(), 0

    def add(self, appended):
        """This process's commits: ``[(position, ts, [(recipient, body)])]``.  Returns
        the packages it takes in now, this process's earlier ones that waited past a
        gap included (None: the window has not started)."""
        with self._lock:
            if self.horizon is None:
                return None
            for position, ts, delivered in appended:
                if position > self.horizon:
                    self._ahead[position] = ts, delivered
            kept = []
            while self.horizon + 1 in self._ahead:
                ts, delivered = self._ahead.pop(self.horizon + 1)
                kept.append((self.horizon + 1, ts, delivered))
                self._keep(self.horizon + 1, ts, delivered)
            self._index_ahead()
            return kept

    def fill(self, head, appended):
        """What the tail read: every package after the horizon up to ``head``,
        shaped as ``add`` takes them."""
        with self._lock:
            if self.horizon is None:
                return
            for position, ts, delivered in appended:
                if position > self.horizon:
                    self._keep(position, ts, delivered)
            self.horizon = max(self.horizon, head)
            self._ahead = {p: entry for p, entry in self._ahead.items() if p > self.horizon}
            self._index_ahead()

    @property
    def waiting(self):
        """True while a commit of this process waits past a gap."""
        return bool(self._ahead)

    def _index_ahead(self):
        # Who has a delivery past a gap, whose reads the window cannot answer: a set,
        # so that a read does not look through what is ahead (while a push to a
        # channel of 10,000 waited past a gap, its 10,000 woken polls took 3 s of CPU
        # looking through it).  Nothing is ahead but while another process's commit
        # is not tailed yet.
        self._ahead_to = frozenset(recipient for _, delivered in self._ahead.values()
                                   for recipient, _ in delivered) if self._ahead else frozenset()

    def _keep(self, position, ts, delivered):
        # A row for each distinct body (by identity, as stores share them), shared by
        # its recipients; built without a Python step per recipient where it can be.
        bodies = list(map(_SECOND, delivered))
        distinct = dict(zip(map(id, bodies), bodies))
        rows = {key: (position, ts, body) for key, body in distinct.items()}
        size = sum(sys.getsizeof(row[2]) for row in rows.values()) + self._DELIVERY * len(delivered)
        inbox = self._inbox
        if len(rows) == 1:                  # every recipient gets the package as stored
            row, = rows.values()
            for recipient, _ in delivered:
                inbox[recipient].append(row)
        else:
            for recipient, body in delivered:
                inbox[recipient].append(rows[id(body)])
        self._log.append((position, ts, delivered, size))
        self.bytes += size
        self.horizon = position
        while self.bytes > self.max_bytes:
            self._let_go()
        if self._let_go_bytes > self.max_bytes >> 3:
            self._cut()

    def _let_go(self):
        self.base, _, delivered, size = self._log.popleft()
        self._let_go_to.update(map(_FIRST, delivered))
        self._let_go_bytes += size
        self.bytes -= size

    def _cut(self):
        """Cut the rows let go from their recipients' inboxes."""
        inboxes, past = self._inbox, (self.base, math.inf)
        for recipient in self._let_go_to:
            inbox = inboxes[recipient]
            del inbox[:bisect.bisect_right(inbox, past)]
            if not inbox:
                del inboxes[recipient]
        self._let_go_to, self._let_go_bytes = set(), 0

    def forget(self, before):
        """Let go of packages stored before ``before``: the store purges them too."""
        with self._lock:
            while self._log and self._log[0][1] < before:
                self._let_go()
            self._cut()

    def read(self, recipient, after, limit):
        """``(horizon, rows)`` like ``Store.read``, or None when the window cannot
        answer for sure: ``after`` outside it, or a delivery past a gap."""
        with self._lock:
            if (self.horizon is None or not self.base <= after <= self.horizon
                    or recipient in self._ahead_to):
                return None
            inbox = self._inbox.get(recipient, [])
            start = bisect.bisect_right(inbox, (after, math.inf))    # past every row at after
            return self.horizon, inbox[start:start + limit]


class _Then:
    """A response of one body that calls ``then()`` once the server is done with it:
    when it closes it, as every server and middleware must, or else drops it.  A
    push answers its publisher this way before it wakes its recipients' polls,
    which would otherwise take the interpreter from the thread still writing that
    answer."""

    __slots__ = ("_body", "_then")

    def __init__(self, body, then):
        self._body = body
        self._then = then

    def __iter__(self):
        return iter((self._body,))

    def __len__(self):
        return 1

    def close(self):
        then, self._then = self._then, None
        if then is not None:
            then()

    __del__ = close


class _RateLimit:
    """A token bucket per key (a client, an address): ``rate`` requests a second,
    bursts of ``burst``."""

    def __init__(self, rate, burst):
        self.rate = rate
        self.burst = burst
        self._buckets = {}                  # key -> (tokens, when)
        self._lock = _section_lock()

    def wait(self, key):
        """0 if a request may go now, else the seconds until it may."""
        now = time.monotonic()
        with self._lock:
            tokens, when = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - when) * self.rate)
            if tokens < 1:
                self._buckets[key] = (tokens, now)
                return (1 - tokens) / self.rate
            self._buckets[key] = (tokens - 1, now)
            return 0

    def forget_idle(self):
        now = time.monotonic()
        with self._lock:
            full = self.burst / self.rate
            self._buckets = {c: b for c, b in self._buckets.items() if now - b[1] < full}


# --------------------------------------------------------------------------
# Actions and channels
# --------------------------------------------------------------------------

class Action:
    """The hooks of one package type: ``on_submit`` first, ``on_emit`` per recipient."""

    def __init__(self, type):
        self.type = type
        self.submit = None
        self.emit = None

    def on_submit(self, fn):
        """Decorate ``fn(package, private, db, environ)``; it may change package
        and private in place, or raise ``Reject``."""
        self.submit = fn
        return fn

    def on_emit(self, fn):
        """Decorate ``fn(package, recipient, private, db) -> package or None``;
        it gets its own copy and returns what that recipient receives."""
        self.emit = fn
        return fn


class Channel:
    """A listener whose recipients are its members, kept in the store.

    ``may_join(environ, db, channel) -> bool`` decides whether a client may
    join (a false answer is 403 ``rejected``, and so is a ``Reject`` it raises,
    with its message); ``presence`` says whether a member that stops polling is
    dropped with a timeout ``leave``.
    """

    def __init__(self, comet, name, may_join=None, presence=True):
        self._comet = comet
        self.name = name
        self.may_join = may_join
        self.presence = presence

    def members(self):
        """``{client_id: sender}``, the presence list."""
        return self._comet.store.members(self.name)

    def __repr__(self):
        return f"<Channel {self.name!r}>"


class Namespace:
    """Every name that starts with ``prefix`` (and is longer, up to 256
    characters) is a channel with these rules, in every process that registers
    the namespace; nothing is stored per channel beyond its members.
    ``namespace[name]`` is the ``Channel`` of that name."""

    def __init__(self, comet, prefix, may_join=None, presence=True):
        self._comet = comet
        self.prefix = prefix
        self.may_join = may_join
        self.presence = presence

    def __contains__(self, name):
        return (isinstance(name, str) and name.startswith(self.prefix)
                and len(self.prefix) < len(name) <= _MAX_ID and _unicode(name))

    def __getitem__(self, name):
        if name not in self:
            raise KeyError(name)
        return Channel(self._comet, name, self.may_join, self.presence)

    def __repr__(self):
        return f"<Namespace {self.prefix!r}>"


def _same_rules(registered, may_join, presence):
    """``registered`` (a channel or namespace), unless asked for with other rules:
    a second registration must not quietly drop the first one's ``may_join``."""
    if (registered.may_join, registered.presence) != (may_join, presence):
        raise ValueError(f"{registered!r} is registered with other rules")
    return registered


# --------------------------------------------------------------------------
# The HTTP layer
# --------------------------------------------------------------------------

_JSON = ("Content-Type", "application/json; charset=utf-8")
_NO_STORE = ("Cache-Control", "no-store")


_STATUS_LINES = {status.value: f"{status.value} {status.phrase}" for status in http.HTTPStatus}


def _read_body(environ, limit):
    """The request body.  It needs a ``Content-Length`` of ASCII digits no larger
    than ``limit``, checked before a byte is read (missing: 411, not digits:
    400, too large: 413); a chunked body the server ends for us
    (``wsgi.input_terminated``) is read up to ``limit``."""
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH", "")
    if not length:
        if not environ.get("wsgi.input_terminated"):
            raise CometError(411, "length_required", "a push needs a Content-Length")
        body = stream.read(limit + 1)               # one byte past the limit tells
        if len(body) > limit:
            raise _too_large(limit)
        return body
    if not _LENGTH.fullmatch(length):
        raise CometError(400, "bad_json", "Content-Length is not a number of bytes")
    if len(length.lstrip("0")) > len(str(limit)) or int(length) > limit:
        raise _too_large(limit)                     # (int() refuses past 4,300 digits)
    return stream.read(int(length))


def _cursor_of(environ):
    """The ``cursor`` of a poll's query string: None when it has none, "" when it
    has several (none is one we issued)."""
    query = environ.get("QUERY_STRING", "")
    if query.startswith("cursor=") and "&" not in query and "%" not in query and "+" not in query:
        return query[7:]                    # what the client sends: nothing to decode
    cursors = urllib.parse.parse_qs(query, keep_blank_values=True).get("cursor", [None])
    return cursors[0] if len(cursors) == 1 else ""


def _too_large(limit):
    return CometError(413, "too_large", f"the body is over {limit} bytes")


def _cursor_text(store_id, position):
    return f"{store_id}.{position}"


def _same_origin(origin, environ):
    host = environ.get("HTTP_HOST") or "{}:{}".format(environ.get("SERVER_NAME", ""),
                                                     environ.get("SERVER_PORT", ""))
    try:
        return urllib.parse.urlsplit(origin).netloc.lower() == host.lower()
    except ValueError:                              # "http://[::1", say: no origin at all
        return False


# --------------------------------------------------------------------------
# Comet
# --------------------------------------------------------------------------

_HOOK = object()                            # sender: ask the sender hook
_GATHER = 0.005                             # seconds between tails woken by notifications
_GATHER_POLLS = 16                          # recipients of a wake-up that gathers, at least
_GATHER_SPAN = 0.1                          # seconds from the last such: it gathers


def _for_many(appended):
    """Whether a wake-up of ``appended`` is for at least ``_GATHER_POLLS`` recipients:
    one that gathers under gevent, or makes a threaded server busy (``Comet._busy``)."""
    return sum(len(delivered) for _, _, delivered in appended) >= _GATHER_POLLS


class Comet:
    """WSGI middleware that adds long-polling real-time messaging to ``app``.

    Flask: ``app.wsgi_app = Comet(app.wsgi_app, store="sqlite:///chat.db")``;
    Django: ``application = Comet(get_wsgi_application(), ...)``; anything
    else WSGI: ``app = Comet(app, ...)``.

    - ``app``: the WSGI application for every other path (None: 404).
    - ``store``: ``"memory:"``, ``"sqlite:///PATH"``, ``"mysql://USER:PASS@HOST:PORT/DB"``,
      ``"postgresql://USER:PASS@HOST:PORT/DB"`` or a ``Store``.
    - ``id``: ``fn(environ) -> str or None``, the client id; None answers 403.
      By default a hash of an HttpOnly cookie ``comet_sid`` of 144 random bits.
    - ``sender``: ``fn(environ, db) -> JSON value`` for ``package["sender"]``;
      by default the client id.
    - ``emit_filter``: ``fn(package, recipient, db) -> bool``, the last word on
      each delivery.
    - ``prefix``: where the endpoints live (``/poll``, ``/push``, ``/comet.js``).
    - ``script_path``: another path serving the client script, or None.
    - ``poll_timeout``: seconds a poll is held before answering empty.
    - ``retention``: seconds a package stays retrievable.
    - ``tail_interval``: seconds between reads of other processes' pushes (on
      PostgreSQL they are read at once when notified; this is the safety net).
    - ``presence_timeout``: seconds without a poll before a member is dropped.
    - ``allowed_origins``: origins allowed to push besides the request's Host.
    - limits: ``max_body`` bytes, ``max_batch`` packages a request,
      ``max_listeners`` a package, ``max_polls_per_client`` and ``max_polls``
      parked at once, ``rate=(steady, burst)`` push requests a second a client.
      A push body needs a ``Content-Length`` (411 without, 400 when it is not
      digits, 413 over ``max_body``, all before reading); its JSON is 400
      ``bad_json`` when a package nests more than 100 arrays and objects or
      holds a lone UTF-16 surrogate.
    - limits a client cannot shed with its cookie, per remote address:
      ``max_polls_per_address`` parked at once and ``address_rate=(steady,
      burst)`` push requests a second (429).  The defaults leave a busy office
      behind one address alone and stop a script that drops its cookie.
    - ``client_address``: ``fn(environ) -> str or None``, the address those
      limits are kept by (None: no address limit for the request).  By default
      ``REMOTE_ADDR``, an IPv6 one by its /64.  Behind a proxy, read the
      header it sets, e.g. the last ``X-Forwarded-For`` entry.

    ``comet.linger`` (seconds, 0.01; an attribute, not an argument): on a threaded
    server, how long at most a poll that has packages to answer waits for a push
    being accepted in this process, so that one answer carries both; 0: never.
    ``comet.linger_busy`` (seconds, 0.02; an attribute too): on a threaded server
    that woke many polls at once lately, how long at most such a poll, with no
    push in flight, waits for the next wake-up of it; 0: never.
    ``comet.gather`` (seconds, 0.002; an attribute too): under gevent, how long a
    wake-up of many polls that comes soon after another waits for more pushes to
    join it; 0: never.
    """

    # Seconds at most a poll with packages to answer waits, while a push is being
    # accepted in this process, for that push (``_linger``); 0: it never waits.
    linger = 0.01
    # Seconds at most a poll with packages to answer waits on a threaded server,
    # with no push being accepted, for its next wake-up while the server is busy
    # (``_busy``); 0: it never waits.
    linger_busy = 0.02
    # Seconds a wake-up under gevent waits for more pushes when it is for many polls
    # and comes soon after another such (``_wake_soon``); 0: it never waits.
    gather = 0.002

    def __init__(self, app=None, store="memory:", id=None, sender=None, emit_filter=None,
                 prefix="/comet", script_path="/scripts/comet.js", poll_timeout=25.0,
                 retention=3600.0, tail_interval=0.1, presence_timeout=60.0,
                 allowed_origins=(), max_body=65536, max_batch=100, max_listeners=100,
                 max_polls_per_client=8, max_polls=10000, rate=(20, 40),
                 max_polls_per_address=1000, address_rate=(100, 200), client_address=None):
        self.app = app
        self.store = store if isinstance(store, Store) else open_store(store)
        self.store.on_commit = self._delivered
        self.id = id
        self.sender = sender
        self.emit_filter = emit_filter
        self.prefix = prefix.rstrip("/")
        self.poll_timeout = poll_timeout
        self.retention = retention
        self.tail_interval = tail_interval
        self.presence_timeout = presence_timeout
        self.allowed_origins = frozenset(allowed_origins)
        self.max_body = max_body
        self.max_batch = max_batch
        self.max_listeners = max_listeners
        self.client_address = client_address
        self._routes = {
            self.prefix + "/poll": (("GET",), self._serve_poll),
            self.prefix + "/push": (("POST",), self._serve_push),
            self.prefix + "/comet.js": (("GET", "HEAD"), self._serve_script),
        }
        if script_path:
            self._routes[script_path] = (("GET", "HEAD"), self._serve_script)
        self._listeners = {}
        self._channels = {}
        self._namespaces = []               # longest prefix first
        self._actions = {}
        self._parking = _Parking(max_polls_per_client, max_polls_per_address, max_polls)
        self._window = _Window(_WINDOW_BYTES) if self.store.shared else None
        self._rate = _RateLimit(*rate)
        self._address_rate = _RateLimit(*address_rate)
        self._script = None
        self._seen = set()                  # clients that polled since the last presence touch
        self._counts = {"accepted": 0, "delivered": 0}
        self._errors = {}
        self._counting = _section_lock()    # the two above, and the two below
        self._pushing = 0                   # pushes being accepted, their polls not woken yet
        self._lingering = set()             # polls waiting for one of them (_linger)
        self._gathering = None              # under gevent: (appended, polls) of a wake-up
        self._gathered_at = -math.inf       # waiting for more pushes, and when the last
                                            # wake-up of many polls came (_wake_soon)
        self._lock = threading.Lock()
        self._local = threading.local()     # .tx: the transaction this thread's hooks run in
        self._pid = None                    # the process whose housekeeping thread runs
        self._stop = threading.Event()
        self._notified = threading.Event()  # another process committed: tail now

    # -- registration: listeners, actions, channels

    def listener(self, name):
        """Decorate ``fn(environ, package, db) -> iterable of client ids``,
        the recipients of packages addressed to ``name``."""
        def register(fn):
            if name in self._channels:
                raise ValueError(f"{name!r} is a channel")
            self._listeners[name] = fn
            return fn
        return register

    def action(self, type):
        """The ``Action`` of a package type, to hang ``on_submit`` and ``on_emit`` on."""
        return self._actions.setdefault(type, Action(type))

    def channel(self, name, may_join=None, presence=True):
        """Register ``name`` as a channel: a listener whose recipients are its members.

        ``may_join(environ, db, channel) -> bool`` decides who may join (false,
        or a ``Reject`` raised, answers 403 ``rejected``); ``presence=False``
        keeps members until they leave, with no timeout ``leave``.  Called
        again, it returns the channel registered first, whose rules stay.
        """
        if name in self._listeners:
            raise ValueError(f"{name!r} is a listener")
        if not (isinstance(name, str) and 0 < len(name) <= _MAX_ID and _unicode(name)):
            raise ValueError(f"a channel name is 1 to {_MAX_ID} characters of Unicode text")
        return _same_rules(self._channels.setdefault(name, Channel(self, name, may_join, presence)),
                           may_join, presence)

    def channels(self, prefix, may_join=None, presence=True):
        """Register a namespace: every name starting with ``prefix`` is a channel,
        with the rules of ``channel()``, in every process that registers it.

        ``comet.channels("room:")["room:42"]`` is a ``Channel``.  A name that is
        a listener or a channel of its own follows its own registration; in
        overlapping namespaces the longest prefix wins.  Called again, it returns
        the namespace registered first, whose rules stay.
        """
        if not isinstance(prefix, str) or not 0 < len(prefix) < _MAX_ID:
            raise ValueError(f"a namespace prefix is 1 to {_MAX_ID - 1} characters")
        namespace = next((ns for ns in self._namespaces if ns.prefix == prefix), None)
        if namespace is None:
            namespace = Namespace(self, prefix, may_join, presence)
            self._namespaces = sorted(self._namespaces + [namespace],
                                      key=lambda ns: -len(ns.prefix))
        return _same_rules(namespace, may_join, presence)

    # -- the server side

    def push(self, package, sender=None, private=None):
        """Push ``package`` from the server through the same path as a client's
        (hooks included, ``environ=None``); returns its stamp or raises ``CometError``.

        Called from a hook, the package joins the hook's transaction: it is
        stored with the package being accepted, or not at all.  A package that
        is not JSON, nests more than 100 levels or holds a lone surrogate is
        400 ``bad_package``."""
        if _nested_over(package, _MAX_DEPTH) or not _encodable(package):
            raise _bad_package(f"a package must be JSON nested at most {_MAX_DEPTH} levels,"
                               " its text Unicode (no lone surrogate)")
        self._start()
        return self._accept([package], None, None, sender, private)[0]

    def client_id(self, environ):
        """The client id of any request (your own views' too): what the ``id`` hook
        says, or the one of the ``comet_sid`` cookie; None when it has none yet."""
        if self.id is not None:
            client = self._call(self.id, environ)
            return client if client is None or type(client) is str else self._call(str, client)
        match = _SID.search(environ.get("HTTP_COOKIE", ""))
        return _public_id(match.group(1)) if match else None

    def stats(self):
        """Counters and gauges: parked, clients, accepted, delivered, errors, store, head."""
        try:
            head = self.store.head()
        except CometError:
            head = None
        with self._counting:
            return dict(parked=self._parking.count, clients=len(self._parking.clients()),
                        errors=dict(self._errors), store=self.store.url, head=head,
                        **self._counts)

    def close(self):
        """Stop the housekeeping thread and close the store."""
        self._stop.set()
        self._notified.set()
        self.store.close()

    # -- accepting packages: validate, hooks, recipients, one transaction

    def _accept(self, packages, client, environ, sender=_HOOK, private=None):
        """Store ``packages`` in order and wake their recipients; returns the stamps.

        On the first failure the packages before it stay accepted and the
        ``CometError`` raised carries ``index`` and ``accepted``.
        """
        outer = getattr(self._local, "tx", None)
        if outer is not None:               # a hook pushing: into its transaction
            return self._accept_nested(outer, packages, sender, private)
        accepted, failure = [], None
        single = len(packages) == 1         # its transaction is its savepoint
        try:
            with self._transaction() as tx:
                for index, package in enumerate(packages):
                    try:
                        with contextlib.nullcontext() if single else tx.savepoint():
                            accepted.append(self._accept_one(tx, package, client, environ,
                                                             sender, private, alone=single))
                    except CometError as error:
                        if single:
                            raise
                        failure = error, index
                        break
        except CometError as error:                 # the store failed, or a batch of one did
            failure, accepted = (error, 0), []
        except BaseException as error:
            if not isinstance(error, Exception):    # gevent.Timeout, GreenletExit: the store
                log.error("comet: a push was interrupted by %r", error, exc_info=True)
                self._count_error("internal")       # failed the batch; it goes on up
            raise
        self._count("accepted", len(accepted))
        if failure:
            error, index = failure
            error.fields = {"index": index, "accepted": accepted}
            raise error
        return accepted

    def _accept_nested(self, tx, packages, sender, private):
        accepted = []
        for package in packages:
            with tx.savepoint():
                accepted.append(self._accept_one(tx, package, None, None, sender, private))
        self._count("accepted", len(accepted))
        return accepted

    @contextlib.contextmanager
    def _transaction(self):
        """A store transaction whose hooks can push into it (``Comet.push``)."""
        with self.store.transaction() as tx:
            self._local.tx = tx
            try:
                yield tx
            finally:
                self._local.tx = None

    def _accept_one(self, tx, package, client, environ, sender, private, alone=False):
        """Validate, stamp, run the hooks and store one package, in the order docs/api.md
        gives; ``alone``: the only package of its transaction's part."""
        package, channels = self._validate(package)
        stamp = package.get("_stamp")
        if not (isinstance(stamp, str) and _STAMP.match(stamp)):
            stamp = _new_stamp()            # fresh: nothing to look up
        elif tx.claim_stamp(stamp):
            return stamp                    # accepted before: once is enough
        if sender is _HOOK:
            sender = self._call(self.sender, environ, tx.db) if self.sender else client
        package.update(sender=sender, _stamp=stamp, _ts=_now_ms())
        stored = self.store.now()           # what retention and presence compare: the store's clock
        kind = package["type"]
        private = dict(private or {})
        action = self._actions.get(kind)
        known = {}                          # channel -> its members, read once
        # A broadcast to one channel, its members the recipients with no hook per
        # recipient: the store may take them as it last read them, and checks at
        # the commit that they are still so (refusing the push there if not).
        broadcast = (self.store.assumes_members and alone and package["listeners"] == channels
                     and kind != "leave" and not (action and action.emit)
                     and not self.emit_filter)
        if client is not None and kind != "join":
            for channel in channels:
                if len(channels) == 1 and not (action and action.submit):
                    # Nothing changes the members before they are the recipients: one read.
                    known[channel] = (tx.member_ids(channel, sender=client) if broadcast
                                      else tx.member_ids(channel))
                    member = client in known[channel]
                else:
                    member = tx.is_member(channel, client)
                if not member:
                    raise CometError(403, "not_member", f"not a member of channel {channel!r}")
        if action and action.submit:
            self._call(action.submit, package, private, tx.db, environ)
            package, channels = self._validate(package)
        if client is not None and kind == "join":
            for channel in channels:
                may_join = self._channel(channel).may_join
                if may_join is not None and not self._call(may_join, environ, tx.db, channel):
                    raise Reject(f"you may not join {channel}")
                tx.add_member(channel, client, self._json(package["sender"]), stored)
        recipients = self._recipients(tx, package, environ, known)
        # Encoded here, in this package's own part of the transaction: what cannot
        # be stored fails this package, never the commit it shares with others.
        body = self._json(package)
        deliveries = self._tailor(tx, package, body, recipients, action, private)
        # Refused in this package's own part: at the commit it would fail the batch.
        if not self.store.holds_nul and "\x00" in "".join(map(_FIRST, deliveries)):
            raise _bad_package("this server's store cannot hold a client id holding U+0000")
        # Broadcast to one channel as it is, to every member: the store may keep it as one row.
        if (self.store.channel_rows and len(channels) == 1 and package["listeners"] == channels
                and len(deliveries) == len(recipients) and not any(map(_SECOND, deliveries))):
            tx.append(stamp, stored, body, deliveries, channel=channels[0])
        else:
            tx.append(stamp, stored, body, deliveries)
        if client is not None and kind == "leave":
            for channel in channels:
                tx.remove_member(channel, client)
        return stamp

    def _tailor(self, tx, package, body, recipients, action, private):
        """``[(recipient, body or None)]``: what ``on_emit`` and ``emit_filter`` make of
        ``package`` for each recipient (None: the package as stored)."""
        if not (action and action.emit or self.emit_filter):
            return [(recipient, None) for recipient in recipients]     # each as stored
        deliveries = []
        for recipient in recipients:
            delivered = package
            if action and action.emit:
                copied = self._call(copy.deepcopy, package)     # may run out of stack
                delivered = self._call(action.emit, copied, recipient, private, tx.db)
                if delivered is None:
                    continue
            if self.emit_filter and not self._call(self.emit_filter, delivered, recipient, tx.db):
                continue
            tailored = None if delivered is package else self._json(delivered)
            deliveries.append((recipient, None if tailored == body else tailored))
        return deliveries

    def _validate(self, package):
        """A copy of ``package`` without ``private``, and its channel listeners."""
        if not isinstance(package, dict):
            raise _bad_package("a package must be a JSON object")
        kind = package.get("type")
        if not isinstance(kind, str) or not 0 < len(kind) <= 64:
            raise _bad_package("type must be a non-empty string of at most 64 characters")
        listeners = package.get("listeners")
        channels = []
        if isinstance(listeners, list):
            if not listeners or len(listeners) > self.max_listeners:
                raise _bad_package(f"listeners must name 1 to {self.max_listeners} listeners")
            if not all(isinstance(name, str) for name in listeners):
                raise _bad_package("listener names must be strings")
            for name in listeners:
                if self._channel(name) is not None:
                    channels.append(name)
                elif name not in self._listeners:
                    raise CometError(400, "unknown_listener", f"no listener named {name!r}")
        elif _single_recipient(listeners) is None:
            raise _bad_package(f"listeners must be a list of names, a client id or an integer"
                               f" of 1 to {_MAX_ID} characters")
        if not self.store.holds_nul and any("\x00" in name for name in channels):
            raise _bad_package("this server's store cannot hold a channel name holding U+0000")
        package = dict(package)
        package.pop("private", None)
        return package, list(dict.fromkeys(channels))

    def _channel(self, name):
        """The ``Channel`` a listener name addresses: registered by that name, or
        in the namespace of the longest prefix; None for a listener or no channel."""
        channel = self._channels.get(name)
        if channel is None and self._namespaces and name not in self._listeners:
            namespace = next((ns for ns in self._namespaces if name in ns), None)
            channel = namespace and namespace[name]
        return channel

    def _recipients(self, tx, package, environ, known=None):
        """The package's recipients; ``known``: members of channels read already."""
        known = known or {}
        listeners = package["listeners"]
        if not isinstance(listeners, list):
            return [_single_recipient(listeners)]
        recipients = {}                     # a dict keeps the order and each recipient once
        for name in listeners:
            if self._channel(name) is not None:
                members = known.get(name)
                recipients.update(dict.fromkeys(tx.member_ids(name) if members is None
                                                else members))
                continue
            found = self._call(lambda: list(self._listeners[name](environ, package, tx.db) or ()))
            ids = _client_ids(found)
            if ids is None:
                ids = self._call(lambda: [_single_recipient(r if isinstance(r, int) else str(r))
                                          for r in found])
            if None in ids:                 # often the package's own data, passed on: its 400
                log.warning("comet: listener %r named a recipient that is no client id", name)
                raise _bad_package(f"listener {name!r} named a recipient that is no client id"
                                   f" (1 to {_MAX_ID} characters of Unicode text)")
            recipients.update(dict.fromkeys(ids))
        return recipients

    def _call(self, hook, *args):
        """Run a hook: a ``CometError`` passes, anything else is logged and becomes 500."""
        try:
            return hook(*args)
        except CometError:
            raise
        except Exception:
            log.exception("comet: hook %r raised", getattr(hook, "__qualname__", hook))
            raise CometError(500, "internal", "a server hook failed") from None

    def _json(self, value):
        """The JSON text of a package (or a sender) as the store will write it.
        Client input was checked when it was parsed, so what fails here is a
        hook's making: not JSON, nested too deep, or text with a lone surrogate."""
        try:
            text = _dumps(value)
            if not text.isascii():
                text.encode("utf-8")
            return text
        except (TypeError, ValueError, RecursionError):
            log.exception("comet: a hook made a package that cannot be stored as JSON")
            raise CometError(500, "internal",
                             "a server hook made a package that cannot be stored as JSON") from None

    # -- polling: read after the cursor, else park until woken

    def _poll(self, client, cursor, address=None):
        """The poll answer (JSON bytes) for ``client`` after ``cursor``."""
        self._seen.add(client)
        if cursor is None:
            return self._answer(self.store.head())
        match = _CURSOR.fullmatch(cursor)
        if not match or match[1] != self.store.id or int(match[2]) > _MAX_POSITION:
            return self._answer(self.store.head(), reset=True)     # not one we issued
        after = int(match[2])
        deadline = time.monotonic() + self.poll_timeout
        waiter = None                       # parked with nothing to answer yet, or to linger
        lingered = False
        try:
            while True:
                wakes = self._parking.wakes
                head, rows, lost = self._read(client, after, waiter)
                if after > head or lost or (
                        rows and rows[0][1] < self.store.now() - self.retention * 1000):
                    return self._answer(head, reset=True)
                if rows and waiter is None and not lingered and self._lingers():
                    lingered = True
                    waiter = self._linger(client, address, after, deadline, wakes)
                    continue
                if rows:
                    self._count("delivered", len(rows))
                    return self._answer(head if len(rows) < _PAGE else rows[-1][0],
                                        [row[2] for row in rows])
                if waiter is None:
                    waiter = self._parking.park(client, address, after)
                    if self._parking.wakes != wakes:
                        continue            # a wake-up began since the read, maybe before parking
                else:
                    self._parking.hand_on(waiter)   # woken for nothing of ours: the others go on
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not waiter.wait(remaining):
                    return self._answer(head)
        finally:
            if waiter is not None:          # woken in a relay: the next poll goes now
                self._parking.unpark(waiter)

    def _lingers(self):
        """Whether a poll that has packages to answer waits to answer more with them:
        on threads while a push is being accepted in this process (under gevent
        polls lingering for those measured no more deliveries a second on memory,
        and fewer on PostgreSQL) or while it is busy, under gevent while a wake-up
        gathers pushes."""
        if self._parking.threads:
            return bool(self._pushing) and self.linger > 0 or self._busy()
        return self._gathering is not None

    def _busy(self):
        """On threads: whether a wake-up of at least ``_GATHER_POLLS`` polls came in
        the last ``_GATHER_SPAN`` seconds (and polls may linger for the next).  Under
        load many polls come back only once the publishers' next pushes are all
        committed, one package a publisher, and find no push in flight to wait for
        (gunicorn's gthread workers: 4.0 packages an answer with 4 publishers);
        waiting for its next wake-up, an answer carries more, and the server
        answers fewer requests for the same packages."""
        return self.linger_busy > 0 and time.monotonic() - self._gathered_at < _GATHER_SPAN

    def _linger(self, client, address, after, deadline, wakes):
        """Park a poll that has packages to answer while pushes are being accepted in
        this process, until the first of them has woken its polls or ``linger``
        seconds have passed; with none in flight while the process is busy, until
        its next wake-up or ``linger_busy`` seconds; under gevent, while a wake-up
        gathers pushes, until it fires (``_wake_soon``).  What comes then is often
        for this client too, and one answer carrying both costs the server one
        request instead of two, which under load is most of what a delivery costs.
        Returns the poll's waiter (None: at a limit, it answers now)."""
        try:
            waiter = self._parking.park(client, address, after)
        except CometError:
            return None
        if not self._parking.threads:       # gathering still: nothing waited since
            self._gathering[1].append(waiter)
            if self._parking.wakes == wakes:
                waiter.wait(min(_GATHER_SPAN, deadline - time.monotonic()))
            return waiter
        with self._counting:
            lingering = self._pushing > 0 and self.linger > 0
            if lingering:
                self._lingering.add(waiter)
        wait = self.linger if lingering else self.linger_busy if self._busy() else 0
        if wait and self._parking.wakes == wakes and \
                not waiter.wait(min(wait, deadline - time.monotonic())) and lingering:
            with self._counting:
                self._lingering.discard(waiter)
        return waiter

    def _pushed(self):
        """A push's accepting is over (its polls woken, or it failed): the polls
        lingering for it answer now."""
        with self._counting:
            self._pushing -= 1
            lingering, self._lingering = self._lingering, set()
        for waiter in lingering:
            waiter.wake()

    def _read(self, client, after, waiter=None):
        """``Store.read``, from the window when it can answer (no query).  A poll
        ``waiter`` woken in a relay hands it on before a query: the others wait on
        memory, never on I/O."""
        window = self._window and self._window.read(client, after, _PAGE)
        if window:
            return window[0], window[1], False
        if waiter is not None and not isinstance(self.store, MemoryStore):
            self._parking.hand_on(waiter)
        return self.store.read(client, after, _PAGE)

    def _answer(self, position, bodies=(), reset=False):
        return '{"cursor":"%s","packages":[%s],"reset":%s}' % (
            _cursor_text(self.store.id, position), ",".join(bodies),
            "true" if reset else "false")

    # -- housekeeping: tailing other processes, presence, retention

    def _start(self):
        """Run the housekeeping threads in this process (again after a fork)."""
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            if self.store.shared:           # the first requests wait here until it has
                self._start_window()
            self._pid = os.getpid()
            self._stop = threading.Event()
            self._notified = threading.Event()
            # The tail has a thread of its own: a purge or a sweep never delays it.
            if self.store.shared:
                threading.Thread(target=self._tailing, args=(self._stop, self._notified),
                                 name="comet-tail", daemon=True).start()
                self.store.listen(self._committed_elsewhere)
            threading.Thread(target=self._housekeeping, args=(self._stop,),
                             name="comet-housekeeping", daemon=True).start()

    def _start_window(self):
        """The window starts before the process serves its first request (the other
        first requests wait for it on ``_start``'s lock): until it has, every poll is a
        query, and a burst of them at start-up (2,000 polls under one gevent worker)
        kept the first tail waiting for a connection behind them while some polls
        waited past the pool's 5 s.  A store that does not answer leaves it to the
        tail."""
        if self._window.horizon is None:    # (a process forked from one serving has it)
            try:
                self._window.start(self.store.head())
            except CometError:
                pass

    def _tailing(self, stop, notified):
        tailed = time.monotonic()
        while True:
            notified.wait(self.tail_interval)   # or less: another process's commit was notified
            # Commits notified right after a tail gather for the rest of _GATHER: under a
            # stream of commits a process tails a few hundred times a second, not once a commit.
            stop.wait(max(0.0, tailed + _GATHER - time.monotonic()))
            notified.clear()                # before the tail: a later commit sets it again
            if stop.is_set():
                return
            try:
                self._tail()
                tailed = time.monotonic()
            except CometError:
                self._window.stop()         # trusted only while the tail reaches the store
            except Exception:
                log.exception("comet: tailing failed; it goes on")

    def _housekeeping(self, stop):
        """Presence sweeps and purges, one short step at a time.  Between two purge
        steps it waits as long as the step took, so the store's writer stays free
        for pushes at least half the time."""
        presence_every = max(self.presence_timeout / 4, 0.05)
        purge_every = min(max(self.retention / 10, 0.05), 60.0)
        started = time.monotonic()
        next_presence = next_purge = started
        purging = None                      # the cutoff of the purge under way
        wait = 0
        while not stop.wait(wait):
            now = time.monotonic()
            try:
                if now >= next_presence:
                    next_presence = now + presence_every
                    # Sweep only once clients had presence_timeout to poll this process:
                    # a restart after an outage must not drop everyone at once.
                    self._sweep_presence(sweep=now - started >= self.presence_timeout)
                if purging is None and now >= next_purge:
                    next_purge = now + purge_every
                    purging = self.store.now() - int(self.retention * 1000)
                    if self._window is not None:
                        self._window.forget(purging)
                    self._rate.forget_idle()
                    self._address_rate.forget_idle()
                if purging is not None and not self.store.purge(purging):
                    purging = None
            except CometError:
                purging = None              # the store said why; the next turn tries again
            except Exception:
                purging = None
                log.exception("comet: housekeeping failed; it goes on")
            if purging is not None:
                wait = time.monotonic() - now
            else:
                wait = max(0, min(next_presence, next_purge) - time.monotonic())

    def _tail(self):
        """Read what other processes stored into the window; wake their recipients.
        (Everything up to the horizon is in the window already, this process's own
        commits included.)"""
        if self._window.horizon is None:    # the first turn: whatever came before, wake all
            self._window.start(self.store.head())
            self._parking.wake(dict.fromkeys(self._parking.clients(), math.inf))
            return
        head, appended = self.store.tail(self._window.horizon)
        self._window.fill(head, appended)
        self._wake(appended)

    def _committed_elsewhere(self, head):
        """The store's word that another process committed through ``head`` (None:
        unknown): tail now, unless no poll is parked here to wake (the next tail
        will do) or this process's window holds it already."""
        horizon = self._window.horizon
        if self._parking.count and (head is None or horizon is None or head > horizon):
            self._notified.set()

    def _sweep_presence(self, sweep=True):
        now = self.store.now()
        seen, self._seen = self._seen, set()
        self.store.touch(seen.union(self._parking.clients()), now)
        if not sweep:
            return
        stale = self.store.stale_members(now - int(self.presence_timeout * 1000))
        for channel, client, sender in stale:
            found = self._channel(channel)
            if found is not None and found.presence:
                self._leave_on_timeout(channel, client, sender)

    def _leave_on_timeout(self, channel, client, sender):
        """Remove a silent member and tell the others, once across all processes."""
        package = {"type": "leave", "listeners": [channel], "reason": "timeout"}
        try:
            with self._transaction() as tx:
                if tx.remove_member(channel, client):
                    self._accept_one(tx, package, None, None, sender, None)
        except CometError as error:
            if error.status == 503:
                raise
            log.warning("comet: the timeout leave of %s from %r failed (%s); removed quietly",
                        client, channel, error.message)
            with self.store.transaction() as tx:
                tx.remove_member(channel, client)

    def _delivered(self, appended):
        """Committed here: into the window at once, and the recipients' polls woken
        once the answer of the push this thread serves is written (``_Then``), or
        else now (``_Parking.soon``).  A package the window keeps apart, past another
        process's commit not tailed yet, makes the tail run now, which wakes its
        recipients once it has read that commit: woken before, each would read the
        store, a query each (10,000 for a push to a channel of 10,000) where the
        tail makes one."""
        if self._window is not None:
            kept = self._window.add(appended)
            if kept is not None:
                appended = kept
                if self._window.waiting:
                    self._notified.set()
        later = getattr(self._local, "later", None)
        if later is not None:               # a push is being answered in this thread
            later.append(appended)
        else:
            self._wake_soon(appended)

    def _wake_pushed(self, commits):
        """Wake the polls of what a push committed (``commits``: each commit's
        packages), once its answer is written, and end the push."""
        try:
            self._wake_soon([package for commit in commits for package in commit])
        finally:
            self._pushed()

    def _wake_soon(self, appended):
        """Wake ``appended``'s polls soon (``_Parking.soon``).  Under gevent a wake-up
        for at least ``_GATHER_POLLS`` recipients that comes within ``_GATHER_SPAN``
        seconds of the last such waits ``gather`` seconds, and what is committed
        meanwhile joins it, while the polls that find packages wait for it too
        (``_linger``).  Under load one wake-up then follows another as soon as the
        polls it woke have been answered and have polled again, with one package
        from each publisher: waiting, each answer carries more, and fewer requests
        carry them all, which is most of what a delivery costs the server.  On threads
        such a wake-up makes the server busy (``_busy``)."""
        parking = self._parking
        if parking.in_hub():
            if self._gathering is not None:
                self._gathering[0].extend(appended)
                return
            if self.gather > 0 and _for_many(appended):
                now = time.monotonic()
                recent, self._gathered_at = now - self._gathered_at < _GATHER_SPAN, now
                if recent:
                    self._gathering = list(appended), []
                    parking.later(self.gather, functools.partial(self._gathered, now))
                    return
        elif parking.threads and self.linger_busy > 0 and _for_many(appended):
            self._gathered_at = time.monotonic()    # busy (_busy)
        parking.soon(self._wake, appended)

    def _gathered(self, began):
        """The gathered wake-up: its polls, and those that waited for it, now; or,
        while pushes are being accepted (waiting for their database) and ``linger``
        seconds have not passed since it began, ``gather`` seconds later."""
        if self._pushing and time.monotonic() - began < self.linger:
            self._parking.later(self.gather, functools.partial(self._gathered, began))
            return
        (appended, polls), self._gathering = self._gathering, None
        try:
            self._wake(appended)
        except Exception:                   # the polls find their packages as they time out
            log.exception("comet: waking polls failed")
        for waiter in polls:
            waiter.wake()

    def _wake(self, appended):
        """Wake the polls of ``appended``'s recipients."""
        positions = {}
        for position, _, delivered in appended:
            positions.update(dict.fromkeys(map(_FIRST, delivered), position))
        self._parking.wake(positions)

    def _count(self, name, n=1):
        with self._counting:
            self._counts[name] += n

    def _count_error(self, code):
        with self._counting:
            self._errors[code] = self._errors.get(code, 0) + 1

    # -- WSGI

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        route = self._routes.get(path)
        if route is None and self.app is not None and not (
                path == self.prefix or path.startswith(self.prefix + "/")):
            return self.app(environ, start_response)
        headers = [_JSON, _NO_STORE]
        try:
            if route is None:
                raise CometError(404, "not_found", f"no comet endpoint at {path}")
            methods, serve = route
            if environ.get("REQUEST_METHOD", "GET") not in methods:
                headers.append(("Allow", ", ".join(methods)))
                raise CometError(405, "method", f"{path} takes {', '.join(methods)}")
            self._start()
            status, extra, body = serve(environ)
            headers = extra
        except CometError as error:
            # ASCII: a message may quote text that is not Unicode (a Reject's, say).
            status, body = error.status, json.dumps(error.body(), separators=(",", ":")).encode()
            if error.retry_after is not None:
                headers.append(("Retry-After", str(max(1, math.ceil(error.retry_after)))))
            self._count_error(error.code)
        except Exception:
            log.exception("comet: internal error answering %s", path)
            status, body = 500, b'{"error":"internal","message":"internal server error"}'
            self._count_error("internal")
        if "comet.set_cookie" in environ:
            headers.append(("Set-Cookie", environ["comet.set_cookie"]))
        headers.append(("Content-Length", str(len(body))))
        response = [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [body]
        later = environ.get("comet.later")
        if later:                           # this thread's commits, their polls not yet woken
            response = _Then(body, functools.partial(self._wake_pushed, later))
        try:
            start_response(_STATUS_LINES[status], headers)
        except BaseException:
            if later:
                response.close()            # no answer after all: wake them now
            raise
        return response

    def _identify(self, environ):
        """The client id of a poll or push, issuing the cookie to a new client."""
        client = self.client_id(environ)
        if client is None and self.id is None:
            sid = secrets.token_urlsafe(18)
            secure = "; Secure" if environ.get("wsgi.url_scheme") == "https" else ""
            environ["comet.set_cookie"] = f"comet_sid={sid}; Path=/; HttpOnly; SameSite=Lax{secure}"
            client = _public_id(sid)
        if client is None:
            raise CometError(403, "forbidden", "this request has no client identity")
        if not (0 < len(client) <= _MAX_ID and _unicode(client)):
            raise CometError(403, "forbidden", f"a client id is 1 to {_MAX_ID} characters"
                                               " of Unicode text")
        if not self.store.holds_nul and "\x00" in client:
            raise CometError(403, "forbidden", "this server's store cannot hold a client id"
                                               " holding U+0000")
        environ["comet.id"] = client
        return client

    def _address(self, environ):
        """What the per-address limits are kept by (None: none for this request)."""
        if self.client_address is not None:
            return self._call(self.client_address, environ)
        address = environ.get("REMOTE_ADDR")
        if address and ":" in address:      # IPv6: a host has a /64 to pick addresses from
            with contextlib.suppress(ValueError):
                ip = ipaddress.IPv6Address(address)
                return str(ip.ipv4_mapped or ipaddress.IPv6Network((ip, 64), strict=False))
        return address

    def _serve_poll(self, environ):
        client = self._identify(environ)
        return 200, [_JSON, _NO_STORE], self._poll(client, _cursor_of(environ),
                                                   self._address(environ)).encode()

    def _serve_push(self, environ):
        content_type = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise CometError(415, "content_type", "push takes Content-Type: application/json")
        origin = environ.get("HTTP_ORIGIN")
        if origin is not None and origin not in self.allowed_origins \
                and not _same_origin(origin, environ):
            raise CometError(403, "bad_origin", f"pushes from {origin} are not allowed")
        client = self._identify(environ)
        address = self._address(environ)
        wait = self._address_rate.wait(address) if address is not None else 0
        wait = wait or self._rate.wait(client)
        if wait:
            raise CometError(429, "rate_limited", "too many pushes: slow down", retry_after=wait)
        packages = _loads(_read_body(environ, self.max_body))
        if not isinstance(packages, list):
            packages = [packages]
        elif len(packages) > self.max_batch:
            raise _bad_package(f"a batch holds at most {self.max_batch} packages")
        # What this thread commits is woken once the answer is written (``_Then``).
        self._local.later = later = environ["comet.later"] = []
        with self._counting:
            self._pushing += 1              # until its polls are woken (_wake_pushed)
        try:
            stamps = self._accept(packages, client, environ)
        except Exception:
            if not later:                   # else woken once the error's answer is written
                self._pushed()
            raise
        except BaseException:
            # No answer will be written (gevent.Timeout, GreenletExit): what committed
            # before the interruption is woken now, and the push no longer counts.
            self._wake_pushed(later)
            raise
        finally:
            self._local.later = None
        if not later:                       # nothing committed: no polls to wake
            self._pushed()
        return 200, [_JSON, _NO_STORE], _dumps({"accepted": stamps}).encode()

    def _serve_script(self, environ):
        if self._script is None:
            path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "comet_client.js")
            try:
                with open(path, "rb") as file:
                    script = file.read()
            except OSError:
                raise CometError(404, "not_found",
                                 "comet_client.js is not beside comet.py") from None
            self._script = script, '"%s"' % hashlib.sha1(script).hexdigest()[:20]
        script, etag = self._script
        headers = [("Content-Type", "application/javascript; charset=utf-8"),
                   ("Cache-Control", "no-cache"), ("ETag", etag)]
        if environ.get("HTTP_IF_NONE_MATCH") == etag:
            return 304, headers[1:], b""
        return 200, headers, script
