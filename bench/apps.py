"""The WSGI applications the benchmark serves, each behind the same ``Bench`` wrapper.

- ``hello``: a bare hello-world, the cost of one request and nothing else.
- ``floor``: the ideal long poll, a condition and a list: no storage, no
  checks, every package to every poller.  It speaks comet's wire protocol
  (``GET /comet/poll?cursor=N``, ``POST /comet/push``), so the same client
  drives it.
- ``socketio``: python-socketio's long-polling transport; clients join a room
  at connect, and ``POST /push`` makes the server emit to that room.
- ``comet``: comet.py on a store URL; the listener ``room`` delivers to every
  client that polled with the package's ``room`` (everyone in the room), and
  every name under ``channel:`` is a channel (``comet.channels``, no
  presence timeout): members join with a ``join`` package, or the app enrols
  them in bulk (``POST /_bench/enrol``, the Store protocol's ``add_member``,
  as an app adding its existing users to a channel would).  A join or leave
  is delivered to the joiner alone (``on_emit`` of those two types), as an
  app with large channels would have it: told to every member, the joins of
  10,000 members would be 50 million deliveries.
  On PostgreSQL, ``notify=False`` opens the store without NOTIFY/LISTEN (the
  processes then find each other's pushes by tailing alone), to measure what
  NOTIFY costs and brings.

``Bench`` adds ``GET /_bench/stats`` (the serving process's pid, how many
poll requests are inside the application now, and the app's own count of
parked polls) and, for comet, ``POST /_bench/enrol``.
"""

import hashlib
import io
import json
import os
import threading
import urllib.parse

POLL_TIMEOUT = 25.0
STATS_PATH = "/_bench/stats"
ENROL_PATH = "/_bench/enrol"


def _answer(start_response, body, content_type="application/json"):
    start_response("200 OK", [("Content-Type", content_type),
                              ("Content-Length", str(len(body)))])
    return [body]


def direct(app):
    """``respond(method, client, query="", body=b"")``: a poll (GET) or a push (POST)
    of ``client`` in room ``r``, answered by calling ``app`` as a WSGI server would,
    with no socket; returns the answer's body."""

    def respond(method, client, query="", body=b""):
        environ = {"REQUEST_METHOD": method,
                   "PATH_INFO": {"GET": "/comet/poll", "POST": "/comet/push"}[method],
                   "QUERY_STRING": query, "CONTENT_TYPE": "application/json",
                   "CONTENT_LENGTH": str(len(body)), "HTTP_X_CLIENT": client, "HTTP_X_ROOM": "r",
                   "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "bench:1", "wsgi.url_scheme": "http",
                   "wsgi.input": io.BytesIO(body)}
        return b"".join(app(environ, lambda status, headers: None))
    return respond


def cursor_of(answer):
    """A poll answer's cursor, cut out of its body rather than parsed."""
    return answer.split(b'"cursor":"', 1)[1].split(b'"', 1)[0].decode()


def _read_body(environ):
    return environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))


def _query(environ):
    return dict(urllib.parse.parse_qsl(environ.get("QUERY_STRING", "")))


class Bench:
    """Counts the poll requests inside ``app`` and serves ``/_bench/stats``."""

    def __init__(self, app, poll_path, stats=None, enrol=None):
        self.app = app
        self.poll_path = poll_path
        self.stats = stats
        self.enrol = enrol
        self.inflight = 0
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == STATS_PATH:
            stats = {"pid": os.getpid(), "inflight": self.inflight}
            if self.stats:
                stats.update(self.stats())
            return _answer(start_response, json.dumps(stats).encode())
        if path == ENROL_PATH and self.enrol:
            return _answer(start_response, json.dumps(self.enrol(json.loads(_read_body(environ)))).encode())
        if environ.get("REQUEST_METHOD") != "GET" or not path.startswith(self.poll_path):
            return self.app(environ, start_response)
        with self._lock:
            self.inflight += 1
        try:
            # Every app here holds a poll inside this call, not in the iterable.
            return self.app(environ, start_response)
        finally:
            with self._lock:
                self.inflight -= 1


def hello(environ, start_response):
    return _answer(start_response, b"Hello, world!", "text/plain")


class Floor:
    """The ideal long poll: one list of packages, one condition to wait on."""

    def __init__(self, poll_timeout=POLL_TIMEOUT):
        self.poll_timeout = poll_timeout
        self.packages = []
        self.condition = threading.Condition()
        self.parked = 0                     # polls waiting on the condition now

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") == "POST":
            body = _read_body(environ)
            with self.condition:
                self.packages.append(body)
                self.condition.notify_all()
            return _answer(start_response, b'{"accepted":["floor"]}')
        cursor = _query(environ).get("cursor")
        with self.condition:
            if cursor is None:
                after = len(self.packages)
            else:
                after = int(cursor)
                self.parked += 1
                try:
                    self.condition.wait_for(lambda: len(self.packages) > after, self.poll_timeout)
                finally:
                    self.parked -= 1
            packages = self.packages[after:after + 500]
        body = b'{"cursor":"%d","packages":[%s],"reset":false}' % (
            after + len(packages), b",".join(packages))
        return _answer(start_response, body)


def socketio_app(async_mode):
    """python-socketio, polling only; ``?room=R`` at the handshake joins room R."""
    import socketio

    sio = socketio.Server(async_mode=async_mode, transports=["polling"])

    @sio.event
    def connect(sid, environ, auth=None):
        sio.enter_room(sid, _query(environ).get("room", "room"))

    def push(environ, start_response):
        if environ.get("REQUEST_METHOD") != "POST":
            return _answer(start_response, b"Hello, world!", "text/plain")
        package = json.loads(_read_body(environ))
        sio.emit("msg", package, to=package.get("room", "room"))
        return _answer(start_response, b'{"accepted":["socketio"]}')

    return socketio.WSGIApp(sio, push)


def comet_app(store, tail_interval=0.1, poll_timeout=POLL_TIMEOUT, notify=True, rooms_are=None):
    """comet.py with the client id in ``X-Client`` and the listener ``room``.

    ``rooms_are="channel"`` (or ``COMET_BENCH_ROOMS=channel``): a room R is the
    channel ``channel:R`` instead, which every client sending ``X-Room: R``
    (subscribers and publishers) joins once, as a socketio client enters its
    room at the handshake; the load then addresses the channel."""
    import comet

    if not notify:
        store = comet.PostgreSQLStore(store, notify=False)

    rooms = {}                              # room -> {client: None}, filled by polls
    channel_rooms = (rooms_are or os.environ.get("COMET_BENCH_ROOMS")) == "channel"
    joined = set()                          # (client, room) this process enrolled

    def identify(environ):
        client = environ.get("HTTP_X_CLIENT")
        room = environ.get("HTTP_X_ROOM")
        if client and room and channel_rooms:
            if (client, room) not in joined:
                with app.store.transaction() as tx:
                    tx.add_member("channel:" + room, client, json.dumps(client), app.store.now())
                joined.add((client, room))
        elif client and room and environ.get("PATH_INFO", "").endswith("/poll"):
            rooms.setdefault(room, {})[client] = None
        return client

    app = comet.Comet(None, store=store, id=identify, poll_timeout=poll_timeout,
                      tail_interval=tail_interval, rate=(1e6, 1e6), max_polls=50000,
                      address_rate=(1e6, 1e6), max_polls_per_address=50000)
    app.channels("channel:", presence=False)

    def to_the_joiner(package, recipient, private, db):
        return package if recipient == package["sender"] else None

    # Hooks of these two types only: the other packages pay nothing per recipient.
    app.action("join").on_emit(to_the_joiner)
    app.action("leave").on_emit(to_the_joiner)

    def enrol(request):
        """``{"channel": C, "clients": [...]}``: members without a join package."""
        with app.store.transaction() as tx:
            for client in request["clients"]:
                tx.add_member(request["channel"], client, json.dumps(client), app.store.now())
        return {"enrolled": len(request["clients"])}

    @app.listener("room")
    def room(environ, package, db):
        return list(rooms.get(package.get("room"), ()))

    with open(comet.__file__, "rb") as source:
        digest = hashlib.md5(source.read()).hexdigest()[:12]

    def stats():
        return {"comet": comet.__file__, "comet_md5": digest, "parked": app.stats()["parked"]}

    return app, stats, enrol


def make(name, store=None, async_mode="threading", tail_interval=0.1, notify=True):
    """The application ``name``, wrapped in ``Bench``."""
    if name == "hello":
        return Bench(hello, "/comet/poll")
    if name == "floor":
        floor = Floor()
        return Bench(floor, "/comet/poll", lambda: {"parked": floor.parked})
    if name == "socketio":
        return Bench(socketio_app(async_mode), "/socket.io")
    if name == "comet":
        app, stats, enrol = comet_app(store, tail_interval, notify=notify)
        return Bench(app, "/comet/poll", stats, enrol)
    raise ValueError(f"unknown app {name!r}")
