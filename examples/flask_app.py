"""comet.py in a Flask app: a chat for the app's own users, and Flask's own routes as before.

From the repository root (PYTHONPATH=. finds comet.py there)::

    pip install flask
    PYTHONPATH=. python examples/flask_app.py --port 5000

then open http://127.0.0.1:5000/ in two browsers and log in as alice and as bob
(each password is the login).  Alice may also join the private room team:staff.
"""
import argparse
import os
import sqlite3
from contextlib import closing

from flask import Flask, redirect, request, session
from werkzeug.security import check_password_hash, generate_password_hash

from comet import Comet, Reject

DATABASE = os.environ.get("CHAT_DB", "chat.db")    # the app's tables and comet's: one SQLite file
SCHEMA = """
CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, login TEXT UNIQUE NOT NULL,
    name TEXT NOT NULL, password TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS team_members (team TEXT NOT NULL, user_id INTEGER NOT NULL,
    PRIMARY KEY (team, user_id));
"""

app = Flask(__name__)
app.secret_key = os.environ.get("SECRET_KEY", "dev: set SECRET_KEY")    # signs the session cookie

with closing(sqlite3.connect(DATABASE)) as db, db:
    db.executescript(SCHEMA)
    for login, name in (("alice", "Alice Liddell"), ("bob", "Bob Builder")):
        db.execute("INSERT OR IGNORE INTO users (login, name, password) VALUES (?, ?, ?)",
                   (login, name, generate_password_hash(login)))
    db.execute("INSERT OR IGNORE INTO team_members SELECT 'staff', id FROM users WHERE login = 'alice'")


@app.route("/login", methods=["GET", "POST"])
def login():
    if request.method == "POST":
        with closing(sqlite3.connect(DATABASE)) as db:
            user = db.execute("SELECT id, password FROM users WHERE login = ?",
                              (request.form["login"],)).fetchone()
        if user and check_password_hash(user[1], request.form["password"]):
            session["user_id"] = user[0]
            return redirect("/")
    return LOGIN


@app.get("/")
def chat():
    if "user_id" not in session:
        return redirect("/login")
    return PAGE                 # below: the page loads /scripts/comet.js


@app.get("/hello")
def hello():
    return {"hello": "from Flask"}


def user_id(environ):
    """The id hook: the logged-in user's id, from Flask's signed session cookie; None is 403."""
    cookie_session = app.session_interface.open_session(app, app.request_class(environ))
    return cookie_session.get("user_id")


def user_name(environ, db):
    """The sender hook: the user's name, from the app's own table, through comet's db."""
    user = db.execute("SELECT name FROM users WHERE id = ?", (environ["comet.id"],)).fetchone()
    if user is None:
        raise Reject("no such user")
    return user[0]


def in_team(environ, db, channel):
    """Who may join team:NAME: the users the team_members table lists for NAME."""
    return db.execute("SELECT 1 FROM team_members WHERE team = ? AND user_id = ?",
                      (channel[len("team:"):], environ["comet.id"])).fetchone() is not None


app.wsgi_app = Comet(app.wsgi_app, store="sqlite:///" + DATABASE, id=user_id, sender=user_name)
app.wsgi_app.channel("chat")
app.wsgi_app.channels("team:", may_join=in_team)

LOGIN = """<!doctype html>
<meta charset="utf-8">
<title>Log in</title>
<form method="post"><input name="login" placeholder="login" autofocus>
<input name="password" type="password" placeholder="password"> <button>Log in</button></form>
"""

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>Chat on Flask</title>
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

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A chat on Flask and comet.py.")
    parser.add_argument("--port", type=int, default=5000)
    app.run(port=parser.parse_args().port)     # threaded: each parked poll holds a thread
