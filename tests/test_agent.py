"""The host agent at its true edges: stand-in `neuron-ls` and `neuron-monitor`
executables on PATH (there is no Neuron hardware here), the real database and Redis.

Registration from every neuron-ls sample, the CPU fallback, heartbeats, restarting
neuron-monitor when it exits, skipping a malformed report line, /proc sampling for
CPU jobs and replay."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from django.utils import timezone

from jobs.lifecycle import services
from jobs.live import metrics
from jobs.models import Host
from live_support import TRN1, clean_streams, running_job  # noqa: F401 (fixture)
from neuron_workers import agent
from neuron_workers.readers.neuron_monitor import monitor_config
from tests.polling import wait_until
from tests.test_neuron_env import XLA_VERSIONS, needs_bare_python, stand_in_python

NEURON_LS = Path(__file__).resolve().parent / "data" / "neuron-ls"
LS_SAMPLES = sorted(p.name for p in NEURON_LS.glob("*.json"))


def stand_in(bin_dir: Path, name: str, body: str) -> Path:
    """An executable `name` in bin_dir running the Python `body`."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!{sys.executable}\nimport sys, os, json, time\n{body}\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def bin_dir(tmp_path, monkeypatch) -> Path:
    """A PATH holding only the stand-ins a test writes (no real neuron tools)."""
    path = tmp_path / "bin"
    path.mkdir()
    monkeypatch.setenv("PATH", str(path))
    monkeypatch.delenv("NEURONDECK_CPU_SLOTS", raising=False)
    return path


def neuron_ls_printing(bin_dir: Path, sample: Path) -> None:
    stand_in(bin_dir, "neuron-ls", f"""
if sys.argv[1:] != ["-j"]:
    sys.exit(2)
sys.stdout.write(open({str(sample)!r}).read())
""")


def expected_inventory(sample: Path) -> dict:
    raw = json.loads(sample.read_text())
    cores, next_core = [], 0
    for dev in sorted(raw, key=lambda d: d["neuron_device"]):
        ids = dev.get("neuroncore_ids") or list(range(next_core, next_core + dev["nc_count"]))
        next_core = max(ids) + 1
        cores += ids
    return {"devices": len(raw), "cores": sorted(cores), "memory": sum(d["memory_size"] for d in raw)}


# --- registration ------------------------------------------------------------------

@pytest.mark.parametrize("name", LS_SAMPLES)
def test_it_registers_a_host_from_each_neuron_ls_sample(db, bin_dir, monkeypatch, name):
    sample = NEURON_LS / name
    instance_type = name.split("-")[0].removesuffix(".json")
    monkeypatch.setenv("NEURONDECK_INSTANCE_TYPE", instance_type)
    neuron_ls_printing(bin_dir, sample)

    host, _ = agent.register(agent.AgentOptions(name=f"ls-{instance_type}"))

    want = expected_inventory(sample)
    host.refresh_from_db()
    assert host.instance_type == instance_type
    assert host.family == instance_type.split(".")[0]
    assert host.device_count == want["devices"]
    assert host.core_ids == want["cores"]
    assert host.device_memory_bytes == want["memory"]
    assert host.backend == "neuron"
    assert host.state == Host.State.ONLINE and host.last_heartbeat is not None
    assert host.memory_bytes > 0  # from /proc/meminfo
    assert len(host.inventory["devices"]) == want["devices"]
    assert host.replay is False


def test_registering_again_updates_the_inventory_but_keeps_a_drained_host_draining(db, bin_dir, monkeypatch):
    monkeypatch.setenv("NEURONDECK_INSTANCE_TYPE", "inf2.xlarge")
    neuron_ls_printing(bin_dir, NEURON_LS / "inf2.xlarge.json")
    Host.objects.create(name="again", family="cpu", core_ids=[0], state=Host.State.DRAINING)

    host, _ = agent.register(agent.AgentOptions(name="again"))

    host.refresh_from_db()
    assert host.state == Host.State.DRAINING
    assert (host.family, host.core_ids, host.backend) == ("inf2", [0, 1], "neuron")
    assert Host.objects.filter(name="again").count() == 1


def test_a_host_whose_neuron_ls_finds_no_device_registers_as_a_cpu_host_with_its_slots(db, bin_dir, monkeypatch):
    stand_in(bin_dir, "neuron-ls", "sys.stderr.write('Failed to discover neuron devices\\n'); sys.exit(1)")
    monkeypatch.setenv("NEURONDECK_CPU_SLOTS", "3")

    host, inventory = agent.register(agent.AgentOptions(name="cpu-slots"))

    host.refresh_from_db()
    assert (host.family, host.backend, host.device_count) == ("cpu", "cpu", 0)
    assert host.core_ids == [0, 1, 2]
    assert host.memory_bytes > 0
    assert not inventory.is_neuron


def test_a_host_without_neuron_ls_uses_its_cpu_count(db, bin_dir):
    host, _ = agent.register(agent.AgentOptions(name="no-tools"))

    host.refresh_from_db()
    assert host.family == "cpu"
    assert host.core_ids == list(range(os.cpu_count()))


@needs_bare_python
def test_a_neuron_host_registers_what_its_job_python_reports(db, bin_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NEURONDECK_INSTANCE_TYPE", "inf2.xlarge")
    monkeypatch.setenv("NEURONDECK_JOB_PYTHON", str(stand_in_python(tmp_path / "neuron-venv", XLA_VERSIONS)))
    monkeypatch.setenv("NEURONDECK_NEURON_SDK", "2.31.0")
    neuron_ls_printing(bin_dir, NEURON_LS / "inf2.xlarge.json")

    host, inventory = agent.register(agent.AgentOptions(name="inf2-sw"))

    host.refresh_from_db()
    software = host.inventory["software"]
    assert software["packages"]["torch"] == "2.9.0" and software["packages"]["torch_neuronx"] == "2.9.0.2.15.32035"
    assert (software["framework"], software["sdk_version"]) == ("xla", "2.31.0")
    identity = "torch-neuronx-2.9.0.2.15.32035+neuronx-cc-2.27.5334.0"
    assert host.inventory["compiler_version"] == identity == inventory.software["compiler_version"]
    # The compile cache key at submit uses the version the artifact will record.
    assert services.compiler_version("inf2") == identity


def test_a_job_python_that_cannot_run_is_registered_with_the_error(db, bin_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NEURONDECK_INSTANCE_TYPE", "inf2.xlarge")
    monkeypatch.setenv("NEURONDECK_JOB_PYTHON", str(tmp_path / "no-venv" / "bin" / "python"))
    neuron_ls_printing(bin_dir, NEURON_LS / "inf2.xlarge.json")

    host, _ = agent.register(agent.AgentOptions(name="inf2-broken"))

    host.refresh_from_db()
    assert host.family == "inf2" and "cannot run" in host.inventory["software"]["error"]


def test_the_tools_are_found_in_the_neuron_bin_dir_when_path_lacks_it(db, bin_dir, tmp_path, monkeypatch):
    # Under systemd PATH lacks /opt/aws/neuron/bin; the host registered as a CPU host.
    monkeypatch.setenv("NEURONDECK_INSTANCE_TYPE", "trn1.32xlarge")
    neuron_bin = tmp_path / "opt-aws-neuron-bin"
    neuron_ls_printing(neuron_bin, NEURON_LS / "trn1.32xlarge.json")
    monitor_stand_in(neuron_bin, tmp_path, lines=1)
    opts = agent.AgentOptions(name="trn1-bin", neuron_bin_dir=neuron_bin)

    host, inventory = agent.register(opts)
    source, monitor = agent.samples_for(opts, inventory, threading.Event(), tmp_path)

    assert host.family == "trn1" and len(host.core_ids) == 32
    assert monitor is not None and monitor.argv[0] == str(neuron_bin / "neuron-monitor")


@pytest.mark.parametrize("value", ["zero", "0", "-2"])
def test_a_bad_cpu_slots_setting_is_refused_with_its_name(bin_dir, monkeypatch, value):
    monkeypatch.setenv("NEURONDECK_CPU_SLOTS", value)
    with pytest.raises(ValueError, match="NEURONDECK_CPU_SLOTS"):
        agent.cpu_slots()


# --- heartbeats ---------------------------------------------------------------------

def test_a_heartbeat_brings_an_offline_host_back_online(db):
    old = timezone.now() - timezone.timedelta(minutes=10)
    host = Host.objects.create(name="sleepy", state=Host.State.OFFLINE, last_heartbeat=old)

    assert agent.heartbeat(host.pk)

    host.refresh_from_db()
    assert host.state == Host.State.ONLINE
    assert host.last_heartbeat > old


def test_a_heartbeat_never_undrains_a_host(db):
    host = Host.objects.create(name="draining", state=Host.State.DRAINING)

    agent.heartbeat(host.pk)

    host.refresh_from_db()
    assert host.state == Host.State.DRAINING and host.last_heartbeat is not None


def test_the_heartbeat_thread_brings_the_host_online_and_keeps_it_fresh(transactional_db):
    host = Host.objects.create(name="beating", state=Host.State.OFFLINE,
                               last_heartbeat=timezone.now() - timezone.timedelta(hours=1))
    stop = threading.Event()
    beat = agent.HeartbeatThread(host.pk, 0.05, stop)
    beat.start()
    try:
        wait_until(lambda: Host.objects.get(pk=host.pk).state, 10, "the host to be online",
                   until=lambda state: state == Host.State.ONLINE)
        first = Host.objects.get(pk=host.pk).last_heartbeat
        wait_until(lambda: Host.objects.get(pk=host.pk).last_heartbeat, 10, f"a beat after {first}",
                   until=lambda beat: beat > first)
    finally:
        stop.set()
        beat.join(5)
    assert beat.beats >= 2


# --- neuron-monitor ------------------------------------------------------------------

def monitor_stand_in(bin_dir: Path, tmp_path: Path, *, lines: int, garbage: bool = False,
                     then_sleep: bool = False) -> Path:
    """A neuron-monitor that records each start (argv and config) and prints `lines`
    reports of the trn1 sample (plus a malformed line), then exits or sleeps."""
    record = tmp_path / "monitor-starts.jsonl"
    stand_in(bin_dir, "neuron-monitor", f"""
config = sys.argv[sys.argv.index("-c") + 1]
with open({str(record)!r}, "a") as out:
    out.write(json.dumps({{"argv": sys.argv[1:], "config": json.load(open(config))}}) + "\\n")
reports = open({str(TRN1)!r}).read().splitlines()[:{lines}]
print(reports[0], flush=True)
if {garbage!r}:
    print('{{"neuron_runtime_data": [', flush=True)
for line in reports[1:]:
    print(line, flush=True)
if {then_sleep!r}:
    time.sleep(60)
""")
    return record


def test_it_restarts_neuron_monitor_when_it_exits(bin_dir, tmp_path):
    record = monitor_stand_in(bin_dir, tmp_path, lines=2)
    config = tmp_path / "monitor.json"
    config.write_text(json.dumps(monitor_config()))
    stop = threading.Event()
    monitor = agent.MonitorProcess([str(bin_dir / "neuron-monitor"), "-c", str(config)], stop, backoff=(0.05, 0.2))

    got = []
    for line in monitor.lines():
        got.append(line)
        if len(got) == 6:
            stop.set()
            break

    assert monitor.starts >= 3
    starts = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(starts) == monitor.starts
    assert all(s["argv"] == ["-c", str(config)] and s["config"] == monitor_config() for s in starts)
    assert [json.loads(line)["instance_info"]["instance_type"] for line in got] == ["trn1.32xlarge"] * 6


def test_monitor_backoff_grows_and_a_missing_binary_is_retried_not_fatal(tmp_path, caplog):
    stop = threading.Event()
    monitor = agent.MonitorProcess([str(tmp_path / "missing-monitor")], stop, backoff=(0.01, 0.04))
    waits = []
    stop.wait = lambda delay: waits.append(delay) or len(waits) >= 4  # type: ignore[method-assign]

    assert list(monitor.lines()) == []

    assert waits == [0.01, 0.02, 0.04, 0.04]
    assert monitor.starts == 0
    assert "cannot start" in caplog.text


def test_the_agent_streams_monitor_reports_skipping_a_malformed_line(transactional_db, bin_dir, tmp_path,
                                                                     monkeypatch, clean_streams, caplog):
    monkeypatch.setenv("NEURONDECK_INSTANCE_TYPE", "trn1.32xlarge")
    neuron_ls_printing(bin_dir, NEURON_LS / "trn1.32xlarge.json")
    monitor_stand_in(bin_dir, tmp_path, lines=3, garbage=True, then_sleep=True)
    caplog.set_level(logging.INFO, logger="neuron_workers.agent")
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(agent.AgentOptions(name="mon-host", heartbeat_s=0.2), stop))
    thread.start()
    try:
        wait_until(lambda: clean_streams.xlen(metrics.host_key("mon-host")), 20, "3 samples in the host's stream",
                   until=lambda length: length >= 3)
    finally:
        stop.set()
        thread.join(15)
    assert not thread.is_alive()

    points = [json.loads(f[b"d"]) for _, f in clean_streams.xrange(metrics.host_key("mon-host"))]
    assert len(points) == 3  # the malformed line between the first and second report is not a sample
    assert points[0]["kind"] == "neuron" and points[0]["util"]["0"] == pytest.approx(85.89)
    assert "skipped a malformed neuron-monitor line" in caplog.text
    host = Host.objects.get(name="mon-host")
    assert host.family == "trn1" and len(host.core_ids) == 32 and not host.replay


# --- CPU hosts ------------------------------------------------------------------------

def test_a_cpu_job_gets_live_points_from_its_own_process(cast, clean_streams):
    host = Host.objects.create(name="cpu-live", family="cpu", core_ids=[0, 1], backend="cpu",
                               last_heartbeat=timezone.now())
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        job = running_job(cast.vision, cast.bob, host, start=0, cores=2, pid=busy.pid)
        stop = threading.Event()
        samples = agent.os_samples(stop, period=0.4)
        worker = agent.Agent(host)
        for _ in range(3):
            assert worker.handle(next(samples))
        stop.set()
    finally:
        busy.kill()
        busy.wait()

    point = json.loads(clean_streams.xrevrange(metrics.job_key(job.pk), count=1)[0][1][b"d"])
    assert point["kind"] == "host" and point["host"] == "cpu-live"
    # One busy CPU over the job's two slots: up to 50 % each (less on a loaded machine).
    assert set(point["util"]) == {"0", "1"} and 1 < point["util"]["0"] <= 100
    assert point["host_mem"] > 0
    host_point = json.loads(clean_streams.xrevrange(metrics.host_key("cpu-live"), count=1)[0][1][b"d"])
    assert host_point["kind"] == "host" and host_point["job"] == {"0": job.pk, "1": job.pk}
    assert host_point["util"]["0"] == point["util"]["0"]
    assert host_point["vcpu"] is not None and host_point["host_mem"]["total"] > 0


# --- replay ---------------------------------------------------------------------------

def test_replay_registers_the_recorded_host_marked_as_a_replay(db):
    host, inventory = agent.register(agent.AgentOptions(name="replayed", replay=TRN1))

    host.refresh_from_db()
    assert host.replay is True
    assert (host.family, host.instance_type, host.device_count) == ("trn1", "trn1.32xlarge", 16)
    assert host.core_ids == list(range(32))
    assert host.device_memory_bytes == 512 * 1024**3


def test_replayed_runtimes_are_matched_to_local_jobs_by_core_range_not_their_recorded_tags(cast, clean_streams):
    host, _ = agent.register(agent.AgentOptions(name="replay-attr", replay=TRN1))
    job = running_job(cast.vision, cast.bob, host, start=0, cores=8, pid=48377)  # the recorded job-42's pid
    stop = threading.Event()
    sample = next(agent.replay_samples(TRN1, stop, loop=False))

    host_pt, job_pts = agent.Agent(host, replay_mode=True).points(sample)

    assert sample["replay"] is True and host_pt["replay"] is True
    assert set(job_pts) == {job.pk}
    assert sorted(job_pts[job.pk]["util"], key=int) == [str(c) for c in range(8)]
    assert job_pts[job.pk]["replay"] is True
    # The recorded job-42 (cores 8-9) matches no job here: an orphan, even though
    # its recorded pid equals this job's worker pid.
    assert [(o["tag"], o["cores"]) for o in host_pt["orphans"]] == [("job-42", [8, 9])]


def test_the_command_refuses_a_missing_replay_file(db, tmp_path):
    from django.core.management import CommandError, call_command

    with pytest.raises(CommandError, match="--replay: no such file"):
        call_command("agent", "--replay", str(tmp_path / "nope.jsonl"), "--once")


def test_the_agent_rereads_its_jobs_at_once_for_a_new_runtime_but_not_for_a_known_orphan(
        cast, clean_streams, django_assert_num_queries):
    from live_support import neuron_host, report, runtime
    from neuron_workers.readers.neuron_monitor import parse_report

    host = neuron_host("refresh-host")
    first = running_job(cast.vision, cast.bob, host, start=0, cores=8)
    now = [100.0]
    worker = agent.Agent(host, clock=lambda: now[0])
    orphan = runtime(None, 777, {30: 5.0})
    with django_assert_num_queries(1):
        worker.handle(parse_report(report(runtimes=[runtime(f"job-{first.pk}", 1, {0: 50.0}), orphan])))
    now[0] += 2
    with django_assert_num_queries(1):  # the orphan is new: re-read once, then it is known
        worker.handle(parse_report(report(runtimes=[runtime(f"job-{first.pk}", 1, {0: 50.0}), orphan])))
    now[0] += 2
    with django_assert_num_queries(0):
        worker.handle(parse_report(report(runtimes=[runtime(f"job-{first.pk}", 1, {0: 50.0}), orphan])))

    second = running_job(cast.vision, cast.bob, host, start=8, cores=8)
    now[0] += 0.5  # well inside the 5 s between regular re-reads
    with django_assert_num_queries(1):
        worker.handle(parse_report(report(runtimes=[runtime(f"job-{second.pk}", 2, {8: 70.0}), orphan])))

    point = json.loads(clean_streams.xrevrange(metrics.job_key(second.pk), count=1)[0][1][b"d"])
    assert point["util"]["8"] == 70.0  # its very first report is already its own


def test_a_gang_ranks_runtime_on_another_host_is_its_job_not_an_orphan_and_only_rank_0s_host_charts_it(
        cast, clean_streams):
    from jobs.lifecycle import gangs, states
    from jobs.models import Job
    from live_support import neuron_host, report, runtime
    from neuron_workers.readers.neuron_monitor import parse_report

    hosts = [neuron_host("gang-0"), neuron_host("gang-1")]
    job = Job.objects.create(team=cast.vision, user=cast.bob, kind="finetune", family="trn1", cores=64, host_count=2)
    states.mark_queued_many([(job.pk, hosts[0].pk, 0, "placed", False)], {job.pk: [(h.pk, 0, 32) for h in hosts]})
    for host in hosts:
        gangs.claim_rank(job.pk, host.pk)
    sample = parse_report(report(runtimes=[runtime(f"job-{job.pk}", 4242, {0: 80.0, 1: 60.0})]))

    host_pt, job_pts = agent.Agent(hosts[1]).points(sample)
    assert host_pt["orphans"] == [] and host_pt["job"]["0"] == job.pk  # rank 1's host: its cores are the job's
    assert job_pts == {}  # the job's charts follow rank 0's host
    host_pt, job_pts = agent.Agent(hosts[0]).points(sample)
    assert host_pt["orphans"] == [] and job_pts[job.pk]["util"]["0"] == 80.0
