"""comet.py in a Flask app: a chat page, and Flask's own routes as before.

From the repository root (PYTHONPATH=. finds comet.py there)::

    pip install flask
    PYTHONPATH=. python examples/flask_app.py --port 5000

then open http://127.0.0.1:5000/ in two browsers.
"""
import argparse
import os

from flask import Flask

from comet import Comet

app = Flask(__name__)


@app.get("/")
def chat():
    return PAGE                 # below: the page loads /scripts/comet.js


@app.get("/hello")
def hello():
    return {"hello": "from Flask"}


app.wsgi_app = Comet(app.wsgi_app, store=os.environ.get("COMET_STORE", "sqlite:///chat.db"))
app.wsgi_app.channel("chat")

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>Chat on Flask</title>
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

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A chat on Flask and comet.py.")
    parser.add_argument("--port", type=int, default=5000)
    app.run(port=parser.parse_args().port)     # threaded: each parked poll holds a thread
