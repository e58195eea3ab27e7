"""demo.py as people use it: several people in headless Chromium, a crashed server,
three gunicorn workers; and the demo's own rules over HTTP.

Needs /usr/bin/chromium and the `playwright` package (never `playwright install`),
and gunicorn for the workers.  Without them those tests skip locally and fail
under CI=true.
"""
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import webtest

import demo as demo_module
from support import chromium, need, wait_until

ROOT = Path(__file__).resolve().parent.parent                 # the repository
PRESENCE_TIMEOUT = 2       # seconds; polls are held 1 s, so a closed page is gone in about 3
WAIT_MS = 15000


class Demo:
    """`python demo.py` in a subprocess, on a free port and a fresh SQLite file."""

    def __init__(self, tmp_path):
        self.db = tmp_path / "chat.db"
        self.log = tmp_path / "demo.log"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self.process = None

    def command(self):
        # -S: no site-packages, as on a fresh Python with nothing installed.
        return [sys.executable, "-S", str(ROOT / "demo.py"), "--port", str(self.port),
                "--db", str(self.db), "--presence-timeout", str(PRESENCE_TIMEOUT),
                "--poll-timeout", "1"]

    def start(self):
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command(), cwd=ROOT, stdout=log,
                                            stderr=subprocess.STDOUT)
        try:
            wait_until(self._answers, timeout=15)
        except AssertionError:
            self.kill()
            pytest.fail("demo.py did not answer:\n" + self.log.read_text())
        return self

    def _answers(self):
        try:
            with urllib.request.urlopen(self.url, timeout=1):
                return True
        except OSError:
            assert self.process.poll() is None, "demo.py exited"
            return False

    def kill(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()


class GunicornDemo(Demo):
    """The demo under gunicorn: 3 gthread workers on one SQLite file, no keep-alive, so
    that each request goes to whichever worker takes it; the access log names its pid."""

    def command(self):
        need(importlib.util.find_spec("gunicorn") is not None,
             "gunicorn is not installed (pip install '.[test]')")
        app = (f"demo:make_chat({str(self.db)!r}, presence_timeout={PRESENCE_TIMEOUT},"
               " poll_timeout=1.0)")
        command = [sys.executable, "-m", "gunicorn", app, "-k", "gthread", "--workers", "3",
                   "--threads", "20", "--keep-alive", "0", "--bind", f"127.0.0.1:{self.port}",
                   "--access-logfile", "-", "--access-logformat", "worker %(p)s %(r)s %(s)s"]
        from gunicorn.config import KNOWN_SETTINGS
        if any(setting.name == "control_socket_disable" for setting in KNOWN_SETTINGS):
            command.append("--no-control-socket")       # gunicorn 24+: one shared socket path
        return command

    def kill(self):
        if self.process.poll() is None:
            self.process.terminate()                    # the arbiter stops its workers
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                super().kill()

    def answers(self, request):
        """``[(worker pid, status)]`` of the requests whose line starts with ``request``."""
        lines = [line.split() for line in self.log.read_text().splitlines()
                 if line.startswith("worker ")]
        return [(pid, status) for _, pid, method, path, _, status in lines
                if f"{method} {path}".startswith(request)]


def fetch(url):
    with urllib.request.urlopen(url, timeout=5) as answer:
        return answer.status, answer.headers["Content-Type"], answer.read().decode()


@pytest.fixture
def demo(tmp_path):
    demo = Demo(tmp_path).start()
    yield demo
    demo.kill()
    assert "Traceback" not in demo.log.read_text(), demo.log.read_text()


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        from playwright.sync_api import expect
        expect.set_options(timeout=WAIT_MS)
        yield browser


@pytest.fixture
def gunicorn_demo(tmp_path):
    demo = GunicornDemo(tmp_path).start()
    yield demo
    demo.kill()
    assert "Traceback" not in demo.log.read_text(), demo.log.read_text()


@pytest.fixture
def open_page(browser):
    """open_page(url, nick, room) -> a page of one person (own browser context) in the room."""
    contexts = []

    def open_page(url, nick, room="general"):
        context = browser.new_context(viewport={"width": 1100, "height": 680})
        contexts.append(context)
        context.add_init_script(f"localStorage.nick = {json.dumps(nick)}")
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.goto(f"{url}#{room}")
        page.locator("#members li.me").wait_for()   # joined, and the room's state loaded
        return page

    yield open_page
    for context in contexts:
        context.close()


@pytest.fixture
def open_chat(open_page, demo):
    """open_chat(nick, room) -> a page of one person in the room of `python demo.py`."""
    return lambda nick, room="general": open_page(demo.url, nick, room)


def say(page, text):
    page.fill("#text", text)
    page.press("#text", "Enter")


def say_accepted(page, text):
    """Say something and wait until the server accepted it, so that turns keep their order."""
    from playwright.sync_api import expect
    say(page, text)
    expect(page.locator("#messages li.pending")).to_have_count(0)


def expect_messages(page, texts):
    """Exactly these messages, in this order, each once, none still waiting for the server."""
    from playwright.sync_api import expect
    expect(page.locator("#messages li p")).to_have_text(texts)
    expect(page.locator("#messages li.pending")).to_have_count(0)


def expect_members(page, nicks):
    from playwright.sync_api import expect
    expect(page.locator("#members li")).to_have_text(sorted(nicks))


# ---- the behaviour ------------------------------------------------------------

def test_demo_serves_the_page_and_the_client_script(demo):
    status, content_type, page = fetch(demo.url)
    assert status == 200 and content_type.startswith("text/html")
    assert '<script src="/scripts/comet.js">' in page

    status, content_type, script = fetch(demo.url + "scripts/comet.js")
    assert status == 200 and "javascript" in content_type
    assert "global.comet" in script


def test_two_people_in_a_room_see_each_other_and_talk_both_ways(open_chat):
    alice = open_chat("alice")
    bob = open_chat("<b>bob</b>")

    expect_members(alice, ["alice", "<b>bob</b>"])
    expect_members(bob, ["alice", "<b>bob</b>"])

    say(alice, "hi bob, <i>this</i> stays text")
    expect_messages(bob, ["hi bob, <i>this</i> stays text"])
    say(bob, "hi alice")
    expect_messages(alice, ["hi bob, <i>this</i> stays text", "hi alice"])
    expect_messages(bob, ["hi bob, <i>this</i> stays text", "hi alice"])
    assert alice.locator("#messages li b").all_text_contents() == ["alice", "<b>bob</b>"]
    assert alice.locator("#messages i, #members b").count() == 0   # no user text became HTML


def test_a_closed_page_leaves_the_member_list_after_the_presence_timeout(open_chat):
    alice = open_chat("alice")
    bob = open_chat("bob")
    expect_members(alice, ["alice", "bob"])
    alice.evaluate("() => { window.leaves = []; comet.on('leave', pkg => leaves.push(pkg)); }")

    bob.context.set_offline(True)    # gone without a word: not even its pagehide leave arrives
    bob.close()

    expect_members(alice, ["alice"])
    leaves = alice.evaluate("leaves.map(pkg => [pkg.listeners[0], pkg.sender.nick, pkg.reason])")
    assert sorted(leaves) == [["lobby", "bob", "timeout"], ["room:general", "bob", "timeout"]]


def test_messages_typed_while_the_server_is_down_arrive_once_in_order(demo, open_chat):
    from playwright.sync_api import expect
    alice = open_chat("alice")
    bob = open_chat("bob")
    say(alice, "before")
    expect_messages(bob, ["before"])

    demo.kill()
    expect(alice.locator("#status")).to_have_class("offline")
    expect(bob.locator("#status")).to_have_class("offline")
    for i in (1, 2, 3):
        say(alice, f"while down {i}")
    expect(alice.locator("#messages li.pending")).to_have_count(3)   # shown at once, greyed
    expect(alice.locator("#messages li.pending small")).to_have_text(["waiting to be sent"] * 3)
    demo.start()

    down = ["while down 1", "while down 2", "while down 3"]
    expect_messages(alice, ["before", *down])
    expect_messages(bob, ["before", *down])
    expect(bob.locator("#status")).to_have_class("online")
    say(bob, "after")                # a repeat of anything earlier would arrive before it
    expect_messages(alice, ["before", *down, "after"])
    expect_messages(bob, ["before", *down, "after"])
    expect(alice.locator("#messages li small")).to_have_text([""] * 5)      # no label left


def test_a_refused_message_is_marked_refused(open_chat):
    from playwright.sync_api import expect
    alice = open_chat("alice")

    alice.evaluate("send('no-such-room', 'lost')")   # the page's own send(), to a room nobody made

    refused = alice.locator("#messages li.failed")
    expect(refused.locator("p")).to_have_text("lost")
    expect(refused.locator("small")).to_have_text(re.compile(r"^refused: \S"))


def test_a_page_backs_off_while_the_server_is_down(demo, open_chat):
    from playwright.sync_api import expect
    alice = open_chat("alice")
    # Each retry waits the whole of its window (no jitter), and every request is noted.
    alice.evaluate("""() => {
        Math.random = () => 0.999;
        window.sent = [];
        const fetch = window.fetch;
        window.fetch = (url, init) => {
            window.sent.push([String(url).split("?")[0], performance.now()]);
            return fetch(url, init);
        };
    }""")
    killed = alice.evaluate("performance.now()")
    demo.kill()
    expect(alice.locator("#status")).to_have_class("offline")
    say(alice, "queued")             # so the push worker retries too, not only the poll

    alice.wait_for_function("""killed => ["/poll", "/push"].every(path => window.sent.filter(
        ([url, at]) => url.endsWith(path) && at > killed).length >= 4)""", arg=killed,
                            timeout=40000)

    sent = alice.evaluate("window.sent")
    for path in ("/poll", "/push"):  # the first four tries of each loop once the server is gone
        times = [at for url, at in sent if url.endswith(path) and at > killed][:4]
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert gaps == sorted(gaps) and gaps[-1] > 1.5 * gaps[0], (path, gaps)


def test_three_people_two_rooms(open_chat, tmp_path):
    from playwright.sync_api import expect
    alice, bob, carol = open_chat("alice"), open_chat("bob"), open_chat("carol")
    say_accepted(alice, "Morning! Has anyone tried the new build?")
    say_accepted(bob, "Yes. It reconnects nicely after a server restart.")
    say_accepted(carol, "Same here. I will write the release notes today.")

    bob.fill("#roomname", "release")
    bob.press("#roomname", "Enter")
    expect(bob.locator("#title")).to_have_text("# release")
    expect(alice.locator("#rooms a")).to_have_text(["# general", "# release"])   # live
    expect_members(alice, ["alice", "carol"])
    say_accepted(bob, "Draft: faster reconnects, rooms, presence.")
    carol.click("text=# release")
    expect_messages(carol, ["Draft: faster reconnects, rooms, presence."])        # history
    expect_members(bob, ["bob", "carol"])
    bob.click("text=# general")
    carol.click("text=# general")
    expect_members(alice, ["alice", "bob", "carol"])
    say_accepted(alice, "Great, thanks both. Let's ship it after lunch.")
    expect_messages(alice, ["Morning! Has anyone tried the new build?",
                            "Yes. It reconnects nicely after a server restart.",
                            "Same here. I will write the release notes today.",
                            "Great, thanks both. Let's ship it after lunch."])

    # docs/demo.png is refreshed on request only: COMET_SCREENSHOT=1 python -m pytest test_demo_browser.py
    target = ROOT / "docs" / "demo.png" if os.environ.get("COMET_SCREENSHOT") else tmp_path / "demo.png"
    target.parent.mkdir(exist_ok=True)
    alice.screenshot(path=str(target))
    assert target.stat().st_size > 10_000


def test_a_topic_set_in_a_room_reaches_everyone_in_it_and_stays(open_chat):
    from playwright.sync_api import expect
    alice, bob = open_chat("alice"), open_chat("bob")

    alice.fill("#topic", "Release on Friday")
    alice.press("#topic", "Enter")

    expect(bob.locator("#topic")).to_have_value("Release on Friday")
    expect(open_chat("carol").locator("#topic")).to_have_value("Release on Friday")


def test_the_author_deletes_a_message_from_every_page(open_chat):
    alice, bob = open_chat("alice"), open_chat("bob")
    say_accepted(alice, "oops, wrong room")
    say_accepted(alice, "hello")
    expect_messages(bob, ["oops, wrong room", "hello"])
    assert bob.locator("#messages .delete").count() == 0        # none of them is bob's

    alice.locator("#messages li", has_text="oops").locator(".delete").click()

    expect_messages(bob, ["hello"])
    expect_messages(alice, ["hello"])
    expect_messages(open_chat("carol"), ["hello"])             # gone from the history too


def test_three_gunicorn_workers_on_one_sqlite_file_serve_a_new_room(gunicorn_demo, open_page):
    from playwright.sync_api import expect
    alice = open_page(gunicorn_demo.url, "alice")
    bob = open_page(gunicorn_demo.url, "bob")

    alice.fill("#roomname", "release")
    alice.press("#roomname", "Enter")
    expect(alice.locator("#title")).to_have_text("# release")
    expect(bob.locator("#rooms a")).to_have_text(["# general", "# release"])
    bob.click("text=# release")
    expect_members(alice, ["alice", "bob"])
    for turn in range(3):
        say_accepted(alice, f"alice {turn}")
        say_accepted(bob, f"bob {turn}")

    said = [f"{who} {turn}" for turn in range(3) for who in ("alice", "bob")]
    expect_messages(alice, said)
    expect_messages(bob, said)
    # And as bob, each on a new connection, marked in the access log with the worker that
    # took it, until two workers have taken some: one that did not create the room is
    # among them.  The kernel spreads the connections, so how many that takes varies.
    sent, probes = 0, set()
    while len(probes) < 2 and sent < 60:
        send_as(bob, gunicorn_demo.url, f"/comet/push?probe={sent}",
                {"type": "message", "listeners": ["room:release"], "text": f"probe {sent}"})
        sent += 1
        probes = {pid for pid, _ in gunicorn_demo.answers("POST /comet/push?probe=")}
    expect_messages(alice, said + [f"probe {n}" for n in range(sent)])

    pushes = gunicorn_demo.answers("POST /comet/push")
    assert {status for _, status in pushes} == {"200"}, pushes      # nothing refused anywhere
    probes = {pid for pid, _ in gunicorn_demo.answers("POST /comet/push?probe=")}
    assert len(probes) >= 2, (sent, probes)
    assert len({pid for pid, _ in gunicorn_demo.answers("GET /comet/poll")}) >= 2


def send_as(page, url, path, package):
    """POST ``package`` to ``path`` with the cookies of ``page``'s browser, on a new connection."""
    cookies = "; ".join(f"{c['name']}={c['value']}" for c in page.context.cookies(url))
    request = urllib.request.Request(url.rstrip("/") + path, json.dumps(package).encode(), {
        "Content-Type": "application/json", "Cookie": cookies})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


# ---- the demo's rules, over HTTP ----------------------------------------------

@pytest.fixture
def chat(tmp_path):
    chat = demo_module.make_chat(str(tmp_path / "chat.db"), poll_timeout=0.1)
    yield chat
    chat.close()


def person(chat):
    """A browser of one person (its own comet_sid cookie), in #general."""
    web = webtest.TestApp(chat)
    web.post_json("/comet/push", {"type": "join", "listeners": ["lobby", "room:general"]})
    return web


def test_only_its_author_may_delete_a_message(chat):
    alice, bob = person(chat), person(chat)
    said = alice.post_json("/comet/push", {"type": "message", "listeners": ["room:general"],
                                           "text": "mine"}).json["accepted"][0]
    delete = {"type": "delete", "listeners": ["room:general"], "stamp": said}

    refused = bob.post_json("/comet/push", delete, status=403).json

    assert (refused["error"], refused["message"]) == ("rejected", "Only its author may delete a message.")
    assert [m["text"] for m in bob.get("/state?room=general").json["messages"]] == ["mine"]
    alice.post_json("/comet/push", delete)
    assert bob.get("/state?room=general").json["messages"] == []


def test_a_room_that_was_never_created_cannot_be_joined(chat):
    alice = person(chat)

    refused = alice.post_json("/comet/push", {"type": "join", "listeners": ["room:nowhere"]},
                              status=403).json

    assert (refused["error"], refused["message"]) == ("rejected", "There is no room #nowhere.")


def test_a_room_created_in_the_lobby_can_be_joined_and_has_its_topic(chat):
    alice = person(chat)
    alice.post_json("/comet/push", {"type": "create", "listeners": ["lobby"], "name": "release"})
    alice.post_json("/comet/push", {"type": "join", "listeners": ["room:release"]})

    alice.post_json("/comet/push", {"type": "update", "listeners": ["room:release"], "topic": " Friday "})

    state = alice.get("/state?room=release").json
    assert state["rooms"] == ["general", "release"] and state["topic"] == "Friday"
    assert [member["id"] for member in state["members"]] == [state["you"]]
