"""comet.py in a Bottle app: a chat page, and Bottle's own routes as before.

From the repository root (PYTHONPATH=. finds comet.py there)::

    pip install bottle
    PYTHONPATH=. python examples/bottle_app.py --port 8080

then open http://127.0.0.1:8080/ in two browsers.
"""
import argparse
import os
import socketserver
from wsgiref.simple_server import WSGIServer

import bottle

from comet import Comet

app = bottle.Bottle()


@app.get("/")
def chat():
    return PAGE                 # below: the page loads /scripts/comet.js


@app.get("/hello")
def hello():
    return {"hello": "from Bottle"}


app = Comet(app, store=os.environ.get("COMET_STORE", "sqlite:///chat.db"))
app.channel("chat")

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>Chat on Bottle</title>
<ul id="messages"></ul>
<form id="say"><input name="text" autocomplete="off" autofocus> <button>Send</button></form>
<script src="/scripts/comet.js"></script>
<script>
  comet.ping.message = function (pkg) {
    var item = document.createElement("li");
    item.textContent = pkg.sender + ": " + pkg.text;
    document.getElementById("messages").append(item);
  };
  comet.start();
  comet.push({type: "join", listeners: ["chat"]});
  document.getElementById("say").onsubmit = function (event) {
    event.preventDefault();
    comet.push({type: "message", listeners: ["chat"], text: this.text.value});
    this.reset();
  };
</script>
"""


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    """Bottle's default server answers one request at a time: a parked poll would block it."""
    daemon_threads = True


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A chat on Bottle and comet.py.")
    parser.add_argument("--port", type=int, default=8080)
    bottle.run(app, host="127.0.0.1", port=parser.parse_args().port, server_class=ThreadingWSGIServer)
