"""A cancelled job's log says it was stopped on request, not that it failed (issue 13,
bug 10): the runner's line for a cooperative stop, in both launch modes."""
from __future__ import annotations

import pytest

from test_supervisor import MODES, Recorder, make_payload, run


@pytest.mark.parametrize("mode", MODES)
def test_a_cancelled_jobs_log_says_stopped_on_request_not_failed(mode, tmp_path):
    payload = make_payload(tmp_path, "SleepBackend", {"seconds": 60, "ready_file": "ready"})
    outcome, rec = run(payload, Recorder(cancel_when_file=tmp_path / "ready"), mode=mode, grace_s=20)
    assert outcome.status == "cancelled"
    assert "job stopped on request" in rec.text
    assert "job failed" not in rec.text
