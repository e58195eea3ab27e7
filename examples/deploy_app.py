"""The application tests/test_deploy.py serves with gunicorn (and nginx in front).

From the repository root::

    COMET_STORE=sqlite:///comet.db gunicorn -k gthread -w 3 --threads 32 -b 127.0.0.1:8000 examples.deploy_app:application

The conventions of the standard test application (tests/support.py), so the tests'
``Client`` speaks to it:

- the client id is the ``X-Client`` header -- a stand-in for a real identity
  that lets one test be many clients; anyone can send any header, so a real
  application keeps the default cookie or asks its own session;
- listener ``to``: the recipients are the package's own ``to`` list;
- channel ``room``.

Besides: ``GET /stats`` answers this worker's pid and ``comet.stats()``, and
every answer carries the pid of the worker that served it in ``X-Worker``.
Environment: ``COMET_STORE`` (required), ``COMET_POLL_TIMEOUT`` (seconds, 25).
"""
import json
import os

from comet import Comet


def stats(environ, start_response):
    """Every path that is not comet's: this worker's counters."""
    if environ["PATH_INFO"] != "/stats":
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]
    body = json.dumps({"pid": os.getpid(), **comet.stats()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


comet = Comet(stats, store=os.environ["COMET_STORE"],
              id=lambda environ: environ.get("HTTP_X_CLIENT"),
              poll_timeout=float(os.environ.get("COMET_POLL_TIMEOUT", "25")),
              rate=(10000, 10000), address_rate=(10000, 10000),
              max_polls_per_address=100_000)        # the tests poll from one address


@comet.listener("to")
def to(environ, package, db):
    return package.get("to", [])


comet.channel("room")


def application(environ, start_response):
    """``comet``, with the pid of the worker in every answer."""
    def start(status, headers, exc_info=None):
        return start_response(status, headers + [("X-Worker", str(os.getpid()))], exc_info)
    return comet(environ, start)
