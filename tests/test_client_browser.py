"""The browser client (comet_client.js) in headless Chromium against comet.py.

Needs /usr/bin/chromium and the `playwright` package (never `playwright install`).
Without them the tests skip locally and fail under CI=true.
"""
import json
import re
from urllib.parse import parse_qs, urlencode

import pytest

import comet
from support import ThreadedServer, chromium, wait_until

STAMP = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
WAIT_MS = 10000

PAGE = b"""<!doctype html><meta charset="utf-8"><title>comet test</title>
<script src="/scripts/comet.js"></script>
<script>
  window.got = []; window.statuses = []; window.resets = [];
  comet.on("chat", function (pkg) { got.push(pkg); });
  comet.on("$status", function (s) { statuses.push(s); });
  comet.on("$reset", function (answer) { resets.push(answer); });
  // The test's own deadline on a promise: page.evaluate has none.
  window.within = function (promise) {
    return Promise.race([promise, new Promise(function (_, reject) {
      setTimeout(function () { reject(new Error("no answer within 10 s")); }, 10000);
    })]);
  };
</script>
"""


# ---- the server: the page app wrapped by Comet, wrapped by a test harness ----

class Harness:
    """Sits in front of Comet: records who polls, can play dead, can rewind a cursor."""

    def __init__(self, app):
        self.app = app
        self.polled = set()        # client id of every client that polled with its cookie
        self.last_cursor = {}      # client id -> cursor of its latest poll
        self.down = False          # answer 503 to every comet request
        self.refused = 0           # comet requests answered 503 while down
        self.rewind = {}           # client id -> cursor to send instead, once
        self.rewound_answer = {}   # client id -> body of the rewound poll's answer

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if not path.startswith("/comet/"):
            return self.app(environ, start_response)
        if self.down:
            self.refused += 1
            start_response("503 Service Unavailable", [
                ("Content-Type", "application/json"), ("Retry-After", "1")])
            return [b'{"error": "unavailable", "message": "down for the test"}']
        sid = self.app.client_id(environ)
        if path != "/comet/poll" or sid is None:
            return self.app(environ, start_response)
        query = parse_qs(environ.get("QUERY_STRING", ""))
        if "cursor" in query:
            self.last_cursor[sid] = query["cursor"][0]
        self.polled.add(sid)
        if sid not in self.rewind:
            return self.app(environ, start_response)
        environ["QUERY_STRING"] = urlencode({"cursor": self.rewind.pop(sid)})
        body = b"".join(self.app(environ, start_response))
        self.rewound_answer[sid] = json.loads(body)
        return [body]


def page_app(environ, start_response):
    if environ.get("PATH_INFO") == "/":
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
        return [PAGE]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found"]


@pytest.fixture(scope="module")
def server():
    app = comet.Comet(page_app, store="memory:", poll_timeout=2)
    harness = Harness(app)

    @app.listener("all")
    def everyone(environ, package, db):
        return sorted(harness.polled)
    with ThreadedServer(harness) as httpd:
        harness.url = httpd.url + "/"
        yield harness


# ---- the browser ----------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


@pytest.fixture
def open_client(browser, server):
    """open_client() -> a started page in its own browser context (its own comet_sid)."""
    contexts = []

    def open_client(start=True):
        context = browser.new_context()
        contexts.append(context)
        page = context.new_page()
        page.errors = []
        page.on("console", lambda m: m.type == "error" and page.errors.append(m.text))
        page.goto(server.url)
        if start:
            page.evaluate("comet.start()")
            wait_until(lambda: sid_of(page) in server.polled)
        return page

    yield open_client
    for context in contexts:
        context.close()


def sid_of(page):
    """The client id of a page: the one its comet_sid cookie stands for."""
    for cookie in page.context.cookies():
        if cookie["name"] == "comet_sid":
            return comet._public_id(cookie["value"])
    return None


def wait_for_texts(page, count):
    page.wait_for_function("n => got.length >= n", arg=count, timeout=WAIT_MS)
    return page.evaluate("got.map(p => p.text)")


def push(page, text, **fields):
    """Push a chat package from the page; returns the promise's outcome."""
    return page.evaluate("""async ([text, fields]) => {
        const pkg = Object.assign({type: "chat", listeners: ["all"], text}, fields);
        try { return {stamp: await within(comet.push(pkg))}; }
        catch (err) { return {status: err.status, error: err.error, message: err.message}; }
    }""", [text, fields])


# ---- the behaviour --------------------------------------------------------------

def test_two_pages_exchange_a_package(open_client):
    alice, bob = open_client(), open_client()

    push(alice, "hello bob")

    assert wait_for_texts(bob, 1) == ["hello bob"]
    assert bob.evaluate("got[0].sender") == sid_of(alice)
    assert wait_for_texts(alice, 1) == ["hello bob"]


def test_push_sets_the_stamp_synchronously_and_resolves_with_it(open_client):
    alice = open_client()

    stamps = alice.evaluate("""async () => {
        const pkg = {type: "chat", listeners: ["all"], text: "stamped"};
        const promise = comet.push(pkg);
        const synchronous = pkg._stamp;
        return [synchronous, await within(promise)];
    }""")

    assert STAMP.match(stamps[0])
    assert stamps[1] == stamps[0]
    assert wait_for_texts(alice, 1) == ["stamped"]
    assert alice.evaluate("got[0]._stamp") == stamps[0]


def test_a_well_formed_stamp_from_the_caller_is_kept(open_client):
    alice = open_client()

    result = push(alice, "mine", _stamp="caller-chosen_stamp-1")

    assert result == {"stamp": "caller-chosen_stamp-1"}
    wait_for_texts(alice, 1)
    assert alice.evaluate("got[0]._stamp") == "caller-chosen_stamp-1"


def test_a_refused_package_rejects_and_the_ones_behind_it_are_delivered(open_client):
    alice, bob = open_client(), open_client()

    # Pushed in one tick, so the worker sends the three in one batch.
    outcomes = alice.evaluate("""async () => {
        const settle = p => within(p).then(stamp => ({stamp}),
                                   err => ({status: err.status, error: err.error, message: err.message}));
        return Promise.all([
            settle(comet.push({type: "chat", listeners: ["all"], text: "before"})),
            settle(comet.push({type: "chat", listeners: ["nobody-registered-this"], text: "bad"})),
            settle(comet.push({type: "chat", listeners: ["all"], text: "after"})),
        ]);
    }""")

    assert STAMP.match(outcomes[0]["stamp"]) and STAMP.match(outcomes[2]["stamp"])
    assert outcomes[1]["status"] == 400
    assert outcomes[1]["error"] == "unknown_listener"
    assert outcomes[1]["message"]
    assert wait_for_texts(bob, 2) == ["before", "after"]
    assert alice.evaluate("comet.pending()") == 0


def test_pushes_made_while_the_server_answers_503_arrive_once_in_order(open_client, server):
    alice, bob = open_client(), open_client()
    server.down = True
    try:
        alice.evaluate("""() => { for (let i = 1; i <= 5; i++)
            comet.push({type: "chat", listeners: ["all"], text: "m" + i}); }""")
        alice.wait_for_function("statuses.includes('offline')", timeout=WAIT_MS)
        assert alice.evaluate("comet.pending()") == 5
        assert server.refused > 0
    finally:
        server.down = False

    assert wait_for_texts(bob, 5) == ["m1", "m2", "m3", "m4", "m5"]
    push(alice, "sentinel")   # anything repeated would arrive before it
    assert wait_for_texts(bob, 6) == ["m1", "m2", "m3", "m4", "m5", "sentinel"]
    assert alice.evaluate("comet.pending()") == 0
    alice.wait_for_function("statuses.at(-1) === 'online'", timeout=WAIT_MS)
    statuses = alice.evaluate("statuses")
    assert all(a != b for a, b in zip(statuses, statuses[1:])), statuses


def test_repeated_stamps_from_an_old_cursor_are_dropped(open_client, server):
    alice, bob = open_client(), open_client()
    wait_until(lambda: sid_of(bob) in server.last_cursor)
    old_cursor = server.last_cursor[sid_of(bob)]
    push(alice, "one")
    assert wait_for_texts(bob, 1) == ["one"]

    # Bob's next poll goes out with the old cursor, as after a lost answer.
    server.rewind[sid_of(bob)] = old_cursor
    push(alice, "two")
    wait_until(lambda: sid_of(bob) in server.rewound_answer)
    push(alice, "three")

    repeated = [p["text"] for p in server.rewound_answer[sid_of(bob)]["packages"]]
    assert "one" in repeated
    assert wait_for_texts(bob, 3) == ["one", "two", "three"]
    assert bob.evaluate("new Set(got.map(p => p._stamp)).size") == 3


def test_a_reset_answer_fires_reset_and_polling_goes_on(open_client, server):
    alice, bob = open_client(), open_client()
    server.rewind[sid_of(bob)] = "not-a-cursor-of-this-store"

    push(alice, "one")   # ends bob's parked poll; the next one carries the bad cursor
    bob.wait_for_function("resets.length === 1", timeout=WAIT_MS)
    push(alice, "two")

    assert bob.evaluate("resets[0].reset") is True
    assert wait_for_texts(bob, 2) == ["one", "two"]


def test_stop_keeps_the_cursor_and_the_queue_for_start(open_client):
    alice, bob = open_client(), open_client()
    bob.evaluate("comet.stop()")

    push(alice, "while stopped")
    bob.evaluate("""() => { comet.push({type: "chat", listeners: ["all"], text: "queued"}); }""")
    assert bob.evaluate("comet.pending()") == 1
    bob.evaluate("comet.start()")

    assert wait_for_texts(bob, 2) == ["while stopped", "queued"]
    assert bob.evaluate("comet.pending()") == 0


def test_a_throwing_handler_neither_stops_delivery_nor_other_handlers(open_client, server):
    alice = open_client()
    bob = open_client(start=False)
    bob.evaluate("""() => {
        comet.ping.chat = function () { throw new Error("handler failed on purpose"); };
        comet.start();
    }""")
    wait_until(lambda: sid_of(bob) in server.polled)

    push(alice, "first")
    push(alice, "second")

    assert wait_for_texts(bob, 2) == ["first", "second"]
    assert any("handler failed on purpose" in e for e in bob.errors)


def test_a_push_made_in_pagehide_still_goes_out(open_client):
    alice, bob = open_client(), open_client()
    alice.evaluate("""() => addEventListener("pagehide", () =>
        comet.push({type: "chat", listeners: ["all"], text: "leaving"}))""")

    alice.goto("about:blank")

    assert wait_for_texts(bob, 1) == ["leaving"]
