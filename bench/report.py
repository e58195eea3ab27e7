"""Turn the benchmark's result lines into bench/RESULTS.md: tables and target verdicts.

A cell reads ``median [min–max]`` over its repetitions.  Ratios against the
floor or socketio are taken repetition by repetition (the same minute of the
same run), then summarised the same way.
"""

import statistics

COMETS = ["comet-memory", "comet-sqlite", "comet-mysql", "comet-postgresql",
          "comet-postgresql-nonotify"]
ORDER = ["hello", "floor", "socketio"] + COMETS
SERVER_ORDER = ["wsgiref", "cheroot", "gevent", "gthread"]


def brief(line):
    """One result line in a few words, for the progress log."""
    if "failed" in line:
        return f"{line['workload']}: FAILED {line['failed'][:160]}"
    keys = ["push_ms", "all_ms", "p50_ms", "p99_ms", "deliveries_per_s", "idle_cpu_pct", "held", "rss_mb", "client_cpu_s"]
    shown = ", ".join(f"{k}={line[k]:.4g}" if isinstance(line[k], float) else f"{k}={line[k]}"
                      for k in keys if line.get(k) is not None)
    extra = f"/{line['publishers']}p" if "publishers" in line else ""
    return f"{line['workload']}({line.get('n')}{extra}): {shown}"


def _select(results, workload, server, app, **match):
    return [r for r in results if r.get("workload") == workload and r.get("server") == server
            and r.get("app") == app and all(r.get(k) == v for k, v in match.items())]


def values(results, workload, server, app, key, **match):
    """``{rep: value}`` of one metric of one cell (failed repetitions left out)."""
    return {r["rep"]: r[key] for r in _select(results, workload, server, app, **match)
            if r.get(key) is not None and "failed" not in r}


def summary(vals, digits=1):
    """``median [min–max]`` of a list of numbers."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return "—"
    fmt = f"{{:.{digits}f}}"
    median = fmt.format(statistics.median(vals))
    if len(vals) == 1:
        return median
    return f"{median} [{fmt.format(min(vals))}–{fmt.format(max(vals))}]"


def _cell(results, workload, server, app, key, digits=1, **match):
    text = summary(list(values(results, workload, server, app, key, **match).values()), digits)
    failed = [r for r in _select(results, workload, server, app, **match) if "failed" in r]
    if failed:
        text += f" ({len(failed)} failed)"
    return text


def ratios(results, workload, server, app, other, key, **match):
    """Per-repetition ratios app/other of one metric."""
    mine = values(results, workload, server, app, key, **match)
    theirs = values(results, workload, server, other, key, **match)
    return [mine[rep] / theirs[rep] for rep in mine if rep in theirs and theirs[rep]]


def _present(results, key):
    found = {r.get(key) for r in results if r.get(key)}
    order = SERVER_ORDER if key == "server" else ORDER
    return [x for x in order if x in found] + sorted(found - set(order))


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def tables(results):
    servers, apps = _present(results, "server"), _present(results, "app")
    sizes = sorted({r["n"] for r in results if r.get("workload") == "fanout"})
    publishers = sorted({r["publishers"] for r in results if r.get("workload") == "throughput"})
    out = []

    rows = [[s, a] + [_cell(results, "fanout", s, a, "all_ms", n=n) for n in sizes]
            + [_cell(results, "fanout", s, a, k, n=sizes[-1])
               for k in ("best_ms", "p50_ms", "p99_ms")]
            for s in servers for a in apps if _select(results, "fanout", s, a)]
    if rows:
        out.append("### Fan-out: one push to N parked polls, ms until all received (median of the"
                   " rounds; best round: the quickest)\n\n"
                   + _table(["server", "app"] + [f"N={n}" for n in sizes]
                            + [f"best round N={sizes[-1]}", f"p50 N={sizes[-1]}",
                               f"p99 N={sizes[-1]}"], rows))

    rows = []
    for s in servers:
        for a in apps:
            if not _select(results, "throughput", s, a):
                continue
            row = [s, a]
            for p in publishers:
                row += [_cell(results, "throughput", s, a, "deliveries_per_s", 0, publishers=p),
                        _cell(results, "throughput", s, a, "p50_ms", publishers=p),
                        _cell(results, "throughput", s, a, "p99_ms", publishers=p)]
            row += [_cell(results, "throughput", s, a, "server_cpu_pct", 0, publishers=publishers[-1]),
                    _cell(results, "throughput", s, a, "rss_mb", 0, publishers=publishers[-1])]
            rows.append(row)
    if rows:
        header = ["server", "app"]
        for p in publishers:
            header += [f"{p} pub: deliveries/s", f"{p} pub: p50 ms", f"{p} pub: p99 ms"]
        header += [f"server CPU % ({publishers[-1]} pub)", "server RSS MB"]
        out.append("### Throughput: 100 subscribers, publishers pushing back to back\n\n"
                   + _table(header, rows))

    rows = [[s, a, _cell(results, "push_latency", s, a, "p50_ms", 2),
             _cell(results, "push_latency", s, a, "p99_ms", 2)]
            for s in servers for a in apps if _select(results, "push_latency", s, a)]
    if rows:
        out.append("### Push latency: one publisher, back to back, one subscriber parked (ms)\n\n"
                   + _table(["server", "app", "p50", "p99"], rows))

    rows = [[s, a, _cell(results, "fanout", s, a, "idle_cpu_pct", 2, n=sizes[-1])]
            for s in servers for a in apps
            if sizes and values(results, "fanout", s, a, "idle_cpu_pct", n=sizes[-1])]
    if rows:
        out.append(f"### Idle: server CPU while {sizes[-1]} polls sit parked (% of one core)\n\n"
                   + _table(["server", "app", "CPU %"], rows))

    rows = [[s, a, _cell(results, "hold", s, a, "held", 0), _cell(results, "hold", s, a, "rss_start_mb"),
             _cell(results, "hold", s, a, "rss_mb"), _cell(results, "hold", s, a, "rss_per_poll_kb")]
            for s in servers for a in apps if _select(results, "hold", s, a)]
    if rows:
        out.append("### Parked polls held (ramp in steps of 1,000)\n\n"
                   + _table(["server", "app", "held", "RSS before MB", "RSS at peak MB",
                             "KB per parked poll"], rows))

    rows = [[s, a, _cell(results, "channel", s, a, "n", 0), _cell(results, "channel", s, a, "joins_per_s", 0),
             _cell(results, "channel", s, a, "push_ms"), _cell(results, "channel", s, a, "all_ms"),
             _cell(results, "channel", s, a, "p50_ms"), _cell(results, "channel", s, a, "p99_ms"),
             _cell(results, "channel", s, a, "rss_mb", 0)]
            for s in servers for a in apps if _select(results, "channel", s, a)]
    if rows:
        out.append("### Channel: one push to a channel whose members all have a poll parked"
                   " (the floor: a fan-out to as many parked polls), median of the rounds\n\n"
                   + _table(["server", "app", "members", "joins/s", "push answered ms",
                             "all have it ms", "p50 ms", "p99 ms", "server RSS MB"], rows))

    rows = [[s, a, _cell(results, "cross_process", s, a, "p50_ms"),
             _cell(results, "cross_process", s, a, "p99_ms")]
            for s in servers for a in apps if _select(results, "cross_process", s, a)]
    if rows:
        out.append("### Cross-process delivery: push to one comet process, poll parked on another (ms)\n\n"
                   + _table(["server", "store", "p50", "p99"], rows))
    return "\n".join(out)


def _verdict(vals, ok, failed=0):
    if not vals:
        if failed:
            return f"failed in {failed} of {failed} repetition(s)", "**missed**"
        return "—", "no data"
    median = statistics.median(vals)
    note = f" ({failed} failed)" if failed else ""
    return summary(vals, 2) + note, "**met**" if ok(median) and not failed else "**missed**"


def _failed(results, workload, server, app, **match):
    return sum(1 for r in _select(results, workload, server, app, **match) if "failed" in r)


def targets(results):
    """``[(target, server, app, measured, verdict)]`` for every target the data covers."""
    rows = []
    servers = _present(results, "server")
    sizes = sorted({r["n"] for r in results if r.get("workload") == "fanout"})
    for s in servers:
        for a in COMETS:
            if sizes:
                n = sizes[-1]
                failed = _failed(results, "fanout", s, a, n=n)
                vals = ratios(results, "fanout", s, a, "floor", "all_ms", n=n)
                rows.append((f"fan-out to {n}: ≤ 1.15× floor", s, a,
                             *_verdict(vals, lambda m: m <= 1.15, failed)))
                # The machine's other work only ever adds time to a round: the best
                # round of each app, same repetition, is the fan-out without it.
                vals = ratios(results, "fanout", s, a, "floor", "best_ms", n=n)
                if vals:
                    rows.append((f"fan-out to {n}, best round: ≤ 1.15× floor's", s, a,
                                 *_verdict(vals, lambda m: m <= 1.15, failed)))
                vals = ratios(results, "fanout", s, a, "socketio", "all_ms", n=n)
                rows.append((f"fan-out to {n}: ≤ socketio", s, a,
                             *_verdict(vals, lambda m: m <= 1.0, failed)))
            failed = _failed(results, "throughput", s, a, publishers=4)
            vals = ratios(results, "throughput", s, a, "floor", "deliveries_per_s", publishers=4)
            rows.append(("throughput 100 subs / 4 pubs: ≥ 0.9× floor", s, a,
                         *_verdict(vals, lambda m: m >= 0.9, failed)))
            if a != "comet-memory":         # a durable store against a peer that stores nothing
                vals = ratios(results, "throughput", s, a, "socketio", "deliveries_per_s",
                              publishers=4)
                rows.append(("throughput 100 subs / 4 pubs: ≥ 1.0× socketio", s, a,
                             *_verdict(vals, lambda m: m >= 1.0, failed)))
            if sizes:
                vals = list(values(results, "fanout", s, a, "idle_cpu_pct", n=sizes[-1]).values())
                if vals:
                    rows.append((f"idle CPU, {sizes[-1]} parked: < 2 %", s, a,
                                 *_verdict(vals, lambda m: m < 2)))
            if a != "comet-memory":
                limit = 2 if a == "comet-sqlite" else 5
                vals = list(values(results, "push_latency", s, a, "p50_ms").values())
                if vals:
                    rows.append((f"push latency p50 ≤ {limit} ms", s, a,
                                 *_verdict(vals, lambda m: m <= limit)))
                # NOTIFY wakes the other process at the commit; the others wait for its tail.
                cross = 10 if a == "comet-postgresql" else 120
                vals = list(values(results, "cross_process", s, a, "p50_ms").values())
                if vals:
                    rows.append((f"cross-process p50 ≤ {cross} ms", s, a,
                                 *_verdict(vals, lambda m: m <= cross)))
            if _select(results, "channel", s, a):
                failed = _failed(results, "channel", s, a)
                members = [r["n"] for r in _select(results, "channel", s, a) if r.get("n")]
                channel = f"channel of {max(members):,}" if members else "channel"
                vals = list(values(results, "channel", s, a, "push_ms").values())
                rows.append((f"{channel}: push answered ≤ 100 ms", s, a,
                             *_verdict(vals, lambda m: m <= 100, failed)))
                vals = ratios(results, "channel", s, a, "floor", "all_ms")
                rows.append((f"{channel}: all have it ≤ 2× floor's fan-out", s, a,
                             *_verdict(vals, lambda m: m <= 2, failed)))
            if _select(results, "hold", s, a):
                failed = _failed(results, "hold", s, a)
                vals = ratios(results, "hold", s, a, "floor", "rss_mb")
                rows.append(("10,000 parked polls: RSS ≤ 1.3× floor", s, a,
                             *_verdict(vals, lambda m: m <= 1.3, failed)))
                vals = ratios(results, "hold", s, a, "socketio", "rss_mb")
                rows.append(("10,000 parked polls: RSS < socketio", s, a,
                             *_verdict(vals, lambda m: m < 1.0, failed)))
    return [r for r in rows if r[4] != "no data"]


def markdown(results, machine="", command="python bench/run.py"):
    reps = sorted({r.get("rep") for r in results if r.get("rep")})
    runs = sorted({r.get("run") for r in results if r.get("run")})
    comet = sorted({f"{r.get('comet')} (md5 {r.get('comet_md5')})" for r in results if r.get("comet")})
    head = (f"# Benchmark results\n\nCommand: `{command}`; run {', '.join(runs)}; "
            f"{len(reps)} interleaved repetition(s); {machine}; comet.py: {', '.join(comet)}.\n"
            "Each cell: median [min–max] over the repetitions.  Load generator and server"
            " share the machine's 2 cores.\n"
            "The floor is an ideal long poll (one list and one condition: no storage, no"
            " checks), socketio is python-socketio's polling transport; bench/README.md"
            " says more.\n\n")
    rows = targets(results)
    verdicts = "## Targets (ratios per repetition, same run)\n\n" + _table(
        ["target", "server", "app", "measured: median [min–max]", "verdict"], rows) if rows else ""
    failures = [r for r in results if "failed" in r]
    failed = ""
    if failures:
        failed = "## Failed cells\n\n" + "\n".join(
            f"- rep {r.get('rep')} {r.get('server')} {r.get('app')} {r.get('workload')}"
            f" n={r.get('n')}: {r['failed'][:300]}" for r in failures) + "\n"
    return head + verdicts + "\n## Tables\n\n" + tables(results) + "\n" + failed
