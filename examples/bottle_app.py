"""comet.py in a Bottle app: a chat page, and Bottle's own routes as before.

    pip install bottle
    python bottle_app.py         # with comet.py beside it or on PYTHONPATH

then open http://127.0.0.1:8080/ in two browsers.
"""
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
    item.textContent = pkg.text;
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
    bottle.run(app, host="127.0.0.1", port=8080, server_class=ThreadingWSGIServer)
