"""The benchmark's smallest cell as a test, so CI runs the bench code (it asserts no timings)."""

import asyncio
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import load  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402


def test_fanout_to_20_polls_on_wsgiref_with_the_memory_store_delivers_to_all():
    with run.Server("wsgiref", "comet", "memory:", env=run.served_env()) as server:   # this comet.py
        result = asyncio.run(load.fanout(server.target(), 20, rounds=1, time_limit=30))
    assert "failed" not in result, result
    assert result["rounds"] == 1
    assert result["all_ms"] is not None and result["errors"] == 0
    assert "Fan-out" in report.markdown([dict(result, rep=1, server="wsgiref", app="comet-memory")])


def test_a_push_to_a_channel_of_20_members_reaches_every_member():
    with run.Server("wsgiref", "comet", "memory:", env=run.served_env()) as server:
        result = asyncio.run(load.channel(server.target(), 20, rounds=1, joins=5))
    assert "failed" not in result, result
    assert result["rounds"] == 1 and result["joined"] == 5
    assert "Channel" in report.markdown([dict(result, rep=1, server="wsgiref", app="comet-memory")])
