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
 */
(function (global) {
  "use strict";

  var BATCH = 100;               // packages per push request, the server's max_batch
  var BACKOFF_MIN = 500;         // ms: first retry window, doubled per failure...
  var BACKOFF_MAX = 30000;       // ...up to this
  var SEEN_MAX = 10000;          // stamps remembered to drop repeats
  var KEEPALIVE_BYTES = 60000;   // browsers refuse keepalive bodies over 64 KiB
  var STAMP = /^[A-Za-z0-9_-]{8,64}$/;
  var ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

  var url = "/comet";
  var cursor = null;             // newest cursor the server gave us; null = new client
  var status = null;             // last "$status" fired
  var queue = [];                // [{json, stamp, resolve, reject}] in push order; the head may be in flight
  var batchLimit = BATCH;        // halved while the server refuses a batch without naming a package
  var seen = new Set();          // recent stamps, oldest first
  var handlers = Object.create(null);
  var workerAfterPoll = false;   // start(): first poll sets the identity cookie, then push
  var leaving = false;           // pagehide happened: ordinary requests die with the page

  // The two loops. `request` is the AbortController of the request in flight,
  // `timer` the pending retry, `failures` the consecutive failures so far.
  var poller = {on: false, request: null, timer: null, failures: 0};
  var pusher = {on: false, request: null, timer: null, failures: 0};

  // ---- timers and retries: the only place either loop waits -------------

  function schedule(loop, step, ms) {
    clearTimeout(loop.timer);
    loop.timer = setTimeout(function () { loop.timer = null; step(); }, ms);
  }

  // Exponential backoff with full jitter, never sooner than Retry-After.
  function retry(loop, step, retryAfter) {
    loop.failures += 1;
    var ceiling = Math.min(BACKOFF_MAX, BACKOFF_MIN * Math.pow(2, loop.failures - 1));
    schedule(loop, step, Math.max(Math.random() * ceiling, retryAfter * 1000));
  }

  function halt(loop) {
    loop.on = false;
    clearTimeout(loop.timer);
    loop.timer = null;
    if (loop.request) loop.request.abort();
    loop.request = null;
    loop.failures = 0;
  }

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

  // A server that answers (even 4xx) is online; no answer or 5xx is offline.
  function reached(ok) {
    var now = ok ? "online" : "offline";
    if (now !== status) { status = now; fire("$status", now); }
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
    var query = cursor === null ? "" : "?cursor=" + encodeURIComponent(cursor);
    exchange("/poll" + query, {signal: ctl.signal}).then(function (res) {
      if (ctl.signal.aborted) return;
      poller.request = null;
      reached(res.status < 500);
      var answer = res.body;
      if (res.status !== 200 || typeof answer.cursor !== "string") return retry(poller, poll, res.retryAfter);
      poller.failures = 0;
      cursor = answer.cursor;
      if (workerAfterPoll) { workerAfterPoll = false; worker(); }
      if (answer.reset) fire("$reset", answer);
      (Array.isArray(answer.packages) ? answer.packages : []).forEach(deliver);
      poll();
    }, function () {
      if (ctl.signal.aborted) return;
      poller.request = null;
      reached(false);
      retry(poller, poll, 0);
    });
  }

  // ---- worker: queued pushes in order, batched, one request in flight -----

  function work() {
    clearTimeout(pusher.timer);
    pusher.timer = null;
    if (!pusher.on || pusher.request || !queue.length) return;
    var batch = queue.slice(0, batchLimit);
    var ctl = pusher.request = new AbortController();
    exchange("/push", pushInit(batch, {signal: ctl.signal})).then(function (res) {
      if (ctl.signal.aborted) return;
      pusher.request = null;
      reached(res.status < 500);
      settle(batch, res);
    }, function () {
      if (ctl.signal.aborted) return;
      pusher.request = null;
      reached(false);
      retry(pusher, work, 0);   // maybe it arrived: the stamps make the resend harmless
    });
  }

  // Apply the answer to `batch`, which is still the head of the queue.
  function settle(batch, res) {
    var body = res.body, stamps = Array.isArray(body.accepted) ? body.accepted : [];
    var refused = res.status >= 400 && res.status < 500 && res.status !== 429;
    var index = typeof body.index === "number" && body.index >= 0 && body.index < batch.length ? body.index : -1;
    var done = res.status === 200 ? batch.length : Math.max(index, 0);

    queue.splice(0, done);
    batch.slice(0, done).forEach(function (e, i) { e.resolve(stamps[i] || e.stamp); });

    if (res.status === 200) {
      pusher.failures = 0;
    } else if (refused && index < 0 && batch.length > 1) {
      batchLimit = Math.ceil(batch.length / 2);   // no index given: narrow down the culprit
    } else if (refused) {
      var e = queue.shift();                       // final for this one package; go on with the rest
      var err = new Error(body.message || "push refused (HTTP " + res.status + ")");
      err.status = res.status;
      err.error = body.error || "http_" + res.status;
      e.reject(err);
      pusher.failures = 0;
    } else {
      return retry(pusher, work, res.retryAfter);  // 429, 5xx, anything else: keep it queued
    }
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
    if (typeof pkg._stamp !== "string" || !STAMP.test(pkg._stamp)) pkg._stamp = newStamp();
    var entry = {stamp: pkg._stamp};
    try { entry.json = JSON.stringify(pkg); } catch (err) { return Promise.reject(err); }
    var promise = new Promise(function (resolve, reject) { entry.resolve = resolve; entry.reject = reject; });
    queue.push(entry);
    if (leaving) flush();
    else wake();
    return promise;
  }

  // Start the idle worker on the next tick, so that pushes made together go in one batch.
  function wake() {
    if (pusher.on && !pusher.request && !pusher.timer && queue.length) schedule(pusher, work, 0);
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
