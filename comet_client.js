/* comet_client.js - the browser client of comet.py (long polling, no dependencies).
 *
 *   <script src="/scripts/comet.js"></script>
 *   <script>
 *     comet.ping.message = function (pkg) { console.log(pkg.sender, pkg.text); };
 *     var off = comet.on("$status", function (s) { console.log(s); });  // "online" | "offline"
 *     comet.on("$reset", function (answer) { reloadState(); });        // server said: resync
 *     comet.start();                                 // controller (polls) + worker (pushes)
 *     comet.push({type: "join", listeners: ["home"]}).then(function (stamp) { ... });
 *     addEventListener("pagehide", function () { comet.push({type: "leave", listeners: ["home"]}); });
 *   </script>
 *
 * comet.configure({url: "/other"}) when the server's prefix is not "/comet";
 * comet.stop() aborts everything in flight; comet.pending() counts queued pushes.
 * Types starting with "$" are the client's own events: packages of such types are dropped.
 *
 * Two loops, each with at most one request in flight: the controller polls, the worker pushes.
 *
 * - push(pkg) queues a copy of pkg as it is now, with a stamp: the caller's object is never
 *   changed, and pushing it again is another package. A well-formed _stamp of the caller's
 *   is kept, which makes a resend of the same package harmless (the server accepts it once).
 * - Its promise resolves with the stamp once the server answered 200 for it, and rejects with
 *   an Error carrying status, error and message when the server refused it for good: a 4xx
 *   other than 429, or 500 three times. The packages queued behind it go on.
 * - Everything else is retried, in order, for as long as it takes: no answer, 429, 503 and
 *   any other 5xx. Nothing queued is dropped while offline.
 * - A retry waits a random time (full jitter) up to 0.5 s, doubled per failure up to 5 s,
 *   and never less than the server's Retry-After.
 * - An answer under 500 to either loop shows the server is there: it ends the other loop's
 *   wait, which tries at once (a Retry-After still holds). The browser's "online" event and
 *   the page becoming visible again do the same, and a request still out then that fails is
 *   retried at once. A 5xx does not: a proxy answers 502 for a
 *   server that is down, and two failing loops would otherwise wake each other without end.
 * - "$status" belongs to the poll loop: "online" when a poll is answered, "offline" when one
 *   fails. An answered push does not make the page online (its polls may still be failing,
 *   and it would show online while receiving nothing): it makes the poll loop try at once,
 *   and that poll's answer says.
 */
(function (global) {
  "use strict";

  var BATCH = 100;               // packages per push request, the server's max_batch
  var BACKOFF_MIN = 500;         // ms: first retry window, doubled per failure...
  var BACKOFF_MAX = 5000;        // ...up to this, so a server back up is found within seconds
  var INTERNAL_TRIES = 3;        // answers of 500 before a package is given up
  var SEEN_MAX = 10000;          // stamps remembered to drop repeats
  var KEEPALIVE_BYTES = 60000;   // browsers refuse keepalive bodies over 64 KiB
  var STAMP = /^[A-Za-z0-9_-]{8,64}$/;
  var ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

  var url = "/comet";
  var cursor = null;             // newest cursor the server gave us; null = new client
  var status = null;             // last "$status" fired
  var queue = [];                // [{json, stamp, internal, resolve, reject}] in push order; the head may be in flight;
                                 // `internal` counts the package's answers of 500
  var batchLimit = BATCH;        // halved while the server refuses a batch without naming a package
  var seen = new Set();          // recent stamps, oldest first
  var handlers = Object.create(null);
  var workerAfterPoll = false;   // start(): first poll sets the identity cookie, then push
  var leaving = false;           // pagehide happened: ordinary requests die with the page

  // The two loops. `step` sends the loop's next request, `request` is the
  // AbortController of the one in flight, `timer` the pending retry,
  // `failures` the consecutive failures so far, `notBefore` the end of the
  // server's last Retry-After (ms since the epoch), `resumed` whether the page
  // came back (visible, online) while the request in flight was out.
  var poller = {step: poll, on: false, request: null, timer: null, failures: 0, notBefore: 0,
                resumed: false};
  var pusher = {step: work, on: false, request: null, timer: null, failures: 0, notBefore: 0,
                resumed: false};

  // ---- timers and retries: the only place either loop waits -------------

  function schedule(loop, ms) {
    clearTimeout(loop.timer);
    loop.timer = setTimeout(function () { loop.timer = null; loop.step(); }, ms);
  }

  // Exponential backoff with full jitter, never sooner than Retry-After; at once
  // (Retry-After still holds) when the page came back while the request was out.
  function retry(loop, retryAfter) {
    loop.failures += 1;
    var ceiling = Math.min(BACKOFF_MAX, BACKOFF_MIN * Math.pow(2, loop.failures - 1));
    var wait = loop.resumed ? 0 : Math.random() * ceiling;
    loop.resumed = false;
    loop.notBefore = Date.now() + retryAfter * 1000;
    schedule(loop, Math.max(wait, retryAfter * 1000));
  }

  // The server or the network is back: a loop waiting out its backoff tries now.
  function hurry(loop) {
    if (loop.timer) schedule(loop, Math.max(0, loop.notBefore - Date.now()));
  }

  // The page came back (visible, online): a loop waiting tries now, and one whose
  // request is out tries again at once should that request fail.
  function resume(loop) {
    if (loop.request) loop.resumed = true;
    hurry(loop);
  }

  function halt(loop) {
    loop.on = false;
    loop.resumed = false;
    clearTimeout(loop.timer);
    loop.timer = null;
    if (loop.request) loop.request.abort();
    loop.request = null;
    loop.failures = 0;
    loop.notBefore = 0;
  }

  global.addEventListener("online", function () { resume(poller); resume(pusher); });
  global.document.addEventListener("visibilitychange", function () {
    if (global.document.visibilityState === "visible") { resume(poller); resume(pusher); }
  });

  // ---- HTTP ---------------------------------------------------------------

  // Resolves {status, body, retryAfter} for any answer; rejects only when no answer came.
  function exchange(path, init) {
    init.credentials = "same-origin";
    init.cache = "no-store";
    return fetch(url + path, init).then(function (res) {
      return res.json().catch(function () { return null; }).then(function (body) {
        var retryAfter = parseFloat(res.headers.get("Retry-After"));
        return {status: res.status, body: body || {}, retryAfter: retryAfter > 0 ? retryAfter : 0};
      });
    });
  }

  function pushInit(entries, extra) {
    return Object.assign({method: "POST", headers: {"Content-Type": "application/json"},
                          body: "[" + entries.map(function (e) { return e.json; }).join(",") + "]"}, extra);
  }

  // ---- events -------------------------------------------------------------

  function fire(type, arg) {
    var ping = comet.ping, fns = (handlers[type] || []).slice();
    if (ping && Object.prototype.hasOwnProperty.call(ping, type) && typeof ping[type] === "function") {
      fns.unshift(ping[type]);
    }
    fns.forEach(function (fn) {
      try { fn(arg); } catch (err) { console.error("comet: handler for " + type + " threw", err); }
    });
  }

  function on(type, fn) {
    (handlers[type] = handlers[type] || []).push(fn);
    var done = false;
    return function off() {
      var list = handlers[type] || [], i = list.indexOf(fn);
      if (!done && i >= 0) list.splice(i, 1);
      done = true;
    };
  }

  function setStatus(now) {
    if (now !== status) { status = now; fire("$status", now); }
  }

  // The wire is at-least-once (an old cursor sent again repeats packages); drop repeats.
  function deliver(pkg) {
    if (!pkg || typeof pkg !== "object") return;
    if (typeof pkg._stamp === "string") {
      if (seen.has(pkg._stamp)) return;
      seen.add(pkg._stamp);
      if (seen.size > SEEN_MAX) seen.delete(seen.values().next().value);
    }
    var type = String(pkg.type);
    if (type.charAt(0) === "$") console.warn("comet: dropped a package of reserved type " + type);
    else fire(type, pkg);
  }

  // ---- controller: one poll in flight, always with the newest cursor ------

  function poll() {
    clearTimeout(poller.timer);
    poller.timer = null;
    if (!poller.on || poller.request) return;
    var ctl = poller.request = new AbortController();
    poller.resumed = false;
    var query = cursor === null ? "" : "?cursor=" + encodeURIComponent(cursor);
    exchange("/poll" + query, {signal: ctl.signal}).then(function (res) {
      if (ctl.signal.aborted) return;
      poller.request = null;
      if (res.status < 500) hurry(pusher);
      var answer = res.body;
      if (res.status !== 200 || typeof answer.cursor !== "string") return pollFailed(res.retryAfter);
      poller.failures = 0;
      cursor = answer.cursor;
      setStatus("online");
      if (workerAfterPoll) { workerAfterPoll = false; worker(); }
      if (answer.reset) fire("$reset", answer);
      (Array.isArray(answer.packages) ? answer.packages : []).forEach(deliver);
      poll();
    }, function () {
      if (ctl.signal.aborted) return;
      poller.request = null;
      pollFailed(0);
    });
  }

  function pollFailed(retryAfter) {
    setStatus("offline");
    retry(poller, retryAfter);
  }

  // ---- worker: queued pushes in order, batched, one request in flight -----

  function work() {
    clearTimeout(pusher.timer);
    pusher.timer = null;
    if (!pusher.on || pusher.request || !queue.length) return;
    var batch = queue.slice(0, batchLimit);
    var ctl = pusher.request = new AbortController();
    pusher.resumed = false;
    exchange("/push", pushInit(batch, {signal: ctl.signal})).then(function (res) {
      if (ctl.signal.aborted) return;
      pusher.request = null;
      if (res.status < 500) hurry(poller);
      settle(batch, res);
    }, function () {
      if (ctl.signal.aborted) return;
      pusher.request = null;
      retry(pusher, 0);   // maybe it arrived: the stamps make the resend harmless
    });
  }

  // Apply the answer to `batch`, which is still the head of the queue. A
  // failure's `index` names the package it is about: those before it were
  // accepted, those after it are sent again.
  function settle(batch, res) {
    var body = res.body, stamps = Array.isArray(body.accepted) ? body.accepted : [];
    var index = typeof body.index === "number" && body.index >= 0 && body.index < batch.length ? body.index : -1;
    var done = res.status === 200 ? batch.length : Math.max(index, 0);
    queue.splice(0, done);
    batch.slice(0, done).forEach(function (e, i) { e.resolve(stamps[i] || e.stamp); });
    if (res.status === 200) {
      pusher.failures = 0;
      return next();
    }

    var refused = res.status >= 400 && res.status < 500 && res.status !== 429;
    if (!refused && res.status !== 500) return retry(pusher, res.retryAfter);   // 429, 503, ...: not the package's fault
    if (index < 0 && batch.length > 1) {
      batchLimit = Math.ceil(batch.length / 2);   // no package named: narrow down the culprit
      return refused ? work() : retry(pusher, res.retryAfter);
    }
    var culprit = queue[0];
    if (!refused && ++culprit.internal < INTERNAL_TRIES) return retry(pusher, res.retryAfter);
    queue.shift();
    var err = new Error(body.message || "push refused (HTTP " + res.status + ")");
    err.status = res.status;
    err.error = body.error || "http_" + res.status;
    culprit.reject(err);
    pusher.failures = 0;
    next();
  }

  function next() {
    if (!queue.length) batchLimit = BATCH;
    work();
  }

  // The page is going away: resend what is queued with keepalive, which outlives
  // the page. Repeats are harmless (stamps), and resending from the head keeps order.
  function flush() {
    if (!pusher.on || !queue.length) return;
    var entries = [], bytes = 2;
    for (var i = 0; i < queue.length && i < BATCH; i++) {
      bytes += new Blob([queue[i].json]).size + 1;
      if (entries.length && bytes > KEEPALIVE_BYTES) break;
      entries.push(queue[i]);
    }
    fetch(url + "/push", pushInit(entries, {keepalive: true, credentials: "same-origin"}))
      .catch(function () {});
  }

  global.addEventListener("pagehide", function () { leaving = true; flush(); });
  global.addEventListener("pageshow", function () { leaving = false; wake(); });

  // ---- public API -----------------------------------------------------------

  function newStamp() {
    var bytes = global.crypto.getRandomValues(new Uint8Array(22)), s = "";
    for (var i = 0; i < bytes.length; i++) s += ALPHABET[bytes[i] & 63];
    return s;
  }

  function push(pkg) {
    if (!pkg || typeof pkg !== "object" || Array.isArray(pkg)) {
      return Promise.reject(new TypeError("comet.push expects a package object"));
    }
    var stamp = typeof pkg._stamp === "string" && STAMP.test(pkg._stamp) ? pkg._stamp : newStamp();
    var entry = {stamp: stamp, internal: 0};
    try { entry.json = JSON.stringify(Object.assign({}, pkg, {_stamp: stamp})); } catch (err) { return Promise.reject(err); }
    var promise = new Promise(function (resolve, reject) { entry.resolve = resolve; entry.reject = reject; });
    queue.push(entry);
    if (leaving) flush();
    else wake();
    return promise;
  }

  // Start the idle worker on the next tick, so that pushes made together go in one batch.
  function wake() {
    if (pusher.on && !pusher.request && !pusher.timer && queue.length) schedule(pusher, 0);
  }

  function controller() { poller.on = true; poll(); }
  function worker() { pusher.on = true; work(); }

  // Both loops; pushes wait for the first poll answer so that both use one identity cookie.
  function start() {
    controller();
    if (cursor !== null) worker();
    else workerAfterPoll = true;
  }

  function stop() {
    workerAfterPoll = false;
    halt(poller);
    halt(pusher);
  }

  function configure(options) {
    if (options && typeof options.url === "string") url = options.url.replace(/\/+$/, "");
  }

  var comet = global.comet = {
    ping: {},
    on: on,
    push: push,
    controller: controller,
    worker: worker,
    start: start,
    stop: stop,
    configure: configure,
    pending: function () { return queue.length; }
  };
})(window);
