"""The benchmark's smallest cell as a test, so CI runs the bench code (it asserts no timings)."""

import asyncio
import os
import re
import subprocess
import sys

import pytest

from support import fresh_store

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import cpu_split  # noqa: E402
import fanout_cpu  # noqa: E402
import load  # noqa: E402
import push_under_load  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import stamp_cost  # noqa: E402


def test_fanout_to_20_polls_on_wsgiref_with_the_memory_store_delivers_to_all():
    with run.Server("wsgiref", "comet", "memory:", env=run.served_env()) as server:   # this comet.py
        result = asyncio.run(load.fanout(server.target(), 20, rounds=2, time_limit=30))
    assert "failed" not in result, result
    assert result["rounds"] == 2
    assert result["best_ms"] == min(result["all_ms_rounds"])
    assert result["all_ms"] is not None and result["errors"] == 0
    # When the push was answered and when the first poll had it, as the last one did.
    answered, first = result["answered_ms_rounds"][0], result["first_ms_rounds"][0]
    assert 0 < answered and 0 < first <= result["all_ms_rounds"][0]
    assert "Fan-out" in report.markdown([dict(result, rep=1, server="wsgiref", app="comet-memory")])


def test_a_push_to_a_channel_of_20_members_reaches_every_member():
    with run.Server("wsgiref", "comet", "memory:", env=run.served_env()) as server:
        result = asyncio.run(load.channel(server.target(), 20, rounds=1, joins=5))
    assert "failed" not in result, result
    assert result["rounds"] == 1 and result["joined"] == 5
    assert "Channel" in report.markdown([dict(result, rep=1, server="wsgiref", app="comet-memory")])


def test_the_report_judges_every_app_and_server_after_one_with_a_channel_cell():
    """The channel cell's sizes once took the place of the fan-out's: every app after
    the first with a channel cell lost its fan-out verdicts."""
    results = []
    for server in ("gevent", "gthread"):
        for app, ms, delivered in (("floor", 100, 1000), ("socketio", 120, 900),
                                   ("comet-sqlite", 110, 950), ("comet-mysql", 130, 1100)):
            results += [dict(workload="fanout", n=1000, all_ms=ms, best_ms=ms, rep=1,
                             server=server, app=app),
                        dict(workload="throughput", n=100, publishers=4, rep=1, server=server,
                             app=app, deliveries_per_s=delivered)]
            if server == "gevent" and app != "socketio":
                results.append(dict(workload="channel", n=10000, all_ms=ms, push_ms=9, rep=1,
                                    server=server, app=app))

    judged = {(target, server, app): verdict
              for target, server, app, _, verdict in report.targets(results)}

    for server in ("gevent", "gthread"):
        assert judged["fan-out to 1000: ≤ 1.15× floor", server, "comet-mysql"] == "**missed**"
        assert judged["fan-out to 1000: ≤ 1.15× floor", server, "comet-sqlite"] == "**met**"
        assert judged["throughput 100 subs / 4 pubs: ≥ 1.0× socketio", server,
                      "comet-mysql"] == "**met**"
        assert judged["throughput 100 subs / 4 pubs: ≥ 1.0× socketio", server,
                      "comet-sqlite"] == "**met**"


def test_a_room_that_is_a_channel_reaches_its_subscribers_from_one_channel_row(tmp_path, monkeypatch):
    """``--rooms channel``: subscribers and publishers join the room's channel, and each
    push is one row of the SQLite store, read by all 10 subscribers."""
    monkeypatch.setattr(load, "ROOMS", "channel")
    url = f"sqlite:///{tmp_path}/bench.db"
    env = dict(run.served_env(), COMET_BENCH_ROOMS=run.cell_rooms("main", "channel"))
    with run.Server("wsgiref", "comet", url, env=env) as server:
        result = asyncio.run(load.throughput(server.target(), 10, 1, duration=0.5, warmup=0.2))
    assert "failed" not in result and result["errors"] == 0, result
    assert result["deliveries_per_s"] > 0
    import comet
    store = comet.open_store(url)
    try:
        rows = store._query("SELECT COUNT(*), COUNT(channel) FROM comet_packages"
                            " WHERE body LIKE '%\"msg\"%'")[0]
        assert rows[0] > 0 and rows[0] == rows[1]        # every push to the room: a channel row
        assert store._query("SELECT COUNT(*) FROM comet_deliveries")[0][0] == 0
    finally:
        store.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite", "mysql", "postgresql"])
def test_push_under_load_times_a_push_on_every_store(kind, request, tmp_path):
    import comet
    url = fresh_store(kind, request, tmp_path)
    median, mean = push_under_load.push_times(comet, url, busy=1, pushes=3)
    assert median > 0 and mean > 0


def test_cpu_split_reads_the_process_and_each_requests_call_of_the_app(tmp_path):
    stores = run.Stores()
    try:
        split = cpu_split.measure("wsgiref", "comet-memory", stores,
                                  dict(run.served_env(), COMET_BENCH_ROOMS="listener"),
                                  str(tmp_path), duration=1.5)
    finally:
        stores.close()
    assert split["deliveries_per_s"] > 0 and split["cpu_ms_per_push"] > 0
    assert split["user_pct"] + split["system_pct"] > 0 and split["voluntary_per_push"] > 0
    # Every push answered wakes polls: each method's calls were timed, by the server.
    assert split["polls_per_push"] >= 1 and split["app_us_per_poll"] > 0
    assert split["app_us_per_push"] > split["app_us_per_poll"] > 0


def test_fanout_cpu_reads_each_rounds_cpu_and_the_full_collections_in_it(tmp_path):
    stores = run.Stores()
    gc_log = str(tmp_path / "gc")
    try:
        result, timed, pid = fanout_cpu.measure(
            "wsgiref", "comet-memory", stores, fanout_cpu.served_env(None, gc_log), n=20, rounds=2)
    finally:
        stores.close()
    assert "failed" not in result, result
    assert len(timed) == 2 and all(start < end and own >= 0 for start, end, own, _ in timed)
    spans = [(0.0, 1.0), (2.0, 3.0)]
    assert fanout_cpu.overlap(spans, 0.5, 2.5) == 1.0
    line = fanout_cpu.summary("comet-memory", result, timed, spans)
    assert line["rounds"] == 1 and line["cpu_ms_a_round"] >= 0 and line["full_collections"] == 2
    # A process started with the served environment times its full collections.
    subprocess.run([sys.executable, "-c", "import gc; gc.collect()"], check=True,
                   env=fanout_cpu.served_env(None, gc_log))
    logged = [path for path in os.listdir(tmp_path) if path.startswith("gc.")]
    assert logged and len(open(tmp_path / logged[0]).read().split()) >= 2


def test_mysql_claims_counts_the_deadlocks_of_a_run(mariadb):
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "bench", "mysql_claims.py"),
                           "--runs", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # (No deadlock is asserted: test_sql_servers shows a push never waits on a claim.)
    assert re.search(r": 1 runs, \d+ deadlocks, \d+ pushes pushed again, 0 runs that lost",
                     done.stdout), done.stdout + done.stderr


def test_stamp_cost_times_pushes_with_and_without_stamps(tmp_path):
    import comet
    medians = stamp_cost.measure(comet, f"sqlite:///{tmp_path}/comet.db", pushes=3, rounds=1)
    assert len(medians["plain"]) == len(medians["stamped"]) == 1
    assert medians["plain"][0] > 0 and medians["stamped"][0] > 0
