"""A multi-room chat on comet.py, with nothing to install.

    python demo.py [--port 8000] [--db chat.db]

then open http://127.0.0.1:8000 in two browsers. Every page is a member of the
channel `lobby`, where new rooms are announced (`create`), and of the room it
shows: `room:NAME`, a channel of the namespace `room:`, so every process knows
every room without registering it, and the member list is the presence list.
A room's topic is set with `update`, and a message is taken back with
`delete` (by its author only). Rooms and messages are kept in two tables of
the demo's own, in the same SQLite file as comet's store: each action writes
its row through the `db` it is handed, so the row commits together with the
package, or neither does. Several processes share the file, e.g.

    gunicorn -k gthread --workers 3 --threads 20 'demo:make_chat("chat.db")'
"""
import argparse
import contextlib
import json
import logging
import re
import socketserver
import sqlite3
import sys
import urllib.parse
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from comet import Comet, Reject

log = logging.getLogger("demo")
ROOM_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
SCHEMA = """
CREATE TABLE IF NOT EXISTS rooms (name TEXT PRIMARY KEY, topic TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, room TEXT NOT NULL,
    stamp TEXT NOT NULL UNIQUE, ts INTEGER NOT NULL, author TEXT NOT NULL, sender TEXT NOT NULL,
    text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS messages_by_room ON messages (room, id);
INSERT OR IGNORE INTO rooms (name) VALUES ('general');
"""


def cookie(environ, name):
    """The value of one cookie of the request, or ''."""
    for part in environ.get("HTTP_COOKIE", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return urllib.parse.unquote(value)
    return ""


def sender(environ, db):
    """Who sent a package: the nick the page keeps in a cookie, and the client's tag."""
    nick = "".join(c for c in cookie(environ, "nick") if c.isprintable()).strip()[:24]
    return {"nick": nick or "anonymous", "id": environ["comet.id"]}


def room_of(package):
    """The room a message, topic or deletion goes to: its one listener, `room:NAME`."""
    listeners = package["listeners"]
    if not (isinstance(listeners, list) and len(listeners) == 1
            and listeners[0].startswith("room:")):
        raise Reject("This goes to one room.")
    return listeners[0][len("room:"):]


def answer(start_response, body, content_type, status="200 OK"):
    """Start a response with a whole body (a str)."""
    body = body.encode()
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store")])
    return [body]


def make_chat(path, **options):
    """The chat as one WSGI application: the page and /state, wrapped in Comet."""
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript(SCHEMA)

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/":
            return answer(start_response, PAGE, "text/html; charset=utf-8")
        if environ["PATH_INFO"] == "/state":
            room = urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).get("room", [""])[0]
            body = json.dumps(state(room, chat.client_id(environ)))
            return answer(start_response, body, "application/json")
        return answer(start_response, "Not found", "text/plain", "404 Not Found")

    def state(room, client_id):
        """What a page needs on entering a room: rooms, its topic, who is here, recent messages."""
        with contextlib.closing(sqlite3.connect(path)) as db:
            topics = dict(db.execute("SELECT name, topic FROM rooms ORDER BY name"))
            rows = db.execute("SELECT stamp, ts, sender, text FROM messages WHERE room = ?"
                              " ORDER BY id DESC LIMIT 50", (room,)).fetchall()
        return {
            "you": client_id,
            "rooms": list(topics),
            "topic": topics.get(room, ""),
            "members": list(rooms["room:" + room].members().values()) if room in topics else [],
            "messages": [{"_stamp": stamp, "_ts": ts, "sender": json.loads(who), "text": text}
                         for stamp, ts, who, text in reversed(rows)],
        }

    def room_exists(environ, db, channel):
        """Who may join `room:NAME`: anyone, once NAME is in the `rooms` table."""
        name = channel[len("room:"):]
        if not db.execute("SELECT 1 FROM rooms WHERE name = ?", (name,)).fetchone():
            raise Reject(f"There is no room #{name}.")
        return True

    chat = Comet(app, store="sqlite:///" + path, sender=sender, **options)
    chat.channel("lobby")                                       # every page: hears of new rooms
    rooms = chat.channels("room:", may_join=room_exists)       # room:general, room:release, ...

    @chat.action("create").on_submit
    def create_room(package, private, db, environ):
        """A new room: a row in `rooms`, announced in the lobby."""
        name = package.get("name")
        if package["listeners"] != ["lobby"]:
            raise Reject("A room is created in the lobby.")
        if not isinstance(name, str) or not ROOM_NAME.fullmatch(name):
            raise Reject("A room name is 1 to 32 of a-z, 0-9, _ and -.")
        if db.execute("SELECT 1 FROM rooms WHERE name = ?", (name,)).fetchone():
            raise Reject(f"#{name} exists already.")
        db.execute("INSERT INTO rooms (name) VALUES (?)", (name,))
        log.info("room #%s created by %s", name, package["sender"]["nick"])

    @chat.action("update").on_submit
    def set_topic(package, private, db, environ):
        """A room's new topic, kept for /state."""
        topic = package.get("topic")
        if not isinstance(topic, str):
            raise Reject("A topic is text.")
        package["topic"] = topic = topic.strip()[:200]
        db.execute("UPDATE rooms SET topic = ? WHERE name = ?", (topic, room_of(package)))

    @chat.action("delete").on_submit
    def delete_message(package, private, db, environ):
        """A message taken back, by its author only."""
        deleted = db.execute("DELETE FROM messages WHERE room = ? AND stamp = ? AND author = ?",
                             (room_of(package), str(package.get("stamp")), package["sender"]["id"]))
        if deleted.rowcount != 1:
            raise Reject("Only its author may delete a message.")

    @chat.action("message").on_submit
    def store_message(package, private, db, environ):
        """Keep the message for /state: the row commits with the package, or neither does."""
        room, text = room_of(package), package.get("text")
        if not isinstance(text, str) or not text.strip():
            raise Reject("A message needs some text.")
        package["text"] = text = text.strip()[:2000]
        db.execute("INSERT INTO messages (room, stamp, ts, author, sender, text)"
                   " VALUES (?, ?, ?, ?, ?, ?)",
                   (room, package["_stamp"], package["_ts"], package["sender"]["id"],
                    json.dumps(package["sender"]), text))

    return chat


class ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    """A thread per request: each parked poll holds one."""
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    """Requests go to the DEBUG log: long polls would fill the terminal."""

    def log_message(self, format, *args):
        log.debug(format, *args)


def main():
    parser = argparse.ArgumentParser(description="A multi-room chat on comet.py.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--db", default="chat.db", help="SQLite file for the chat and comet's store")
    parser.add_argument("--presence-timeout", type=float, default=60.0,
                        help="seconds without a poll before a member leaves a room")
    parser.add_argument("--poll-timeout", type=float, default=25.0,
                        help="seconds a poll is held; a closed tab is gone after this plus the above")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    application = make_chat(args.db, presence_timeout=args.presence_timeout,
                            poll_timeout=args.poll_timeout)
    try:
        server = make_server(args.host, args.port, application, ThreadingServer, QuietHandler)
    except OSError as error:    # most often another server on that port: one line, no traceback
        sys.exit(f"Cannot serve on {args.host}:{args.port}: {error.strerror}. "
                 f"Pick another port with --port, e.g. python demo.py --port {args.port + 1}")
    with server:
        print(f"Chat on http://{args.host}:{args.port}/ (Ctrl+C stops it)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()


PAGE = r"""<!doctype html>
<html lang="en">
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>comet chat</title>
<link rel="icon" href="data:,">
<style>
* { box-sizing: border-box; }
body { margin: 0; height: 100vh; height: 100dvh; display: grid; grid-template-columns: 250px 1fr;
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328; }
aside { display: flex; flex-direction: column; gap: 20px; padding: 16px; overflow-y: auto;
  background: #f6f7f9; border-right: 1px solid #e3e5e8; }
header { display: flex; align-items: center; justify-content: space-between;
  font-size: 17px; font-weight: 700; }
#status { font-size: 12px; font-weight: 500; color: #6e7781; }
#status::before { content: ""; display: inline-block; width: 8px; height: 8px; margin-right: 6px;
  border-radius: 50%; background: #c2c6cc; }
#status.online::before { background: #1f9d55; }
#status.offline::before { background: #d1242f; }
h2 { margin: 0 0 6px; font-size: 11px; letter-spacing: .06em; text-transform: uppercase; color: #6e7781; }
ul { margin: 0; padding: 0; list-style: none; }
#rooms { margin-bottom: 8px; }
#rooms a { display: block; padding: 4px 10px; border-radius: 6px; color: inherit; text-decoration: none; }
#rooms a:hover { background: #eaecef; }
#rooms a.current { background: #4f46e5; color: #fff; }
#members li { display: flex; align-items: center; gap: 8px; padding: 2px 0; }
#members i { width: 8px; height: 8px; border-radius: 50%; }
#members .me::after { content: "you"; font-size: 12px; color: #6e7781; }
form { display: flex; gap: 6px; }
input, button { font: inherit; }
input { flex: 1; min-width: 0; width: 100%; padding: 6px 10px;
  border: 1px solid #d0d7de; border-radius: 6px; }
input:focus { outline: 2px solid #c7c4f7; border-color: #4f46e5; }
button { padding: 6px 14px; border: 0; border-radius: 6px;
  background: #4f46e5; color: #fff; cursor: pointer; }
main { display: flex; flex-direction: column; min-width: 0; min-height: 0; }
main header { padding: 14px 20px; border-bottom: 1px solid #e3e5e8; }
#messages { flex: 1; margin: 0; padding: 12px 20px; overflow-y: auto; list-style: none; }
#messages:empty::before { content: "No messages yet. Say hello!"; color: #6e7781; }
#messages li { padding: 5px 0; }
#messages b { margin-right: 8px; }
#messages time, #messages small { font-size: 12px; color: #6e7781; }
#messages small { margin-left: 8px; }
#messages p { margin: 1px 0 0; white-space: pre-wrap; overflow-wrap: anywhere; }
#messages .pending { opacity: .45; }
#messages .failed p, #messages .failed small { color: #d1242f; }
#messages .delete { margin-left: 6px; padding: 0 6px; background: none; color: #6e7781; }
#messages li:not(:hover) .delete { opacity: 0; }
#topic { margin-left: 16px; border-color: transparent; font-size: 14px; font-weight: 400; }
main form { padding: 12px 20px 16px; border-top: 1px solid #e3e5e8; }
@media (max-width: 700px) {
  body { grid-template-columns: 1fr; grid-template-rows: auto 1fr; }
  aside { max-height: 45vh; gap: 12px; padding: 12px; border-right: 0; border-bottom: 1px solid #e3e5e8; }
  #rooms, #members { display: flex; flex-wrap: wrap; gap: 4px 12px; }
}
</style>
<aside>
  <header>comet chat <span id="status">connecting</span></header>
  <section><h2>Your name</h2><input id="nick" maxlength="24" autocomplete="nickname"></section>
  <section><h2>Rooms</h2><ul id="rooms"></ul>
    <form id="newroom"><input id="roomname" placeholder="new room" maxlength="32" required>
    <button title="Create the room">+</button></form></section>
  <section><h2>Here now · <span id="count">0</span></h2><ul id="members"></ul></section>
</aside>
<main>
  <header><span id="title"></span><input id="topic" placeholder="Set a topic" maxlength="200"></header>
  <ol id="messages"></ol>
  <form id="composer"><input id="text" autocomplete="off" maxlength="2000" required>
    <button>Send</button></form>
</main>
<script src="/scripts/comet.js"></script>
<script>
"use strict";
const $ = id => document.getElementById(id);
const shown = new Map();    // _stamp -> <li>: each message is on screen once
const members = new Map();  // tag -> nick, for the room we are in
const rooms = new Set();
let room = "", myId = "", wasOffline = false;

function el(tag, props, ...children) {  // children go in as text: user data never becomes HTML
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}
const color = id => `hsl(${Math.abs([...String(id)].reduce((h, c) => (h * 31 + c.charCodeAt(0)) | 0, 7)) % 360} 55% 42%)`;
const inRoom = pkg => [].concat(pkg.listeners).includes("room:" + room);
const newStamp = () => Array.from(crypto.getRandomValues(new Uint8Array(16)),
                                  b => b.toString(16).padStart(2, "0")).join("");
const join = name => comet.push({type: "join", listeners: ["lobby", "room:" + name]});
const leave = name => comet.push({type: "leave", listeners: ["room:" + name]}).catch(() => {});  // not in it any more

function renderRooms() {
  $("rooms").replaceChildren(...[...rooms].sort().map(name =>
    el("li", {}, el("a", {href: "#" + name, className: name === room ? "current" : ""}, "# " + name))));
}
function renderMembers() {
  const sorted = [...members].sort((a, b) => a[1].localeCompare(b[1]));
  $("members").replaceChildren(...sorted.map(([id, nick]) =>
    el("li", {className: id === myId ? "me" : ""}, el("i", {style: "background:" + color(id)}), nick)));
  $("count").textContent = members.size;
}
function showMessage(pkg, pending) {  // add or confirm one message, in server-time order
  let li = shown.get(pkg._stamp);
  if (!li) {
    li = el("li", {}, el("b", {style: "color:" + color(pkg.sender.id)}, pkg.sender.nick),
            el("time"), el("small"), el("p", {}, pkg.text));
    if (pkg.sender.id === myId) li.querySelector("small").after(el("button", {className: "delete",
      title: "Delete", onclick: () => comet.push({type: "delete", listeners: ["room:" + room], stamp: pkg._stamp})}, "×"));
    shown.set(pkg._stamp, li);
  }
  mark(li, pending ? "pending" : "", pending ? "waiting to be sent" : "");
  li.ts = pkg._ts || Infinity;  // ours not yet accepted stay last
  const time = new Date(pkg._ts || Date.now());
  li.querySelector("time").textContent = time.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
  const list = $("messages"), atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  list.insertBefore(li, [...list.children].find(other => other.ts > li.ts) || null);
  if (atBottom || pending) list.scrollTop = list.scrollHeight;
  return li;
}
function mark(li, state, label) {  // state: "pending" (greyed), "failed" or "" (sent)
  li.className = state;
  li.querySelector("small").textContent = label;
}
function send(name, text, li) {  // show it at once, marked until the server has it
  const pkg = {type: "message", listeners: ["room:" + name], text, _stamp: newStamp()};  // ours: its echo finds the line
  if (li) shown.set(pkg._stamp, li);
  else li = showMessage({...pkg, sender: {nick: $("nick").value, id: myId}}, true);
  const refused = err => mark(li, "failed", "refused: " + err.message);
  comet.push(pkg).then(() => mark(li, "", ""), err => {
    if (err.error !== "not_member") return refused(err);
    join(name).then(() => send(name, text, li), refused);  // dropped while away: join again
  });
}
async function load() {  // catch up: the rooms, who is here, the recent messages
  const name = room;
  const state = await (await fetch("/state?room=" + encodeURIComponent(name))).json();
  if (name !== room) return;
  myId = state.you;
  state.rooms.forEach(r => rooms.add(r));
  $("topic").value = state.topic;
  members.clear();
  state.members.forEach(s => members.set(s.id, s.nick));
  state.messages.forEach(m => showMessage(m));
  renderRooms();
  renderMembers();
}
function connect() {  // (re)join: the server drops members it has not heard from
  join(room).then(load, () => { location.hash = "general"; });
}
function enter(name) {
  if (name === room) return;
  if (room) leave(room);
  room = name;
  shown.clear();
  members.clear();
  $("messages").replaceChildren();
  $("title").textContent = "# " + name;
  $("topic").value = "";
  $("text").placeholder = "Message #" + name;
  renderRooms();
  renderMembers();
  connect();
}

const nick = $("nick");
function saveNick() {  // the server's sender hook reads the cookie
  nick.value = nick.value.trim().slice(0, 24) || "guest-" + Math.floor(1000 + Math.random() * 9000);
  localStorage.nick = nick.value;
  document.cookie = "nick=" + encodeURIComponent(nick.value) + "; path=/; max-age=31536000; samesite=lax";
}
nick.value = localStorage.nick || "";
saveNick();
nick.onchange = () => { saveNick(); join(room); };  // joining again tells the room the new name

$("composer").onsubmit = event => {
  event.preventDefault();
  const text = $("text").value.trim();
  if (text) send(room, text);
  $("text").value = "";
};
$("newroom").onsubmit = event => {
  event.preventDefault();
  const input = $("roomname"), name = input.value.trim().toLowerCase().replace(/\s+/g, "-");
  const go = () => { input.value = ""; location.hash = name; };
  if (rooms.has(name)) return go();
  comet.push({type: "create", listeners: ["lobby"], name}).then(go, err => {
    input.setCustomValidity(err.message);
    input.reportValidity();
  });
};
$("roomname").oninput = event => event.target.setCustomValidity("");
$("topic").onchange = event => comet.push({type: "update", listeners: ["room:" + room], topic: event.target.value});

comet.on("message", pkg => inRoom(pkg) && showMessage(pkg));
comet.on("create", pkg => { rooms.add(pkg.name); renderRooms(); });
comet.on("update", pkg => { if (inRoom(pkg)) $("topic").value = pkg.topic; });
comet.on("delete", pkg => inRoom(pkg) && shown.get(pkg.stamp)?.remove());
comet.on("join", pkg => {
  if (inRoom(pkg)) { members.set(pkg.sender.id, pkg.sender.nick); renderMembers(); }
});
comet.on("leave", pkg => {  // also {"reason": "timeout"} when the server dropped someone
  if (!inRoom(pkg)) return;
  members.delete(pkg.sender.id);
  renderMembers();
  if (pkg.sender.id === myId) join(room);  // another tab of ours left: we stay
});
comet.on("$status", status => {
  $("status").className = $("status").textContent = status;
  if (status === "online" && wasOffline) connect();
  wasOffline = status === "offline";
});
comet.on("$reset", () => connect());
addEventListener("hashchange", () => enter(location.hash.slice(1) || "general"));
addEventListener("pagehide", () => leave(room));
addEventListener("pageshow", event => event.persisted && connect());
comet.start();
enter(location.hash.slice(1) || "general");
</script>
"""

if __name__ == "__main__":
    main()
