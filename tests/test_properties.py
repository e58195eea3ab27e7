"""Properties of the WSGI app under arbitrary input (Hypothesis), on memory and SQLite.

Whatever a client sends -- push bodies of any JSON (lone surrogates, deep
nesting, huge numbers, odd listeners, batches) or no JSON at all, any
``Content-Length``, ``Content-Type``, ``Origin`` and ``Cookie``, any cursor --
no answer is 500, none is 503 (the store is up), every answer is a JSON error
or a success, and a valid push sent after any sequence of them is delivered to
its recipient.  Bounded: a fixed number of examples, no example database.
"""

import io
import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import comet

BOB_SID = "b" * 24                          # bob's cookie: his id is its hash
ALICE_SID = "a" * 24

SETTINGS = settings(max_examples=120, deadline=5000, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(params=["memory", "sqlite"])
def app(request, tmp_path):
    url = "memory:" if request.param == "memory" else f"sqlite:///{tmp_path}/comet.db"
    app = comet.Comet(None, store=url, poll_timeout=0.02, rate=(1e6, 1e6),
                      address_rate=(1e6, 1e6))

    @app.listener("to")                     # passes on whatever strings the package names
    def to(environ, package, db):
        names = package.get("to")
        return [name for name in names if isinstance(name, str)] if isinstance(names, list) else []
    app.channel("room")
    app.action("emit").on_emit(lambda package, recipient, private, db: dict(package, seen=recipient))
    app.action("skip").on_emit(lambda package, recipient, private, db: package)
    yield app
    app.close()


def call(app, method="POST", path="/comet/push", body=b"", query="", headers=None):
    """One direct WSGI call: ``(status, parsed body or None)``.  ``headers`` maps
    environ keys to values, None leaving the key out."""
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
               "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body)),
               "wsgi.input": io.BytesIO(body), "wsgi.url_scheme": "http",
               "SERVER_NAME": "x", "SERVER_PORT": "80", "REMOTE_ADDR": "127.0.0.1",
               "HTTP_COOKIE": f"comet_sid={ALICE_SID}"}
    environ.update(headers or {})
    environ = {key: value for key, value in environ.items() if value is not None}
    answered = []
    data = b"".join(app(environ, lambda status, headers: answered.append(status)))
    status = int(answered[0].split()[0])
    return status, json.loads(data) if data else None


# -- what a client may send

surrogates = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1,
                     max_size=2)
texts = st.one_of(st.text(max_size=20), surrogates,
                  st.tuples(st.text(max_size=5), surrogates).map("".join))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 30, 10 ** 30),
                    st.floats(allow_nan=False, allow_infinity=False), texts)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)), max_leaves=12)
listeners = st.one_of(
    st.lists(st.one_of(st.sampled_from(["to", "room", "ghost"]), texts), max_size=4),
    texts, st.text(max_size=300), st.integers(-10 ** 300, 10 ** 300), st.booleans(), st.none(),
    values)
packages = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(["x", "emit", "skip", "join", "leave", "message"]),
                       st.text(max_size=70), values),
     "listeners": listeners},
    optional={"to": st.lists(st.one_of(st.just("bob"), st.text(max_size=300), surrogates),
                             max_size=3),
              "_stamp": st.one_of(st.text(string.ascii_letters, min_size=8, max_size=9), texts),
              "private": values, "sender": values, "text": values})
extra = st.dictionaries(texts, values, max_size=3)
package_values = st.one_of(st.builds(lambda p, e: {**e, **p}, packages, extra),
                           st.lists(packages, max_size=5), values)


def nested(depth):
    return "[" * depth + "1" + "]" * depth


bodies = st.one_of(
    st.builds(lambda value, ascii: json.dumps(value, ensure_ascii=ascii)
              .encode("utf-8", "surrogatepass"), package_values, st.booleans()),
    st.integers(80, 1200).map(lambda depth: ('{"type":"emit","listeners":"bob","d":%s}'
                                             % nested(depth)).encode()),
    st.integers(1, 6000).map(lambda digits: ('{"type":"x","listeners":%s}'
                                             % ("7" * digits)).encode()),
    st.integers(1, 6000).map(lambda digits: ('{"type":"x","listeners":"bob","n":1%s}'
                                             % ("0" * digits)).encode()),
    st.binary(max_size=60))
latin1 = st.text(st.characters(max_codepoint=255), max_size=30)
header_values = {
    "CONTENT_LENGTH": st.one_of(st.none(), st.just("same"), latin1,
                                st.integers(-3, 70000).map(str), st.just("9" * 5000)),
    "CONTENT_TYPE": st.one_of(st.sampled_from(["application/json", "text/plain", "",
                                               "application/json; charset=utf-8",
                                               "APPLICATION/JSON"]), latin1),
    "HTTP_ORIGIN": st.one_of(st.none(), st.just("http://x:80"), st.just("http://[::1"), latin1),
    "HTTP_COOKIE": st.one_of(st.none(), latin1, st.just(f"comet_sid={ALICE_SID}"),
                             st.text(string.ascii_letters, max_size=70).map("comet_sid={}".format)),
    "wsgi.input_terminated": st.booleans(),
}
headers = st.fixed_dictionaries({}, optional=header_values)
cursors = st.one_of(st.none(), latin1, st.integers(-5, 10 ** 25).map(str),
                    st.sampled_from(["\u00b2", "1.2", "", "9" * 5000, "\x00"]))


@st.composite
def requests(draw, store_id):
    """A request of any sort: a push of any body and headers, or a poll with any cursor."""
    if draw(st.booleans()):
        body = draw(bodies)
        fields = draw(headers)
        if fields.get("CONTENT_LENGTH") == "same":
            fields["CONTENT_LENGTH"] = str(len(body))
        return dict(method=draw(st.sampled_from(["POST", "POST", "GET", "PUT"])), body=body,
                    headers=fields)
    cursor = draw(cursors)
    if cursor is not None and draw(st.booleans()):
        cursor = f"{store_id}.{cursor}"
    query = "" if cursor is None else "cursor=" + cursor
    if draw(st.booleans()):
        query += "&" + query                # the parameter twice
    return dict(method="GET", path="/comet/poll", query=query, headers=draw(headers))


def test_no_input_makes_a_500_or_a_503_and_a_valid_push_after_it_is_delivered(app):
    bob = comet._public_id(BOB_SID)

    @SETTINGS
    @given(st.lists(requests(app.store.id), min_size=1, max_size=5))
    def property(sequence):
        status, answer = call(app, "GET", "/comet/poll", headers={"HTTP_COOKIE": f"comet_sid={BOB_SID}"})
        cursor = answer["cursor"]
        for request in sequence:
            status, answer = call(app, **request)
            assert status not in (500, 503), (request, status, answer)
            if request["method"] != "HEAD" and status >= 400:
                assert isinstance(answer["error"], str) and isinstance(answer["message"], str)
        status, answer = call(app, body=json.dumps({"type": "check", "listeners": bob}).encode())
        assert status == 200, answer
        [stamp] = answer["accepted"]
        status, answer = call(app, "GET", "/comet/poll", query="cursor=" + cursor,
                              headers={"HTTP_COOKIE": f"comet_sid={BOB_SID}"})
        assert status == 200 and answer["reset"] is False
        assert stamp in [package["_stamp"] for package in answer["packages"]]

    property()
