"""The process layer (neuron_workers.process): a job's runner process and its
supervisor, with real processes and signals.

No Django, no database: jobs are tiny fake backends (tests/fake_backends.py)
loaded by dotted path. Both launch modes run where it matters; fork mode goes
through the preloaded zygote, exactly as on a cpu worker.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from neuron_workers.process import (
    INLINE_PAYLOAD_MAX,
    Outcome,
    child_env,
    default_zygote,
    find_orphans,
    group_alive,
    kill_orphans,
    kill_process_group,
    launch,
    runner,
    supervise,
)
from neuron_workers.process.tailing import LOG_CHUNK, LogTailer, utf8_safe_cut
from tests.polling import wait_until

FAKE = "tests.fake_backends:"
MODES = ["fork", "exec"]
_next_id = [900_000 + os.getpid() % 1000 * 100]


def new_job_id() -> int:
    _next_id[0] += 1
    return _next_id[0]


def make_payload(workdir: Path, backend: str = "SleepBackend", spec: dict | None = None, **over) -> dict:
    job_id = over.pop("job_id", None) or new_job_id()
    payload = {
        "job_id": job_id,
        "kind": "inference",
        "backend": FAKE + backend,
        "spec": spec or {},
        "workdir": str(workdir),
        "inputs": {},
        "cores": "2-3",
        "env": {"NEURON_RT_VISIBLE_CORES": "2-3", "NEURON_PROCESS_TAG": f"job-{job_id}"},
    }
    payload.update(over)
    return payload


class Recorder:
    """Collects what supervise() reports, like the Celery task's callbacks do."""

    def __init__(self, cancel_when_file: Path | None = None) -> None:
        self.logs: list[tuple[int, str]] = []
        self.metrics: list[dict] = []
        self.heartbeats = 0
        self.cancel_checks = 0
        self.started_pid: int | None = None
        self.cancel_when_file = cancel_when_file

    def heartbeat(self) -> None:
        self.heartbeats += 1

    def should_cancel(self) -> bool:
        self.cancel_checks += 1
        return self.cancel_when_file is not None and self.cancel_when_file.exists()

    def on_log(self, offset: int, text: str) -> None:
        self.logs.append((offset, text))

    def on_metric(self, record: dict) -> None:
        self.metrics.append(record)

    def on_start(self, pid: int) -> None:
        self.started_pid = pid

    @property
    def text(self) -> str:
        return "".join(text for _, text in self.logs)


def run(payload: dict, rec: Recorder | None = None, **kw) -> tuple[Outcome, Recorder]:
    rec = rec or Recorder()
    options = dict(max_runtime_s=60, grace_s=5, poll_s=0.1, cancel_check_s=0.05, mode="fork")
    options.update(kw)
    outcome = supervise(
        payload,
        heartbeat=rec.heartbeat,
        should_cancel=rec.should_cancel,
        on_log=rec.on_log,
        on_metric=rec.on_metric,
        on_start=rec.on_start,
        **options,
    )
    return outcome, rec


def alive(pid: int) -> bool:
    """True for a live process; a zombie (killed, not yet reaped) counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module", autouse=True)
def warm_zygote():
    """Start this process's zygote once: its preload (torch) takes a few seconds."""
    default_zygote().start()


# --- success, environment, result ---------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_successful_job_returns_its_result(mode, tmp_path):
    payload = make_payload(tmp_path, "OkBackend", {"echo": "hello"})
    outcome, rec = run(payload, mode=mode)
    assert outcome.status == "succeeded", outcome
    assert outcome.exit_code == 0 and outcome.signal is None and outcome.error_code is None
    assert outcome.result["echo"] == "hello" and outcome.result["job_id"] == payload["job_id"]
    assert rec.started_pid == outcome.pid == outcome.result["pid"]
    assert (tmp_path / "artifacts" / "out.txt").read_text() == "done"
    assert json.loads((tmp_path / "result.json").read_text())["ok"] is True


@pytest.mark.parametrize("mode, echo_bytes", [("fork", 10), ("fork", 100_000), ("exec", 10)])
def test_the_payload_reaches_the_child_in_the_request_or_in_a_private_file(mode, echo_bytes, tmp_path):
    """Fork mode sends a payload to the zygote in the request (no payload.json to
    create); one over INLINE_PAYLOAD_MAX, and every exec-mode one, goes in a file
    only its owner can read (the env may carry credentials)."""
    echo = "x" * echo_bytes
    outcome, _ = run(make_payload(tmp_path, "OkBackend", {"echo": echo}), mode=mode)
    assert outcome.status == "succeeded", outcome
    assert outcome.result["echo"] == echo
    path = tmp_path / "payload.json"
    assert path.exists() == (mode == "exec" or echo_bytes > INLINE_PAYLOAD_MAX)
    if path.exists():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert json.loads(path.read_text())["spec"]["echo"] == echo


@pytest.mark.parametrize("mode", MODES)
def test_the_child_sees_its_cores_and_tag_in_its_own_session(mode, tmp_path):
    payload = make_payload(tmp_path, "OkBackend")
    outcome, _ = run(payload, mode=mode)
    result = outcome.result
    assert result["visible_cores"] == "2-3" and result["ctx_cores"] == "2-3"
    assert result["process_tag"] == f"job-{payload['job_id']}"
    assert result["pid"] == result["pgid"] == result["sid"] != os.getpid()
    assert result["cwd"] == str(tmp_path.resolve())


def test_forked_jobs_draw_their_own_random_numbers_and_get_exactly_their_env(tmp_path, monkeypatch):
    # Every job process is forked from the same zygote: `random` must be reseeded
    # in each, and a variable the worker had but the job's env drops must be gone.
    monkeypatch.setenv("NEURONDECK_TEST_DROPPED", "1")
    results = []
    names = ("a", "b", "c")
    for name in names:
        payload = make_payload(tmp_path / name, "OkBackend")
        payload["env"] = {**payload["env"], "NEURONDECK_TEST_DROPPED": None, "NEURONDECK_TEST_ADDED": name}
        outcome, _ = run(payload)
        assert outcome.status == "succeeded", outcome
        results.append(outcome.result)
    assert len({result["random"] for result in results}) == len(names)
    for name, result in zip(names, results):
        expected = child_env({"env": {"NEURONDECK_TEST_DROPPED": None, "NEURONDECK_TEST_ADDED": name}})
        expected["NEURON_RT_VISIBLE_CORES"] = "2-3"
        expected["NEURON_PROCESS_TAG"] = result["process_tag"]
        assert result["environ"] == expected
        assert result["threading_main"] is True


@pytest.mark.parametrize("mode", MODES)
def test_a_short_job_finishes_without_waiting_for_a_poll_tick(mode, tmp_path):
    # Every poll, heartbeat and cancel check is an hour away: only the job's exit
    # can wake the supervisor before the deadline below.
    hour = 3600.0
    finished = threading.Event()
    outcomes: list[Outcome] = []

    def supervise_in_thread() -> None:
        outcomes.append(run(make_payload(tmp_path, "OkBackend"), mode=mode, poll_s=hour, initial_poll_s=hour,
                            heartbeat_s=hour, cancel_check_s=hour)[0])
        finished.set()

    threading.Thread(target=supervise_in_thread, daemon=True).start()
    assert finished.wait(60), "supervise() waited for a poll tick instead of the job's exit"
    assert outcomes[0].status == "succeeded"


@pytest.mark.parametrize("mode", MODES)
def test_launch_returns_while_the_job_runs_with_its_group_ready_to_signal(mode, tmp_path):
    gate = tmp_path / "go"
    handle = launch(make_payload(tmp_path, "SleepBackend", {"seconds": 600, "until_file": "go"}), mode)
    try:
        assert not handle.wait(0)  # launch did not wait for the job
        assert os.getpgid(handle.pid) == os.getsid(handle.pid) == handle.pid == handle.pgid
        gate.touch()
        assert handle.wait(60)
        assert handle.returncode == 0
    finally:
        kill_process_group(handle.pgid, 0)
        handle.close()


def test_a_stale_stop_file_from_an_earlier_attempt_is_ignored(tmp_path):
    (tmp_path / "STOP").touch()
    (tmp_path / "result.json").write_text('{"ok": false, "code": "old", "error": "old"}')
    outcome, _ = run(make_payload(tmp_path, "SleepBackend", {"seconds": 0.1}))
    assert outcome.status == "succeeded" and outcome.result["steps"] >= 1


# --- logs and metrics -------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_logs_stream_in_whole_line_chunks_whose_offsets_rebuild_the_file(mode, tmp_path):
    spec = {"seconds": 0.3, "lines": 3000, "line": "é-" + "x" * 60}  # ~200 KiB, multibyte
    outcome, rec = run(make_payload(tmp_path, "SleepBackend", spec), mode=mode)
    assert outcome.status == "succeeded"
    data = (tmp_path / "log.txt").read_bytes()
    assert outcome.log_bytes == len(data) > 3 * LOG_CHUNK
    expected = 0
    for offset, text in rec.logs:
        raw = text.encode("utf-8")
        assert offset == expected and 0 < len(raw) <= LOG_CHUNK
        expected += len(raw)
    assert rec.text == data.decode("utf-8")
    assert all(text.endswith("\n") for _, text in rec.logs)
    assert "line 0" not in rec.text and "é-" + "x" * 60 + " 2999\n" in rec.text


def test_metrics_are_forwarded_as_dicts(tmp_path):
    outcome, rec = run(make_payload(tmp_path, "SleepBackend", {"seconds": 0.3, "step_s": 0.02}))
    assert outcome.status == "succeeded"
    steps = [m["step"] for m in rec.metrics]
    assert steps == list(range(outcome.result["steps"])) and len(steps) >= 5
    assert all("loss" in m and "ts" in m for m in rec.metrics)


def test_heartbeats_and_cancel_checks_are_rate_limited(tmp_path):
    outcome, rec = run(
        make_payload(tmp_path, "SleepBackend", {"seconds": 1.0}), heartbeat_s=0.25, cancel_check_s=0.5
    )
    assert outcome.status == "succeeded"
    # At most one per period of the run's measured duration (a busy machine may
    # stretch the 1 s job), and the job runs long enough for a few.
    assert 2 <= rec.heartbeats <= outcome.duration_s / 0.25 + 1
    assert 1 <= rec.cancel_checks <= outcome.duration_s / 0.5 + 1


def test_a_long_partial_line_is_split_at_character_boundaries():
    text = "ü" * (LOG_CHUNK)  # 128 KiB, no newline, every char 2 bytes
    data = text.encode("utf-8")
    cut = utf8_safe_cut(data[: LOG_CHUNK + 1])
    assert data[:cut].decode("utf-8") and cut % 2 == 0
    assert utf8_safe_cut("a€".encode()[:-1]) == 1
    assert utf8_safe_cut(b"abc") == 3


def test_a_partial_line_is_held_until_completed_or_stale(tmp_path):
    log = tmp_path / "log.txt"
    got: list[tuple[int, str]] = []
    tailer = LogTailer(log, lambda offset, text: got.append((offset, text)), partial_line_hold_s=3600)
    log.write_bytes(b"done\nprogress 10%")
    tailer.pump(final=False)
    assert got == [(0, "done\n")]
    tailer.partial_line_hold_s = 0.0  # it has waited long enough
    tailer.pump(final=False)
    assert got[-1] == (5, "progress 10%")
    tailer.close()


# --- failures -------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_job_failed_error_keeps_its_code(mode, tmp_path):
    spec = {"how": "fail", "code": "compile_error", "message": "neuronx-cc rejected the graph"}
    outcome, rec = run(make_payload(tmp_path, "CrashBackend", spec), mode=mode)
    assert outcome.status == "failed" and outcome.exit_code == 1
    assert outcome.error_code == "compile_error" and outcome.error == "neuronx-cc rejected the graph"
    assert "job failed (compile_error)" in rec.text


def test_an_unexpected_exception_fails_with_its_traceback(tmp_path):
    outcome, rec = run(make_payload(tmp_path, "CrashBackend", {"how": "raise"}))
    assert outcome.status == "failed" and outcome.error_code == "error"
    assert outcome.error == "RuntimeError: boom"
    assert "raise RuntimeError" in outcome.traceback and "RuntimeError: boom" in rec.text


def test_a_memory_error_is_reported_as_oom(tmp_path):
    outcome, _ = run(make_payload(tmp_path, "CrashBackend", {"how": "oom"}))
    assert outcome.status == "failed" and outcome.error_code == "oom"


def test_an_unknown_backend_fails_cleanly(tmp_path):
    outcome, _ = run(make_payload(tmp_path, "NoSuchBackend"))
    assert outcome.status == "failed" and outcome.error_code == "error"
    assert "NoSuchBackend" in outcome.error


def test_a_backend_returning_a_non_dict_fails(tmp_path):
    outcome, _ = run(make_payload(tmp_path, "BadResultBackend"))
    assert outcome.status == "failed" and "expected dict" in outcome.error


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "how, exit_code, sig",
    [("exit", 3, None), ("sigkill", None, signal.SIGKILL), ("segv", None, signal.SIGSEGV)],
)
def test_a_child_dying_without_a_result_is_crashed(mode, how, exit_code, sig, tmp_path):
    outcome, _ = run(make_payload(tmp_path, "CrashBackend", {"how": how, "code": 3}), mode=mode)
    assert outcome.status == "failed" and outcome.error_code == "crashed"
    assert outcome.exit_code == exit_code and outcome.signal == sig
    assert (f"code {exit_code}" if exit_code else signal.Signals(sig).name) in outcome.error
    assert not (tmp_path / "result.json").exists()


def test_a_segfault_leaves_a_python_stack_in_the_log(tmp_path):
    _, rec = run(make_payload(tmp_path, "CrashBackend", {"how": "segv"}))
    assert "Fatal Python error: Segmentation fault" in rec.text


# --- cancel, timeout, process groups ------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_cancel_stops_a_cooperative_job_before_the_grace_period(mode, tmp_path):
    payload = make_payload(tmp_path, "SleepBackend", {"seconds": 60, "ready_file": "ready"})
    rec = Recorder(cancel_when_file=tmp_path / "ready")
    outcome, rec = run(payload, rec, mode=mode, grace_s=20)
    assert outcome.status == "cancelled" and outcome.error_code == "cancelled"
    assert outcome.exit_code == 1 and outcome.signal is None  # it stopped by itself, before any SIGKILL
    assert "stopping at step" in rec.text
    assert (tmp_path / "STOP").exists()


@pytest.mark.parametrize("mode", MODES)
def test_cancel_kills_a_job_ignoring_sigterm_and_its_grandchild(mode, tmp_path):
    spec = {"seconds": 600, "ignore_sigterm": True, "grandchild": True, "ready_file": "ready"}
    rec = Recorder(cancel_when_file=tmp_path / "ready")
    outcome, rec = run(make_payload(tmp_path, "SleepBackend", spec), rec, mode=mode, grace_s=0.5)
    grandchild = int((tmp_path / "grandchild.pid").read_text())
    assert outcome.status == "cancelled"
    assert outcome.signal == signal.SIGKILL and outcome.exit_code is None
    assert outcome.duration_s >= 0.5  # the grace period was given
    assert not alive(grandchild)
    assert not group_alive(outcome.pid)


@pytest.mark.parametrize("mode", MODES)
def test_a_job_over_its_runtime_is_timed_out(mode, tmp_path):
    spec = {"seconds": 600, "ignore_sigterm": True, "grandchild": True}
    outcome, _ = run(make_payload(tmp_path, "SleepBackend", spec), mode=mode, max_runtime_s=0.5, grace_s=0.3)
    assert outcome.status == "timed_out" and outcome.error_code == "timed_out"
    assert "maximum runtime of 0.5 s" in outcome.error
    assert outcome.duration_s >= 0.8  # the runtime, then the grace period
    assert not alive(int((tmp_path / "grandchild.pid").read_text()))
    assert not group_alive(outcome.pid)


def test_a_grandchild_left_behind_by_a_finished_job_is_killed(tmp_path):
    spec = {"seconds": 0.1, "grandchild": True}
    outcome, _ = run(make_payload(tmp_path, "SleepBackend", spec), grace_s=2)
    assert outcome.status == "succeeded"
    assert not alive(int((tmp_path / "grandchild.pid").read_text()))


def test_a_failing_callback_propagates_but_kills_the_job_first(tmp_path):
    payload = make_payload(tmp_path, "SleepBackend", {"seconds": 600, "grandchild": True, "ready_file": "ready"})
    rec = Recorder()

    def broken_heartbeat() -> None:
        raise ConnectionError("database is down")

    with pytest.raises(ConnectionError):
        supervise(
            payload,
            heartbeat=broken_heartbeat,
            should_cancel=rec.should_cancel,
            on_log=rec.on_log,
            on_metric=rec.on_metric,
            on_start=rec.on_start,
            max_runtime_s=None,
            grace_s=1,
            heartbeat_s=0.3,
        )
    assert not group_alive(rec.started_pid)
    assert not alive(int((tmp_path / "grandchild.pid").read_text()))


def test_kill_process_group_escalates_to_sigkill(tmp_path):
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        ["sh", "-c", f"trap '' TERM; sleep 300 & touch {ready}; sleep 300; wait"], start_new_session=True
    )
    try:
        wait_until(ready.exists, 20, "the shell to ignore SIGTERM and start its children")
        started = time.monotonic()
        assert kill_process_group(proc.pid, grace_s=0.3)
        assert time.monotonic() - started >= 0.3
        assert proc.wait(5) == -signal.SIGKILL
        assert not group_alive(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_kill_process_group_refuses_our_own_group():
    with pytest.raises(ValueError):
        kill_process_group(os.getpgrp(), 0)


# --- orphans and a dying supervisor ---------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_find_orphans_finds_a_running_job_by_its_recorded_session(mode, tmp_path):
    payload = make_payload(tmp_path, "SleepBackend", {"seconds": 600, "ready_file": "ready", "grandchild": True})
    handle = launch(payload, mode)
    try:
        wait_until((tmp_path / "ready").exists, 20, "the job to start")
        found = find_orphans()
        assert handle.pid in found.get(payload["job_id"], [])
        assert int((tmp_path / "grandchild.pid").read_text()) in found[payload["job_id"]]
        assert all(not str(job_id).startswith("zygote") for job_id in found)
    finally:
        kill_process_group(handle.pgid, 1)
        handle.wait(5)
        handle.close()


@pytest.mark.parametrize("mode", MODES)
def test_a_job_stops_by_itself_when_its_supervisor_lets_go(mode, tmp_path):
    spec = {"seconds": 600, "ignore_sigterm": True, "grandchild": True, "ready_file": "ready"}
    handle = launch(make_payload(tmp_path, "SleepBackend", spec), mode, grace_s=0.5)
    wait_until((tmp_path / "ready").exists, 20, "the job to start")
    grandchild = int((tmp_path / "grandchild.pid").read_text())
    handle.close()  # what the OS does to our end when the worker process dies
    wait_until(lambda: not group_alive(handle.pgid), 10, "the abandoned job to stop")
    assert not alive(grandchild)
    assert "supervising process is gone" in (tmp_path / "log.txt").read_text()


def _supervise_then_hang(payload: dict, pid_file: str) -> None:
    handle = launch(payload, "fork", grace_s=0.5)
    Path(pid_file).write_text(str(handle.pid))
    threading.Event().wait()  # until the test kills this process


def test_a_job_stops_by_itself_when_its_worker_is_killed(tmp_path):
    spec = {"seconds": 600, "grandchild": True, "ready_file": "ready"}
    pid_file = tmp_path / "job.pid"
    worker = multiprocessing.get_context("fork").Process(
        target=_supervise_then_hang, args=(make_payload(tmp_path, "SleepBackend", spec), str(pid_file)), daemon=True
    )
    worker.start()
    try:
        wait_until((tmp_path / "ready").exists, 60, "the job to start")
        job_pid = int(pid_file.read_text())
        grandchild = int((tmp_path / "grandchild.pid").read_text())
        os.kill(worker.pid, signal.SIGKILL)
        wait_until(lambda: not group_alive(job_pid), 10, "the orphaned job to stop")
        assert not alive(grandchild)
    finally:
        worker.kill()
        worker.join(5)


# --- daemonic callers -------------------------------------------------------------------


def _supervise_in_daemon(payload: dict, queue) -> None:
    try:
        outcome, _ = run(payload, mode="fork")
        queue.put(("ok", outcome.status, outcome.result, multiprocessing.current_process().daemon))
    except BaseException as exc:  # noqa: BLE001 - report to the test
        queue.put(("error", repr(exc), None, None))


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_fork_mode_works_from_a_daemonic_process(start_method, tmp_path):
    ctx = multiprocessing.get_context(start_method)
    queue = ctx.Queue()
    payload = make_payload(tmp_path, "OkBackend", {"echo": "from a daemon"})
    proc = ctx.Process(target=_supervise_in_daemon, args=(payload, queue), daemon=True)
    proc.start()
    try:
        kind, status, result, was_daemon = queue.get(timeout=120)
    finally:
        proc.join(30)
    assert kind == "ok", status
    assert was_daemon is True
    assert status == "succeeded" and result["echo"] == "from a daemon"


# --- the runner on its own ------------------------------------------------------------


def test_the_runner_cli_writes_a_result(tmp_path):
    payload = make_payload(tmp_path, "OkBackend", {"echo": "cli"})
    (tmp_path / "payload.json").write_text(json.dumps(payload))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run(
        [sys.executable, "-m", "neuron_workers.process.runner", str(tmp_path / "payload.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    verdict = json.loads((tmp_path / "result.json").read_text())
    assert verdict == {"ok": True, "result": {**verdict["result"], "echo": "cli"}}
    assert "ok job" in proc.stdout


def test_run_payload_in_process_never_raises(tmp_path):
    payload = make_payload(tmp_path, "CrashBackend", {"how": "raise"})
    assert runner.run_payload(payload) == 1
    verdict = json.loads((tmp_path / "result.json").read_text())
    assert verdict["ok"] is False and verdict["code"] == "error" and "boom" in verdict["traceback"]


def test_kill_orphans_kills_only_jobs_not_kept(tmp_path):
    # A private tag prefix: other test sessions on this machine run real "job-" tags.
    prefix = f"suptest{os.getpid()}-"
    handles = {}
    for name in ("keep", "kill"):
        workdir = tmp_path / name
        payload = make_payload(workdir, "SleepBackend", {"seconds": 600, "ready_file": "ready", "grandchild": True})
        payload["env"]["NEURON_PROCESS_TAG"] = f"{prefix}{payload['job_id']}"
        handles[name] = (payload["job_id"], launch(payload, "fork"))
        wait_until((workdir / "ready").exists, 20, "the job to start")
    (keep_id, keep), (kill_id, kill) = handles["keep"], handles["kill"]
    try:
        killed = kill_orphans(keep={keep_id}, grace_s=1, tag_prefix=prefix)
        assert set(killed) == {kill_id} and kill.pid in killed[kill_id]
        assert len(killed[kill_id]) >= 2  # the job and its grandchild (sh)
        assert kill.wait(5) and not group_alive(kill.pgid)
        assert group_alive(keep.pgid)
    finally:
        for _, handle in handles.values():
            kill_process_group(handle.pgid, 0)
            handle.wait(5)
            handle.close()


def test_non_finite_floats_in_a_result_become_null(tmp_path):
    verdict = {"ok": True, "result": {"loss": float("nan"), "xs": [float("inf"), 1.5]}}
    runner.write_json_atomic(tmp_path / "r.json", verdict)
    assert json.loads((tmp_path / "r.json").read_text()) == {"ok": True, "result": {"loss": None, "xs": [None, 1.5]}}


def test_concurrent_fork_jobs_from_threads_each_get_their_own_result(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    payloads = [make_payload(tmp_path / f"job{i}", "OkBackend", {"echo": i}) for i in range(8)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(lambda p: run(p)[0], payloads))
    assert [o.status for o in outcomes] == ["succeeded"] * 8
    assert [o.result["echo"] for o in outcomes] == list(range(8))
    assert [o.result["process_tag"] for o in outcomes] == [f"job-{p['job_id']}" for p in payloads]
    assert len({o.pid for o in outcomes}) == 8
