"""The framework recipes of examples/: Flask, Django and Bottle wrapped by comet.py.

Each example app runs, as its file is written, on a real threaded server on
127.0.0.1 with an SQLite store of its own.  Two people -- two cookie jars, as
two browsers would be -- exchange a package through it, and the framework's own
routes still answer.  In Flask and Django they are the application's own users,
logged in through its login view: comet's id is the user's primary key and the
sender their name, anonymous requests are refused, and a private room takes
only its members.  In Bottle they are two built-in ``comet_sid`` ids.  In Django the CSRF
middleware stays on: it guards Django's POST routes, while comet's push, a
separate WSGI path in front of Django, has its own checks.  Last, two headless
Chromium pages chat through each example's own page.

The Django example also runs on PostgreSQL, its own tables and comet's in one
database, served by ``manage.py runserver`` in a process of its own.

Without a framework (or Chromium, or PostgreSQL) the tests skip loudly, and
fail under CI=true.
"""
import concurrent.futures
import contextlib
import http.cookiejar
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from support import ThreadedServer, chromium, free_port, need, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository
EXAMPLES = os.path.join(ROOT, "examples")
FRAMEWORKS = ["flask", "django", "bottle"]


# --------------------------------------------------------------------------
# The example apps, each on its own real server
# --------------------------------------------------------------------------

class Site:
    """One example app being served: its URL, and its ``Comet`` for stats."""

    def __init__(self, framework, url, comet):
        self.framework = framework
        self.url = url
        self.comet = comet


PRIVATE = {"flask": "team:staff", "django": "group:staff"}    # alice may join it, bob may not
NAMES = {"alice": "Alice Liddell", "bob": "Bob Builder"}        # each password is the login


@contextlib.contextmanager
def environment(**variables):
    """These environment variables while an example module is imported."""
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


_loaded = {}                                # framework -> (wsgi_app, comet): imported once


def load_example(framework, tmp_path_factory):
    """``(wsgi_app, comet)`` of an example, imported as its file is written."""
    if framework not in _loaded:
        directory = tmp_path_factory.mktemp(framework)
        with environment(COMET_STORE=f"sqlite:///{directory}/chat.db", CHAT_DB=f"{directory}/chat.db",
                         DJANGO_DB=f"{directory}/django.db"):
            _loaded[framework] = _import_example(framework)
    return _loaded[framework]


def _import_example(framework):
    need(importlib.util.find_spec(framework) is not None,
         f"{framework} is not installed (pip install '.[test]')")
    if framework == "flask":
        sys.path.insert(0, EXAMPLES)
        module = importlib.import_module("flask_app")
        return module.app, module.app.wsgi_app
    if framework == "bottle":
        sys.path.insert(0, EXAMPLES)
        module = importlib.import_module("bottle_app")
        return module.app, module.app
    sys.path.insert(0, os.path.join(EXAMPLES, "django_project"))
    module = importlib.import_module("mysite.wsgi")
    in_a_thread(add_django_users)
    return module.application, module.application


def in_a_thread(fn, *args):
    """``fn(*args)`` in a thread of its own: Django's ORM refuses to run in one with an
    event loop, and Playwright's sync API keeps one in the main thread."""
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        return thread.submit(fn, *args).result()


def add_django_users():
    """What an admin would do: Django's tables, alice in the group staff, and bob."""
    from django.contrib.auth.models import Group, User
    from django.core.management import call_command
    call_command("migrate", verbosity=0)
    staff = Group.objects.create(name="staff")
    for login, name in NAMES.items():
        first, last = name.split()
        user = User.objects.create_user(login, password=login, first_name=first, last_name=last)
        if login == "alice":
            user.groups.add(staff)


@pytest.fixture(scope="module", autouse=True)
def close_examples():
    yield
    for _, middleware in _loaded.values():
        middleware.close()


@pytest.fixture(scope="module", params=FRAMEWORKS)
def site(request, tmp_path_factory):
    app, comet = load_example(request.param, tmp_path_factory)
    with ThreadedServer(app) as server:
        yield Site(request.param, server.url, comet)


class Person:
    """One browser's HTTP: its own cookie jar, a new connection per request."""

    def __init__(self, url):
        self.url = url
        self.cookies = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))
        self.cursor = None

    def request(self, method, path, body=None, headers=(), timeout=10):
        """``(status, headers, body bytes)``, error statuses included."""
        request = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers=dict(headers))
        try:
            with self.opener.open(request, timeout=timeout) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, error.headers, error.read()

    def cookie(self, name):
        return next((c.value for c in self.cookies if c.name == name), None)

    def log_in(self, framework, login):
        """Log in through the example's own login view: its form, then the form's POST."""
        status, _, form = self.request("GET", "/login")
        assert status == 200
        fields = {"login": login, "password": login}
        if framework == "django":
            token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.decode())[1]
            fields = {"username": login, "password": login, "csrfmiddlewaretoken": token}
        status, _, page = self.request("POST", "/login", urllib.parse.urlencode(fields).encode(),
                                       {"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 200 and b"comet.start();" in page      # redirected to the chat
        return self

    def push(self, package, headers=(), content_type="application/json"):
        """Push as the page does: JSON, with the page's own Origin."""
        headers = {"Content-Type": content_type, "Origin": self.url, **dict(headers)}
        status, _, body = self.request("POST", "/comet/push", json.dumps(package).encode(), headers)
        return status, json.loads(body)

    def poll(self, timeout=30):
        query = "" if self.cursor is None else "?cursor=" + urllib.parse.quote(self.cursor)
        status, _, body = self.request("GET", "/comet/poll" + query, timeout=timeout)
        assert status == 200, (status, body)
        answer = json.loads(body)
        self.cursor = answer["cursor"]
        return answer

    def poll_until(self, done, timeout=10):
        """Poll with the latest cursor until ``done(packages so far)``; returns them."""
        packages = []
        deadline = time.monotonic() + timeout
        while not done(packages):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out with {packages}"
            packages += self.poll(timeout=remaining)["packages"]
        return packages


def of_type(kind, packages):
    return [package for package in packages if package["type"] == kind]


def two_people(site):
    """alice and bob, each in a browser of their own: logged in where the example has
    users (Flask, Django), else two built-in ``comet_sid`` ids (Bottle)."""
    people = Person(site.url), Person(site.url)
    if site.framework in PRIVATE:
        for person, login in zip(people, NAMES):
            person.log_in(site.framework, login)
    return people


# --------------------------------------------------------------------------
# Every framework
# --------------------------------------------------------------------------

def example_sources():
    """The text of every Python file of the examples."""
    sources = []
    for directory, _, names in os.walk(EXAMPLES):
        for name in names:
            if name.endswith(".py"):
                with open(os.path.join(directory, name)) as file:
                    sources.append(file.read())
    return sources


@pytest.mark.parametrize("page", ["examples/README.md", "docs/users.md"])
def test_the_recipes_in_the_docs_are_the_code_of_the_examples(page):
    with open(os.path.join(ROOT, page)) as file:
        blocks = re.findall(r"```(?:python|html)\n(.*?)\n```", file.read(), re.S)
    sources = example_sources()
    assert len(blocks) >= 3
    for block in blocks:
        assert any(block in source for source in sources), f"not in any example:\n{block}"


def test_the_top_readme_recipes_are_lines_of_the_examples():
    with open(os.path.join(ROOT, "README.md")) as file:
        section = file.read().split("## Wrap your app", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)\n```", section, re.S)
    sources = example_sources()
    lines = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(lines) >= 5
    for line in lines:
        assert any(line in source for source in sources), f"not in any example: {line}"


def test_the_page_loads_the_client_and_the_script_is_served(site):
    person = two_people(site)[0]
    status, headers, page = person.request("GET", "/")
    assert status == 200 and headers.get_content_type() == "text/html"
    for used in (b'<script src="/scripts/comet.js"></script>', b"comet.start();", b"comet.push("):
        assert used in page
    status, headers, script = person.request("GET", "/scripts/comet.js")
    assert status == 200 and headers.get_content_type() == "application/javascript"
    with open(os.path.join(ROOT, "comet_client.js"), "rb") as file:
        assert script == file.read()


def test_two_people_exchange_a_package_through_the_framework(site):
    alice, bob = two_people(site)
    alice.poll(), bob.poll()                                 # each gets the head (and its cookie)
    assert alice.push({"type": "join", "listeners": ["chat"]})[0] == 200
    assert bob.push({"type": "join", "listeners": ["chat"]})[0] == 200
    alice_join, bob_join = of_type("join", alice.poll_until(lambda got: len(got) == 2))
    assert of_type("join", bob.poll_until(lambda got: got)) == [bob_join]
    parked = site.comet.stats()["parked"]
    received = []
    waiting = threading.Thread(target=lambda: received.extend(bob.poll_until(lambda got: got)))
    waiting.start()
    wait_until(lambda: site.comet.stats()["parked"] > parked)   # bob's poll is held
    status, answer = alice.push({"type": "message", "listeners": ["chat"], "text": "hi bob"})
    waiting.join(10)
    assert status == 200 and not waiting.is_alive()
    [message] = received
    assert message["text"] == "hi bob" and message["_stamp"] == answer["accepted"][0]
    assert message["sender"] == alice_join["sender"] != bob_join["sender"]
    assert alice.poll_until(lambda got: got) == [message]  # the sender is a member too


def test_the_frameworks_own_routes_still_answer(site):
    person = Person(site.url)
    status, _, body = person.request("GET", "/hello")
    assert status == 200
    assert json.loads(body)["hello"] == f"from {site.framework.title()}"
    status, _, body = person.request("GET", "/no-such-page")
    assert status == 404 and b'"not_found"' not in body      # the framework's 404, not comet's
    assert person.cookie("comet_sid") is None                # comet stayed out of the way


# --------------------------------------------------------------------------
# The application's own users: Flask and Django
# --------------------------------------------------------------------------

@pytest.fixture(scope="module", params=list(PRIVATE))
def users_site(request, tmp_path_factory):
    app, comet = load_example(request.param, tmp_path_factory)
    with ThreadedServer(app) as server:
        yield Site(request.param, server.url, comet)


def test_a_logged_in_users_push_carries_the_name_the_application_chose(users_site):
    alice, bob = two_people(users_site)
    for person in (alice, bob):
        person.poll()
        assert person.push({"type": "join", "listeners": ["chat"]})[0] == 200

    status, _ = alice.push({"type": "message", "listeners": ["chat"], "text": "hi"})

    assert status == 200
    [message] = of_type("message", bob.poll_until(lambda got: of_type("message", got)))
    assert message["sender"] == "Alice Liddell"


@pytest.mark.parametrize("method, path", [("GET", "/comet/poll"), ("POST", "/comet/push")])
def test_an_anonymous_request_to_the_comet_endpoints_is_403(users_site, method, path):
    body = json.dumps({"type": "join", "listeners": ["chat"]}).encode() if method == "POST" else None

    status, _, answer = Person(users_site.url).request(
        method, path, body, {"Content-Type": "application/json"})

    assert (status, json.loads(answer)["error"]) == (403, "forbidden")


def test_a_user_may_not_join_a_private_room_they_do_not_belong_to(users_site):
    room = PRIVATE[users_site.framework]
    alice, bob = two_people(users_site)
    bob.poll()
    for person in (alice, bob):
        assert person.push({"type": "join", "listeners": ["chat"]})[0] == 200

    status, answer = bob.push({"type": "join", "listeners": [room]})

    assert (status, answer["error"], answer["message"]) == (403, "rejected", f"you may not join {room}")
    assert alice.push({"type": "join", "listeners": [room]})[0] == 200        # a member may
    for listener in (room, "chat"):
        assert alice.push({"type": "message", "listeners": [listener], "text": listener})[0] == 200
    got = bob.poll_until(lambda got: any(p.get("text") == "chat" for p in got))   # the last one
    assert [p for p in got if room in p["listeners"]] == []                   # nothing of the room
    assert "Bob Builder" not in users_site.comet.store.members(room).values()


# --------------------------------------------------------------------------
# Django's CSRF middleware next to comet's push
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def django_site(tmp_path_factory):
    app, comet = load_example("django", tmp_path_factory)
    with ThreadedServer(app) as server:
        yield Site("django", server.url, comet)


def test_a_django_post_still_needs_the_csrf_token_while_comet_push_works(django_site):
    person = Person(django_site.url).log_in("django", "bob")
    status, _, body = person.request("POST", "/hello", b"{}", {"Content-Type": "application/json"})
    assert status == 403 and b"CSRF" in body                  # Django's CsrfViewMiddleware
    assert person.request("GET", "/hello")[0] == 200          # sets Django's csrftoken cookie
    token = person.cookie("csrftoken")
    status, _, body = person.request("POST", "/hello", b"{}", {
        "Content-Type": "application/json", "X-CSRFToken": token})
    assert status == 200 and json.loads(body)["method"] == "POST"
    status, answer = person.push({"type": "join", "listeners": ["chat"]})   # no CSRF token
    assert status == 200 and len(answer["accepted"]) == 1


def test_comets_push_has_its_own_guards_in_front_of_django(django_site):
    person = Person(django_site.url).log_in("django", "bob")
    package = {"type": "join", "listeners": ["chat"]}
    status, answer = person.push(package, headers={"Origin": "http://evil.example"})
    assert (status, answer["error"]) == (403, "bad_origin")
    status, answer = person.push(package, content_type="application/x-www-form-urlencoded")
    assert (status, answer["error"]) == (415, "content_type")   # what a cross-site form sends


# --------------------------------------------------------------------------
# Django on PostgreSQL: Django's tables and comet's in one database
# --------------------------------------------------------------------------

DJANGO_USERS = """
from django.contrib.auth.models import User
for login in ("alice", "bob"):
    User.objects.create_user(login, password=login)
"""


def test_the_django_example_runs_on_postgresql_with_its_tables_beside_comets(postgres):
    need(importlib.util.find_spec("django") is not None, "django is not installed")
    url = postgres.create_database()
    project = os.path.join(EXAMPLES, "django_project")
    env = dict(os.environ, COMET_STORE=url, PYTHONPATH=ROOT)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    for command in (["migrate", "-v", "0"], ["shell", "-c", DJANGO_USERS]):
        subprocess.run([sys.executable, "manage.py", *command], cwd=project, env=env,
                       check=True, timeout=120)
    port = free_port()
    server = subprocess.Popen([sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}",
                               "--noreload"], cwd=project, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        alice, bob = Person(f"http://127.0.0.1:{port}"), Person(f"http://127.0.0.1:{port}")
        wait_until(lambda: answers(alice), timeout=30)
        alice.log_in("django", "alice"), bob.log_in("django", "bob")    # users of PostgreSQL
        bob.poll()
        assert alice.push({"type": "join", "listeners": ["chat"]})[0] == 200
        assert bob.push({"type": "join", "listeners": ["chat"]})[0] == 200
        status, answer = alice.push({"type": "message", "listeners": ["chat"], "text": "hi"})
        assert status == 200
        messages = of_type("message", bob.poll_until(lambda got: of_type("message", got)))
    finally:
        server.terminate()
        server.wait(10)

    assert [m["_stamp"] for m in messages] == answer["accepted"]
    assert {"auth_user", "django_session", "comet_packages", "comet_members"} <= postgres.tables(url)


def answers(person):
    try:
        return person.request("GET", "/hello", timeout=2)[0] == 200
    except OSError:
        return False


# --------------------------------------------------------------------------
# Two browsers on each example's own page
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


def test_two_browsers_chat_on_the_example_page(site, browser):
    contexts = [browser.new_context() for _ in range(2)]    # two cookie jars: two people
    try:
        alice, bob = (context.new_page() for context in contexts)
        parked = site.comet.stats()["parked"]
        for page, login in zip((alice, bob), NAMES):
            page.goto(site.url + "/")
            if site.framework in PRIVATE:                   # the chat sent us to its login view
                page.fill("input[name=login], input[name=username]", login)
                page.fill("input[name=password]", login)
                page.press("input[name=password]", "Enter")
                page.wait_for_url(site.url + "/")

        def joined_and_polling():
            ids = [in_a_thread(site.comet.client_id, {"HTTP_COOKIE": "; ".join(
                f"{c['name']}={c['value']}" for c in context.cookies())}) for context in contexts]
            return (site.comet.stats()["parked"] >= parked + 2
                    and None not in ids and set(ids) <= set(site.comet.store.members("chat")))
        wait_until(joined_and_polling)
        alice.fill("input[name=text]", "hello from the page")
        alice.press("input[name=text]", "Enter")
        for page in (bob, alice):
            page.wait_for_function("() => document.querySelector('#messages').textContent"
                                   ".includes('hello from the page')", timeout=10000)
    finally:
        for context in contexts:
            context.close()
