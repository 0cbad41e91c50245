"""Warm runners: a fork-mode job process that ended a reusable job cleanly, alone in
its group, runs the same team's next job instead of exiting (neuron_workers.process.warm).

Real zygotes and processes; jobs are the tiny fake backends of tests/fake_backends.py
(ReusableBackend reports its pid and how many jobs its process ran). The end-to-end
test at the bottom runs real cpu inference jobs through a Celery worker.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest

from neuron_workers.agent import ProcessCpu
from neuron_workers.process import Zygote, find_orphans, group_alive, launch
from tests.polling import wait_until
from tests.test_supervisor import Recorder, alive, make_payload, run

# recvmsg(2): a runner blocked in it has told the zygote it is idle (see wait_idle).
_RECVMSG = {"x86_64": 47, "aarch64": 212}


@pytest.fixture
def zygote():
    """A zygote of our own (no preload: the fake backends need none), so idle runners
    of other tests never fill its pool of warm runners."""
    z = Zygote(preload=(), warm_runners=4, runner_jobs=3)
    z.start()
    yield z
    z.close()


def run_job(zygote: Zygote, workdir: Path, backend: str = "ReusableBackend", spec: dict | None = None,
            key: str | None = "team-1", rec: Recorder | None = None, **kw):
    payload = make_payload(workdir, backend, spec)
    if key is not None:
        payload["reuse_key"] = key
    outcome, rec = run(payload, rec, zygote=zygote, **kw)
    return payload, outcome, rec


def wait_idle(pid: int) -> None:
    """Wait until runner ``pid`` waits for its next job. It tells the zygote it is idle
    and then blocks in recvmsg; once it is there, the zygote reads that message before
    any request sent later, so the next job of the same key goes to it."""
    number = _RECVMSG.get(platform.machine())
    if number is None:
        pytest.skip(f"recvmsg's syscall number on {platform.machine()} is not known here")

    def idle() -> bool:
        with open(f"/proc/{pid}/syscall") as fh:
            return fh.read().split()[0] == str(number)

    wait_until(idle, 10, f"runner {pid} to wait for its next job")


# --- reuse --------------------------------------------------------------------------


def test_the_next_job_of_the_same_key_runs_in_the_same_process(zygote, tmp_path):
    first = make_payload(tmp_path / "a", "ReusableBackend", {"echo": "first"}, reuse_key="team-1")
    first["env"]["NEURONDECK_TEST_FIRST_ONLY"] = "1"
    handle = launch(first, "fork", zygote=zygote)
    assert handle.wait(20)
    assert handle.released and handle.returncode == 0
    handle.close()
    wait_idle(handle.pid)

    second, outcome, _ = run_job(zygote, tmp_path / "b", spec={"echo": "second"})
    assert outcome.status == "succeeded", outcome
    result = outcome.result
    assert outcome.pid == result["pid"] == handle.pid and result["jobs_run"] == 2
    assert result["echo"] == "second" and result["job_id"] == second["job_id"]
    assert result["process_tag"] == f"job-{second['job_id']}"
    assert result["cwd"] == str((tmp_path / "b").resolve())
    assert "NEURONDECK_TEST_FIRST_ONLY" not in result["environ"]
    assert result["pid"] == result["pgid"] == result["sid"]
    assert (tmp_path / "a" / "result.json").exists() and (tmp_path / "b" / "artifacts" / "out.txt").exists()


def test_a_job_of_another_key_gets_another_process(zygote, tmp_path):
    _, first, _ = run_job(zygote, tmp_path / "a", key="team-1")
    wait_idle(first.pid)
    _, other, _ = run_job(zygote, tmp_path / "b", key="team-2")
    _, again, _ = run_job(zygote, tmp_path / "c", key="team-1")
    assert [o.status for o in (first, other, again)] == ["succeeded"] * 3
    assert other.pid != first.pid and other.result["jobs_run"] == 1
    assert again.pid == first.pid and again.result["jobs_run"] == 2


def test_a_job_of_the_same_key_with_other_inputs_gets_another_process(zygote, tmp_path):
    # A warm runner holds the model its last job used; another model would be a
    # private copy in it, where a fresh fork shares the zygote's.
    def job(name, model):
        payload = make_payload(tmp_path / name, "ReusableBackend", reuse_key="team-1",
                               inputs={"model_path": model, "model_format": "hf"})
        outcome, _ = run(payload, zygote=zygote)
        assert outcome.status == "succeeded", outcome
        return outcome.pid

    first = job("a", "/models/one")
    wait_idle(first)
    other = job("b", "/models/two")
    assert other != first
    wait_idle(other)
    assert job("c", "/models/one") == first
    wait_idle(first)
    assert job("d", "/models/two") == other


def test_a_runner_is_replaced_after_its_last_job(zygote, tmp_path):
    pids = []
    for name in "abcd":
        _, outcome, _ = run_job(zygote, tmp_path / name)
        assert outcome.status == "succeeded", outcome
        pids.append(outcome.pid)
        if name != "c":
            wait_idle(outcome.pid)
    # runner_jobs=3: the third job was its process's last.
    assert pids[:3] == [pids[0]] * 3 and pids[3] != pids[0]
    assert not alive(pids[0])


# --- no reuse -------------------------------------------------------------------------


@pytest.mark.parametrize("backend, spec", [
    ("ReusableBackend", {"fail": True}),
    ("OkBackend", {}),
    ("ReusableBackend", {"leave": "thread"}),
    ("ReusableBackend", {"leave": "child"}),
    ("ReusableBackend", {"leave": "orphan"}),
], ids=["failed", "backend-not-reusable", "left-a-thread", "left-a-child", "left-an-orphan"])
def test_a_process_that_may_not_run_another_job_exits(zygote, tmp_path, backend, spec):
    _, first, _ = run_job(zygote, tmp_path / "a", backend, spec)
    assert first.status == ("failed" if spec.get("fail") else "succeeded"), first
    # Not released: the zygote reaped it before reporting, and supervise() cleaned its group.
    assert not alive(first.pid) and not group_alive(first.pid)
    if spec.get("leave") in ("child", "orphan"):
        assert not alive(int((tmp_path / "a" / "child.pid").read_text()))
    _, second, _ = run_job(zygote, tmp_path / "b")
    assert second.status == "succeeded" and second.pid != first.pid and second.result["jobs_run"] == 1


def test_a_job_without_a_reuse_key_leaves_no_runner_behind(zygote, tmp_path):
    _, first, _ = run_job(zygote, tmp_path / "a", key=None)
    assert first.status == "succeeded"
    wait_until(lambda: not alive(first.pid), 10, "the runner without a key to exit")


@pytest.mark.parametrize("stop", ["cancel", "timeout"])
def test_a_job_asked_to_stop_ends_its_process_even_if_it_exits_cleanly(zygote, tmp_path, stop):
    # The job ignores STOP and SIGTERM's flag and returns normally after its second.
    spec = {"seconds": 1.0, "honour_stop": False, "ready_file": "ready"}
    options = ({"rec": Recorder(cancel_when_file=tmp_path / "a" / "ready")} if stop == "cancel"
               else {"max_runtime_s": 0.3})
    _, first, rec = run_job(zygote, tmp_path / "a", "ReusableSleepBackend", spec, grace_s=20, **options)
    assert first.status == {"cancel": "cancelled", "timeout": "timed_out"}[stop], first
    assert first.exit_code == 0 and "SIGTERM received" in rec.text
    assert not alive(first.pid)
    _, second, _ = run_job(zygote, tmp_path / "b")
    assert second.status == "succeeded" and second.pid != first.pid


# --- between jobs -----------------------------------------------------------------------


def test_an_idle_runner_carries_no_job_tag_holds_no_workdir_and_writes_no_log(zygote, tmp_path):
    first, outcome, _ = run_job(zygote, tmp_path / "a")
    pid = outcome.pid
    wait_idle(pid)
    log = (tmp_path / "a" / "log.txt").read_bytes()
    assert f"ok job {first['job_id']} starting".encode() in log
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1, 2)] == ["/dev/null"] * 3
    orphans = find_orphans()
    assert first["job_id"] not in orphans and all(pid not in pids for pids in orphans.values())

    second, again, _ = run_job(zygote, tmp_path / "b")
    assert again.pid == pid
    assert (tmp_path / "a" / "log.txt").read_bytes() == log
    assert f"ok job {second['job_id']} starting" in (tmp_path / "b" / "log.txt").read_text()


def test_a_reused_runner_stops_its_job_when_the_supervisor_lets_go(zygote, tmp_path):
    _, first, _ = run_job(zygote, tmp_path / "a")
    wait_idle(first.pid)
    spec = {"seconds": 600, "ignore_sigterm": True, "grandchild": True, "ready_file": "ready"}
    payload = make_payload(tmp_path / "b", "ReusableSleepBackend", spec, reuse_key="team-1")
    handle = launch(payload, "fork", grace_s=0.5, zygote=zygote)
    assert handle.pid == first.pid
    wait_until((tmp_path / "b" / "ready").exists, 20, "the second job to start")
    assert handle.pid in find_orphans().get(payload["job_id"], [])
    grandchild = int((tmp_path / "b" / "grandchild.pid").read_text())
    handle.close()  # what the OS does to our end when the worker process dies
    wait_until(lambda: not group_alive(handle.pgid), 10, "the abandoned job to stop")
    assert not alive(grandchild) and not alive(handle.pid)
    assert "supervising process is gone" in (tmp_path / "b" / "log.txt").read_text()


# --- the agent's per-job CPU ----------------------------------------------------------------


def _write_stat(root: Path, pid: int, ticks: int) -> None:
    # proc(5): after "(comm)": state ... utime(14) stime(15) cutime(16) cstime(17) ... rss(24)
    fields = ["S"] + ["0"] * 10 + [str(ticks), "0", "0", "0"] + ["0"] * 6 + ["100"]
    (root / str(pid)).mkdir(parents=True, exist_ok=True)
    (root / str(pid) / "stat").write_text(f"{pid} (python) {' '.join(fields)}\n")


def test_a_job_is_not_charged_the_cpu_its_predecessor_used_in_the_same_process(tmp_path):
    cpu = ProcessCpu(tmp_path)
    _write_stat(tmp_path, 4242, 0)
    assert cpu.read(4242, 1)[0] is None
    _write_stat(tmp_path, 4242, 500)
    first_pct, rss = cpu.read(4242, 1)
    assert first_pct is not None and first_pct > 0 and rss == 100 * os.sysconf("SC_PAGE_SIZE")
    _write_stat(tmp_path, 4242, 1500)  # the next job in the same process: no CPU % yet
    assert cpu.read(4242, 2) == (None, rss)
    assert cpu.read(4242, 2)[0] == 0.0  # measured from its own first reading, not job 1's
