"""One build per key in a process: callers that come while it runs share its outcome."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from builder.coordination import SingleFlight

pytestmark = pytest.mark.fast  # pure logic: part of scripts/test-fast


def test_callers_during_a_call_share_its_result_and_the_lead_runs_once():
    flight: SingleFlight[str] = SingleFlight()
    started, release, calls, leads = threading.Event(), threading.Event(), [], []

    def call():
        calls.append(1)
        started.set()
        release.wait(10)
        return "built"

    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(flight.run, "k", call, lambda: leads.append(1))
        started.wait(10)
        others = [pool.submit(flight.run, "k", call, lambda: leads.append(1)) for _ in range(3)]
        time.sleep(1)  # the others reach the flight while the first call still runs
        release.set()
        assert [f.result(10) for f in [first, *others]] == ["built"] * 4
    assert (len(calls), len(leads)) == (1, 1)
    assert flight.run("k", lambda: "again") == "again"  # finished: the next caller runs anew


def test_an_exception_reaches_every_waiting_caller_and_a_refused_lead_starts_nothing():
    flight: SingleFlight[str] = SingleFlight()
    with pytest.raises(ValueError, match="broken"):
        flight.run("k", lambda: (_ for _ in ()).throw(ValueError("broken")))

    def refuse():
        raise PermissionError("over its share")

    with pytest.raises(PermissionError):
        flight.run("k", lambda: pytest.fail("ran despite the refusal"), on_lead=refuse)
    assert flight.run("k", lambda: "ok") == "ok"
