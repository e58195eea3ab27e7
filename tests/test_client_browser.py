"""The browser client (comet_client.js) in headless Chromium against comet.py.

Needs /usr/bin/chromium and the `playwright` package (never `playwright install`).
Without them the tests skip locally and fail under CI=true.

A retry waits a random time (full jitter). A test about how long a page waits
pins the page's Math.random, so that the wait a bug would leave is certain, not
likely, to show.
"""
import collections
import json
import re
import threading
import time
from urllib.parse import parse_qs, urlencode

import pytest

import comet
from support import Client, ServerProcess, ThreadedServer, chromium, free_port, wait_until

STAMP = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
WAIT_MS = 10000
WORST_JITTER = 0.999       # Math.random() in the page: every backoff wait its longest

PAGE = b"""<!doctype html><meta charset="utf-8"><title>comet test</title>
<script src="/scripts/comet.js"></script>
<script>
  window.got = []; window.statuses = []; window.resets = [];
  comet.on("chat", function (pkg) { got.push(pkg); });
  comet.on("$status", function (s) { statuses.push(s); });
  comet.on("$reset", function (answer) { resets.push(answer); });
  // How each comet request of the page ended: {path, status} or {path, failed: true}.
  window.requests = [];
  var browserFetch = window.fetch;
  window.fetch = function (url, init) {
    var request = {path: String(url)};
    requests.push(request);
    return browserFetch.call(window, url, init).then(
      function (res) { request.status = res.status; return res; },
      function (err) { request.failed = true; throw err; });
  };
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
    """Sits in front of Comet: records each client's requests, answers in the
    server's place when told to, can play dead, can rewind a cursor."""

    def __init__(self, app):
        self.app = app
        self.polled = set()        # client id of every client that polled with its cookie
        self.last_cursor = {}      # client id -> cursor of its latest poll
        self.down = False          # answer 503 to every comet request
        self.refused = 0           # comet requests answered 503 while down
        self.rewind = {}           # client id -> cursor to send instead, once
        self.rewound_answer = {}   # client id -> body of the rewound poll's answer
        self.requests = collections.defaultdict(list)   # (client id, path) -> [[arrival, status]]
        self.canned = {}           # (client id, path) -> [status, Retry-After or None, times left or None]
        self.hook_raised = collections.Counter()         # text -> times the chat hook raised for it
        self.held = {}             # (client id, path) -> Event a canned answer waits for

    def fail(self, page, path, status, times=None, retry_after=None):
        """Answer ``status`` to the page's next ``times`` requests to ``path`` (all, when None)."""
        self.canned[sid_of(page), path] = [status, retry_after, times]

    def heal(self, page, path):
        self.canned.pop((sid_of(page), path), None)

    def hold(self, page, path):
        """Canned answers to the page's requests to ``path`` wait until the returned
        event is set (a request out while the test acts)."""
        held = self.held[sid_of(page), path] = threading.Event()
        return held

    def wait_for_answers(self, page, path, status, count, timeout=10):
        """When the page's first ``count`` requests to ``path`` answered ``status`` arrived."""
        return wait_until(lambda: len(times := self.answers(page, path, status)) >= count and times,
                          timeout=timeout)[:count]

    def answers(self, page, path, status=None):
        """When the page's requests to ``path`` arrived (those answered ``status``, when given)."""
        return [at for at, answered in self.requests[sid_of(page), path]
                if status is None or answered == status]

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if not path.startswith("/comet/"):
            return self.app(environ, start_response)
        if self.down:
            self.refused += 1
            return self._answer(start_response, 503, 1)
        sid = self.app.client_id(environ)
        request = [time.monotonic(), None]
        self.requests[sid, path].append(request)

        def recording_start_response(status, headers, *exc_info):
            request[1] = int(status[:3])
            return start_response(status, headers, *exc_info)
        canned = self.canned.get((sid, path))
        if canned and canned[2] != 0:
            status, retry_after, times = canned
            if times is not None:
                canned[2] -= 1
            environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            held = self.held.get((sid, path))
            if held is not None:
                held.wait(30)
            return self._answer(recording_start_response, status, retry_after)
        if path != "/comet/poll" or sid is None:
            return self.app(environ, recording_start_response)
        query = parse_qs(environ.get("QUERY_STRING", ""))
        if "cursor" in query:
            self.last_cursor[sid] = query["cursor"][0]
        self.polled.add(sid)
        if sid not in self.rewind:
            return self.app(environ, recording_start_response)
        environ["QUERY_STRING"] = urlencode({"cursor": self.rewind.pop(sid)})
        body = b"".join(self.app(environ, recording_start_response))
        self.rewound_answer[sid] = json.loads(body)
        return [body]

    @staticmethod
    def _answer(start_response, status, retry_after):
        headers = [("Content-Type", "application/json")]
        if retry_after is not None:
            headers.append(("Retry-After", str(retry_after)))
        start_response(f"{status} Test", headers)
        return [json.dumps({"error": "test", "message": f"{status} from the test"}).encode()]


def page_app(environ, start_response):
    if environ.get("PATH_INFO") == "/":
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
        return [PAGE]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found"]


@pytest.fixture(scope="module")
def server():
    app = comet.Comet(page_app, store="memory:", poll_timeout=1)
    harness = Harness(app)

    @app.listener("all")
    def everyone(environ, package, db):
        return sorted(harness.polled)

    @app.listener("to")
    def to(environ, package, db):
        return package["to"]

    @app.action("chat").on_submit
    def raise_on_request(package, private, db, environ):
        if package.get("text") == "the hook raises":
            harness.hook_raised[package["text"]] += 1
            raise RuntimeError("a hook failing on purpose")
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


def push_to(server, page, text):
    """A server-side push of a chat package to the page alone."""
    server.app.push({"type": "chat", "listeners": ["to"], "to": [sid_of(page)], "text": text})


def pin_jitter(page, fraction):
    page.evaluate("fraction => { Math.random = () => fraction; }", fraction)


def seconds_until_received(page, act, count=1):
    """Run ``act`` and return how many seconds later the page has ``count`` chat packages."""
    started = time.monotonic()
    act()
    page.wait_for_function("n => got.length >= n", arg=count, timeout=2 * WAIT_MS)
    return time.monotonic() - started


def set_visibility(page, state):
    """Make the page ``hidden`` or ``visible``, as the browser would tell it (headless
    pages are always visible: the test plays the browser)."""
    page.evaluate("""state => {
        window.visibility = state;
        Object.defineProperty(document, "visibilityState", {configurable: true, get: () => visibility});
        document.dispatchEvent(new Event("visibilitychange"));
    }""", state)


def backed_off_after_failed_polls(server, page, status=502):
    """Make the page's polls fail (no Retry-After, as from a proxy) until its
    poll loop has failed four times: with the worst jitter it now waits 4 s."""
    pin_jitter(page, WORST_JITTER)
    server.fail(page, "/comet/poll", status)
    server.wait_for_answers(page, "/comet/poll", status, 4)
    server.heal(page, "/comet/poll")


# ---- the behaviour --------------------------------------------------------------

def test_two_pages_exchange_a_package(open_client):
    alice, bob = open_client(), open_client()

    push(alice, "hello bob")

    assert wait_for_texts(bob, 1) == ["hello bob"]
    assert bob.evaluate("got[0].sender") == sid_of(alice)
    assert wait_for_texts(alice, 1) == ["hello bob"]


def test_push_leaves_the_callers_object_untouched_and_resolves_with_the_stamp(open_client):
    alice = open_client()

    before, after, stamp = alice.evaluate("""async () => {
        const pkg = {type: "chat", listeners: ["all"], text: "untouched", nested: {a: [1]}};
        const before = JSON.stringify(pkg);
        const stamp = await within(comet.push(pkg));
        return [before, JSON.stringify(pkg), stamp];
    }""")

    assert after == before
    assert STAMP.match(stamp)
    assert wait_for_texts(alice, 1) == ["untouched"]
    assert alice.evaluate("got[0]._stamp") == stamp


def test_the_same_object_pushed_twice_is_two_packages(open_client):
    alice = open_client()

    stamps = alice.evaluate("""async () => {
        const pkg = {type: "chat", listeners: ["all"], text: "twice"};
        return [await within(comet.push(pkg)), await within(comet.push(pkg))];
    }""")

    assert stamps[0] != stamps[1]
    assert wait_for_texts(alice, 2) == ["twice", "twice"]
    assert alice.evaluate("got.map(p => p._stamp)") == stamps


def test_a_well_formed_stamp_from_the_caller_is_kept(open_client):
    alice = open_client()

    result = push(alice, "mine", _stamp="caller-chosen_stamp-1")

    assert result == {"stamp": "caller-chosen_stamp-1"}
    wait_for_texts(alice, 1)
    assert alice.evaluate("got[0]._stamp") == "caller-chosen_stamp-1"


def test_a_package_resent_with_its_stamp_is_delivered_once(open_client):
    alice = open_client()

    first = push(alice, "resent", _stamp="resent-stamp-0001")
    second = push(alice, "resent", _stamp="resent-stamp-0001")
    push(alice, "sentinel")     # a second copy would arrive before it

    assert first == second == {"stamp": "resent-stamp-0001"}
    assert wait_for_texts(alice, 2) == ["resent", "sentinel"]


def test_a_refused_package_rejects_and_the_ones_behind_it_are_delivered(open_client, server):
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
    assert len(server.answers(alice, "/comet/push")) == 2     # the batch, then "after" alone


def test_a_package_answered_500_three_times_rejects_and_the_ones_behind_it_are_delivered(
        open_client, server):
    alice, bob = open_client(), open_client()

    outcomes = alice.evaluate("""async () => {
        const settle = p => within(p).then(stamp => ({stamp}),
                                   err => ({status: err.status, error: err.error, message: err.message}));
        return Promise.all([
            settle(comet.push({type: "chat", listeners: ["all"], text: "before"})),
            settle(comet.push({type: "chat", listeners: ["all"], text: "the hook raises"})),
            settle(comet.push({type: "chat", listeners: ["all"], text: "after"})),
        ]);
    }""")

    assert STAMP.match(outcomes[0]["stamp"]) and STAMP.match(outcomes[2]["stamp"])
    assert outcomes[1]["status"] == 500 and outcomes[1]["error"] == "internal"
    assert server.hook_raised["the hook raises"] == 3
    assert wait_for_texts(bob, 2) == ["before", "after"]
    assert alice.evaluate("comet.pending()") == 0


@pytest.mark.parametrize("status", [503, 429])
def test_a_push_answered_503_or_429_is_sent_again_after_retry_after(open_client, server, status):
    alice, bob = open_client(), open_client()
    server.fail(alice, "/comet/push", status, times=2, retry_after=1)

    result = push(alice, "persistent")

    assert STAMP.match(result["stamp"])
    assert wait_for_texts(bob, 1) == ["persistent"]
    tries = server.answers(alice, "/comet/push")
    assert len(tries) == 3
    assert all(later - earlier >= 0.95 for earlier, later in zip(tries, tries[1:])), tries


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


def test_the_poll_backoff_grows_to_a_cap_of_5_s(open_client, server):
    alice = open_client()
    pin_jitter(alice, 0.5)                 # each wait half its window, the window 0.5 s doubling to 5 s
    server.fail(alice, "/comet/poll", 502)

    try:
        times = server.wait_for_answers(alice, "/comet/poll", 502, 7, timeout=25)
    finally:
        server.heal(alice, "/comet/poll")

    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    expected = [0.25, 0.5, 1.0, 2.0, 2.5, 2.5]
    assert all(e * 0.9 <= gap <= e + 1.0 for gap, e in zip(gaps, expected)), [round(g, 2) for g in gaps]


def test_failing_pushes_do_not_cut_the_poll_backoff_short(open_client, server):
    alice = open_client()
    pin_jitter(alice, 0.5)
    server.fail(alice, "/comet/poll", 502)     # a proxy whose server is down: no Retry-After
    server.fail(alice, "/comet/push", 502)

    alice.evaluate("() => { comet.push({type: 'chat', listeners: ['to'], to: [], text: 'stuck'}); }")
    try:
        times = server.wait_for_answers(alice, "/comet/poll", 502, 4)
    finally:
        server.heal(alice, "/comet/poll")
        server.heal(alice, "/comet/push")

    assert times[3] - times[0] >= 0.9 * (0.25 + 0.5 + 1.0), [round(t - times[0], 2) for t in times]


def test_status_is_online_only_while_polls_are_answered(open_client, server):
    alice = open_client()
    alice.wait_for_function("statuses.at(-1) === 'online'", timeout=WAIT_MS)
    server.fail(alice, "/comet/poll", 502)
    alice.wait_for_function("statuses.at(-1) === 'offline'", timeout=WAIT_MS)

    failed = len(server.answers(alice, "/comet/poll", 502))
    push(alice, "answered while polls fail")
    server.wait_for_answers(alice, "/comet/poll", 502, failed + 1)     # the poll it hurried

    assert alice.evaluate("statuses") == ["online", "offline"]
    server.heal(alice, "/comet/poll")
    alice.wait_for_function("statuses.at(-1) === 'online'", timeout=WAIT_MS)


def test_a_push_answer_ends_the_poll_backoff(open_client, server):
    alice = open_client()
    backed_off_after_failed_polls(server, alice)

    assert STAMP.match(push(alice, "to nobody", listeners=["to"], to=[])["stamp"])
    seconds = seconds_until_received(alice, lambda: push_to(server, alice, "for alice"))

    assert seconds <= 2.0, f"received {seconds:.2f} s after the push was answered"


def test_a_push_answer_leaves_the_polls_retry_after_alone(open_client, server):
    alice = open_client()
    server.fail(alice, "/comet/poll", 503, times=1, retry_after=2)
    refused = wait_until(lambda: server.answers(alice, "/comet/poll", 503))[0]

    push(alice, "answered during the poll's Retry-After")     # hurries the poll loop
    next_poll = wait_until(lambda: [at for at in server.answers(alice, "/comet/poll") if at > refused])[0]

    assert next_poll - refused >= 1.95, f"polled again {next_poll - refused:.2f} s after a Retry-After of 2"


def test_a_page_becoming_visible_polls_at_once(open_client, server):
    alice = open_client()
    set_visibility(alice, "hidden")
    backed_off_after_failed_polls(server, alice)
    push_to(server, alice, "while hidden")

    seconds = seconds_until_received(alice, lambda: set_visibility(alice, "visible"))

    assert seconds <= 2.0, f"received {seconds:.2f} s after the page became visible"


def test_a_page_becoming_visible_while_a_failing_poll_is_out_polls_at_once_after_it(
        open_client, server):
    alice = open_client()
    set_visibility(alice, "hidden")
    pin_jitter(alice, WORST_JITTER)
    server.fail(alice, "/comet/poll", 502)
    server.wait_for_answers(alice, "/comet/poll", 502, 3)
    sent = len(server.answers(alice, "/comet/poll"))
    released = server.hold(alice, "/comet/poll")
    try:
        # The fourth failing poll is out (held) as the page becomes visible.
        wait_until(lambda: len(server.answers(alice, "/comet/poll")) > sent)
        set_visibility(alice, "visible")
        push_to(server, alice, "while the poll was out")
        server.heal(alice, "/comet/poll")
    finally:
        released.set()

    # After four failures its backoff is 4 s: it is not waited out.
    seconds = seconds_until_received(alice, lambda: None)

    assert seconds <= 2.0, f"received {seconds:.2f} s after the failing poll came back"


def test_a_page_coming_back_online_receives_a_waiting_package_at_once(open_client, server):
    alice = open_client()
    pin_jitter(alice, WORST_JITTER)
    alice.context.set_offline(True)
    # Its polls fail (the parked one may still be answered): after four failures it waits 4 s.
    alice.wait_for_function("requests.filter(r => r.path.includes('/poll') && r.failed).length >= 4",
                            timeout=WAIT_MS)
    push_to(server, alice, "waiting")
    assert alice.evaluate("[got.length, statuses.at(-1)]") == [0, "offline"]

    seconds = seconds_until_received(alice, lambda: alice.context.set_offline(False))

    assert seconds <= 2.0, f"received {seconds:.2f} s after the browser came back online"
    alice.wait_for_function("statuses.at(-1) === 'online'", timeout=WAIT_MS)


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


# ---- a real outage: the server process stopped, then started on the same port ----

OUTAGE = 15.0      # seconds the server is gone


def test_after_an_outage_a_polling_page_receives_within_7_s_of_the_restart(browser, tmp_path):
    server = ServerProcess(f"sqlite:///{tmp_path / 'comet.db'}", port=free_port(), poll_timeout=2)
    context = browser.new_context(extra_http_headers={"X-Client": "bob"})   # the test app's id
    try:
        server.start()
        context.route(server.url + "/", lambda route: route.fulfill(body=PAGE, content_type="text/html"))
        bob = context.new_page()
        bob.goto(server.url + "/")
        pin_jitter(bob, WORST_JITTER)
        bob.evaluate("comet.controller()")          # it only polls: no push answer hurries it
        bob.wait_for_function("statuses.at(-1) === 'online'", timeout=WAIT_MS)

        server.stop()
        bob.wait_for_function("statuses.at(-1) === 'offline'", timeout=WAIT_MS)
        bob.wait_for_timeout(OUTAGE * 1000)        # the outage itself, not a wait for an event
        # Back right after a failed poll: the page's whole backoff wait is still ahead.
        failed = bob.evaluate("requests.filter(r => r.failed).length")
        bob.wait_for_function("n => requests.filter(r => r.failed).length > n", arg=failed, timeout=WAIT_MS)
        server.start()                              # returns once the port accepts connections
        alice = Client(server.url, "alice")

        seconds = seconds_until_received(bob, lambda: alice.push(
            {"type": "chat", "listeners": ["to"], "to": ["bob"], "text": "after the restart"}))
    finally:
        context.close()
        server.stop()

    assert seconds <= 7.0, f"received {seconds:.2f} s after the restart"
