"""Serve one benchmark application on one WSGI server, in this process (or its worker).

    python bench/serve.py --server wsgiref|cheroot|gevent|gthread --app floor|hello|socketio|comet
                          [--store URL [--no-notify]] --port N [--threads 1200]
                          [--profile FILE | --cpu FILE]

``gevent`` and ``gthread`` are gunicorn with one worker of that class; the
worker is a child of this process, and ``GET /_bench/stats`` names its pid.
``--profile FILE`` runs every request under cProfile on the thread's CPU
clock (profilers reused from a free list, merged into FILE at SIGTERM).
``--cpu FILE`` only times each request's call of the application on the
thread's CPU clock, by method, and writes ``{method: [requests, seconds]}``
to FILE at SIGTERM (``bench/cpu_split.py``).
"""

import argparse
import os
import signal
import socketserver
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.append(os.path.dirname(HERE))      # comet.py, unless run.py's PYTHONPATH names one

import apps  # noqa: E402
from load import raise_open_files  # noqa: E402


class CpuTimed:
    """The thread CPU each request's call of the application took, by method."""

    def __init__(self, app, path):
        self.app = app
        self.path = path
        self.totals = {}
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        started = time.thread_time()
        try:
            return self.app(environ, start_response)
        finally:
            took = time.thread_time() - started
            method = environ.get("REQUEST_METHOD", "")
            with self.lock:
                n, seconds = self.totals.get(method, (0, 0.0))
                self.totals[method] = (n + 1, seconds + took)

    def dump(self):
        import json
        with self.lock, open(self.path, "w") as out:
            json.dump(self.totals, out)


class Profiled:
    """Each request under a cProfile.Profile of its own, taken from a free list."""

    def __init__(self, app, path):
        self.app = app
        self.path = path
        self.profiles = []
        self.free = []
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        import cProfile
        with self.lock:
            profile = self.free.pop() if self.free else None
            if profile is None:
                profile = cProfile.Profile(time.thread_time)     # CPU, not time parked
                self.profiles.append(profile)
        profile.enable()
        try:
            return self.app(environ, start_response)
        finally:
            profile.disable()
            with self.lock:
                self.free.append(profile)

    def dump(self):
        import pstats
        with self.lock:
            profiles = list(self.profiles)
        if not profiles:
            return
        stats = pstats.Stats(profiles[0])
        for profile in profiles[1:]:
            stats.add(profile)
        stats.dump_stats(self.path)


def build(args, async_mode):
    app = apps.make(args.app, args.store, async_mode, args.tail_interval, notify=not args.no_notify)
    if args.profile or args.cpu:
        app = Profiled(app, args.profile) if args.profile else CpuTimed(app, args.cpu)
        signal.signal(signal.SIGTERM, lambda *a: (app.dump(), os._exit(0)))
    return app


def wsgiref_server(port, app):
    """The stdlib's wsgiref with a thread per request, on 127.0.0.1, logging nothing."""
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        daemon_threads = True
        request_queue_size = 4096

    class Quiet(WSGIRequestHandler):
        def log_message(self, *a):
            pass

    return make_server("127.0.0.1", port, app, server_class=Server, handler_class=Quiet)


def serve_wsgiref(args):
    wsgiref_server(args.port, build(args, "threading")).serve_forever(poll_interval=0.5)


def serve_cheroot(args):
    from cheroot import wsgi
    server = wsgi.Server(("127.0.0.1", args.port), build(args, "threading"),
                         numthreads=args.threads, max=args.threads,
                         request_queue_size=4096, timeout=60)
    server.start()


def serve_gunicorn(args, worker_class):
    from gunicorn.app.base import BaseApplication

    class Gunicorn(BaseApplication):
        def load_config(self):
            options = dict(bind=f"127.0.0.1:{args.port}", workers=1, worker_class=worker_class,
                           worker_connections=50000, threads=args.threads, backlog=4096,
                           timeout=120, graceful_timeout=1, keepalive=75, loglevel="warning")
            for name, value in options.items():
                self.cfg.set(name, value)

        def load(self):
            raise_open_files()
            return build(args, "gevent" if worker_class == "gevent" else "threading")

    Gunicorn().run()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, choices=["wsgiref", "cheroot", "gevent", "gthread"])
    parser.add_argument("--app", required=True, choices=["hello", "floor", "socketio", "comet"])
    parser.add_argument("--store", default="memory:")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1200)
    parser.add_argument("--tail-interval", type=float, default=0.1)
    parser.add_argument("--no-notify", action="store_true",
                        help="a postgresql:// store without NOTIFY/LISTEN (tailing alone)")
    parser.add_argument("--profile")
    parser.add_argument("--cpu", help="write each method's requests and thread CPU here")
    args = parser.parse_args()
    raise_open_files()
    if args.server == "wsgiref":
        serve_wsgiref(args)
    elif args.server == "cheroot":
        serve_cheroot(args)
    else:
        serve_gunicorn(args, args.server)


if __name__ == "__main__":
    main()
