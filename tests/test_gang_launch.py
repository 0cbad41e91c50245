"""The command line and environment a gang's host runs (no Neuron hardware here: the
neuron backend is checked at this seam), and the gang rules that need no worker."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from jobs.lifecycle import gangs, scheduler, states
from jobs.models import CoreAllocation, GangMember, Host, Job, JobEvent, Kind
from neuron_workers.gang_execution import rank_payload, rank_workdir
from neuron_workers import config
from neuron_workers.gang_execution import ending_of
from neuron_workers.process import gang as gang_launcher
from neuron_workers.process.gang import torchrun_argv
from neuron_workers.process.outcome import outcome_of
from neuron_workers.process.launch import child_env

S = Job.Status
M = GangMember.State


def trn1(name: str, address: str) -> Host:
    return Host.objects.create(name=name, family="trn1", instance_type="trn1.32xlarge", core_ids=list(range(32)),
                               device_count=16, backend="neuron", address=address, network="pg-a",
                               last_heartbeat=timezone.now())


def gang(cast, hosts: list[Host], **fields) -> Job:
    fields.setdefault("spec", {"steps": 5})
    job = Job.objects.create(team=cast.vision, user=cast.bob, kind=Kind.FINETUNE, family=hosts[0].family,
                             cores=len(hosts) * len(hosts[0].core_ids), host_count=len(hosts), **fields)
    states.event(job.pk, "pending", "submitted")
    return job


def place(job: Job, hosts: list[Host]) -> None:
    """The placement as the dispatcher writes it (states.mark_queued_many with the gang's ranks)."""
    per = job.cores // len(hosts)
    assert states.mark_queued_many([(job.pk, hosts[0].pk, 0, "placed", False)],
                                   {job.pk: [(h.pk, 0, per) for h in hosts]}) == {job.pk}


@pytest.mark.django_db
def test_a_neuron_gang_host_runs_torchrun_with_one_rank_per_core_and_the_neuron_multi_node_environment(
        cast, settings, _storage):
    settings.GANG_PORT_BASE = 41000
    hosts = [trn1("trn1-a", "10.0.0.11"), trn1("trn1-b", "10.0.0.12")]
    job = gang(cast, hosts)
    place(job, hosts)
    claimed = gangs.claim_rank(job.pk, hosts[1].pk)
    assert claimed is not None
    job, member = claimed
    assert (job.status, job.attempts, member.rank, member.state) == (S.RUNNING, 1, 1, M.RUNNING)
    workdir = rank_workdir(job.pk, 1, 1)
    payload = rank_payload(job, member, gangs.members_of(job.pk), workdir)
    port = 41000 + 2 * ((job.pk * 8 + 1) % 500)
    assert payload["gang"]["port"] == port and payload["backend"] == "neuron"
    assert torchrun_argv("/opt/venv/bin/python", payload["gang"], workdir / "payload.json") == [
        "/opt/venv/bin/python", "-m", "torch.distributed.run",
        "--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "32",
        "--rdzv-backend", "static", "--rdzv-endpoint", f"10.0.0.11:{port}", "--rdzv-id", f"job-{job.pk}-1",
        "--rdzv-conf", "timeout=600", "--local-addr", "10.0.0.12", "--max-restarts", "0",
        "-m", "neuron_workers.process.runner", str(workdir / "payload.json"),
    ]
    env = child_env(payload)
    assert env["NEURON_RT_VISIBLE_CORES"] == "0-31" and env["NEURONDECK_JOB_CORES"] == "32"
    assert env["NEURON_RT_ROOT_COMM_ID"] == f"10.0.0.11:{port + 1}"
    assert (env["FI_PROVIDER"], env["FI_EFA_USE_DEVICE_RDMA"], env["FI_EFA_FORK_SAFE"]) == ("efa", "1", "1")
    assert env["NEURONDECK_GANG_HOSTS"] == "10.0.0.11,10.0.0.12" and env["OMP_NUM_THREADS"] == "1"
    assert env["NEURON_PROCESS_TAG"] == f"job-{job.pk}"
    assert payload["cores"] == "0-31" and "reuse_key" not in payload


@pytest.mark.django_db
def test_a_cpu_gang_host_runs_one_process_with_its_cores_as_threads(cast, settings, _storage):
    hosts = [Host.objects.create(name=n, family="cpu", core_ids=[0, 1, 2], backend="cpu", last_heartbeat=timezone.now())
             for n in ("cpu-a", "cpu-b")]
    job = gang(cast, hosts)
    place(job, hosts)
    job, member = gangs.claim_rank(job.pk, hosts[0].pk)
    payload = rank_payload(job, member, gangs.members_of(job.pk), rank_workdir(job.pk, 1, 0))
    argv = torchrun_argv(sys.executable, payload["gang"], "p.json")
    assert argv[argv.index("--nproc-per-node") + 1] == "1" and argv[argv.index("--node-rank") + 1] == "0"
    # No address reported: the host's name is where the others reach it.
    assert argv[argv.index("--rdzv-endpoint") + 1].startswith("cpu-a:")
    assert payload["env"]["OMP_NUM_THREADS"] == "3" and "FI_PROVIDER" not in payload["env"]
    assert rank_workdir(job.pk, 1, 0).name == "attempt-1" and rank_workdir(job.pk, 1, 1).name == "rank-1"


@pytest.mark.django_db
def test_claims_start_the_job_once_and_a_duplicate_or_stray_delivery_claims_nothing(cast, _storage):
    hosts = [trn1("trn1-a", ""), trn1("trn1-b", ""), trn1("trn1-c", "")]
    job = gang(cast, hosts[:2])
    place(job, hosts[:2])
    assert gangs.claim_rank(job.pk, hosts[1].pk) is not None
    assert gangs.claim_rank(job.pk, hosts[1].pk) is None  # the same message again
    assert gangs.claim_rank(job.pk, hosts[2].pk) is None  # a host outside the gang
    assert states.claim(job.pk, hosts[0].pk) is None  # the one-host claim never takes a gang
    assert gangs.claim_rank(job.pk, hosts[0].pk) is not None
    job.refresh_from_db()
    assert job.attempts == 1 and job.attempt_rows.count() == 1 and job.attempt_rows.get().cores == 64
    assert list(JobEvent.objects.filter(job=job, kind=S.RUNNING).values_list("message", flat=True)) == [
        "started on 2 hosts: trn1-a, trn1-b"]


@pytest.mark.django_db
def test_the_reaper_gives_up_a_gang_whose_rank_stopped_heartbeating_and_names_it(cast, settings, _storage):
    settings.JOB_LEASE_S = 60
    hosts = [trn1("trn1-a", ""), trn1("trn1-b", "")]
    job = gang(cast, hosts, max_attempts=1)
    place(job, hosts)
    gangs.claim_rank(job.pk, hosts[0].pk)
    gangs.claim_rank(job.pk, hosts[1].pk)
    assert scheduler.reap()["failed"] == 0  # both fresh
    GangMember.objects.filter(job=job, rank=1).update(heartbeat_at=timezone.now() - timedelta(seconds=61))
    scheduler.reap()
    job.refresh_from_db()
    assert job.status == S.FAILED and job.failure == "worker_lost"
    assert job.reason.startswith("rank 1 on trn1-b was lost: no heartbeat from its worker for 60 s")
    assert "gave up after 1 attempts" in job.reason
    assert not CoreAllocation.objects.filter(job=job).exists()
    # The finished gang keeps its ranks for the page: rank 1 lost, rank 0 told to stop.
    assert list(GangMember.objects.filter(job=job).values_list("rank", "state")) == [(0, M.RUNNING), (1, M.FAILED)]
    assert gangs.stop_reason(job.pk, 1, GangMember.objects.get(job=job, rank=0).pk) == \
        "the job is no longer running this attempt"


@pytest.mark.django_db
def test_a_queued_gang_whose_host_went_offline_is_requeued(cast, settings, _storage):
    settings.QUEUED_RESEND_AFTER_S = 0
    hosts = [trn1("trn1-a", ""), trn1("trn1-b", "")]
    job = gang(cast, hosts)
    place(job, hosts)
    Host.objects.filter(pk=hosts[1].pk).update(state=Host.State.OFFLINE)
    Job.objects.filter(pk=job.pk).update(queued_at=timezone.now() - timedelta(seconds=5))
    assert scheduler.reap()["requeued"] == 1
    job.refresh_from_db()
    assert job.status == S.PENDING and "rank 1 on trn1-b" in job.reason
    assert not GangMember.objects.filter(job=job).exists() and not CoreAllocation.objects.filter(job=job).exists()


# --- the job page and the API --------------------------------------------------------

def _running_gang_with_a_lost_rank(cast) -> Job:
    hosts = [trn1("trn1-a", ""), trn1("trn1-b", "")]
    job = gang(cast, hosts, max_attempts=1)
    place(job, hosts)
    gangs.claim_rank(job.pk, hosts[0].pk)
    GangMember.objects.filter(job=job, rank=0).update(exit_code=None)
    return job


@pytest.mark.django_db
def test_the_job_page_the_status_poll_and_the_api_show_the_ranks(cast, client, _storage):
    from conftest import api_client

    job = _running_gang_with_a_lost_rank(cast)
    client.force_login(cast.bob)
    page = client.get(f"/jobs/{job.pk}/").content.decode()
    assert 'id="gang-ranks"' in page and "rank 0 is the rendezvous host" in page
    assert 'href="/hosts/trn1-a/"' in page and 'href="/hosts/trn1-b/"' in page
    assert "status-running" in page and "status-placed" in page
    ranks = client.get(f"/jobs/{job.pk}/status.json").json()["ranks"]
    assert [(r["rank"], r["host"], r["cores"], r["state"]) for r in ranks] == [
        (0, "trn1-a", "0-31", "running"), (1, "trn1-b", "0-31", "placed")]
    assert ranks[0]["heartbeat_at"] and ranks[1]["heartbeat_at"] == ""
    document = api_client(cast.bob).get(f"/api/v1/jobs/{job.pk}").json()
    assert [(r["rank"], r["host"], r["state"], r["exit_code"]) for r in document["ranks"]] == [
        (0, "trn1-a", "running", None), (1, "trn1-b", "placed", None)]
    assert api_client(cast.charlie).get(f"/api/v1/jobs/{job.pk}").status_code == 404


@pytest.mark.django_db
def test_a_one_host_job_has_no_rank_table(cast, client, _storage):
    job = Job.objects.create(team=cast.vision, user=cast.bob, kind=Kind.INFERENCE, family="cpu", spec={})
    client.force_login(cast.bob)
    assert 'id="gang" hidden' in client.get(f"/jobs/{job.pk}/").content.decode()
    assert client.get(f"/jobs/{job.pk}/status.json").json()["ranks"] == []


def test_a_rank_stopped_by_the_gang_after_failing_by_itself_keeps_its_own_failure(tmp_path):
    from neuron_workers.gang_execution import ending_of
    from neuron_workers.process.outcome import Outcome
    from neuron_workers.process.runner import write_json_atomic

    stopped = Outcome("cancelled", None, None, None, "cancelled", "cancelled on request", 0, 1.0, 1)
    assert ending_of(stopped, "rank 0 on a failed", tmp_path).code == "stopped"
    write_json_atomic(tmp_path / "result.json", {"ok": False, "code": "bad_input", "error": "no shard"})
    ending = ending_of(stopped, "rank 0 on a failed", tmp_path)
    assert (ending.code, ending.message) == ("bad_input", "no shard")
    assert ending_of(stopped, "cancelled on request", tmp_path / "elsewhere").code == "cancelled"


def test_once_rank_0_wrote_its_result_a_host_still_running_after_the_exit_window_is_stopped_as_exited(
        tmp_path, settings):
    from neuron_workers.process.outcome import Outcome
    from neuron_workers.process.runner import write_json_atomic

    settings.GANG_EXIT_WINDOW_S = 30
    assert gangs.training_over(None, 1000.0) is None  # rank 0 has not finished
    assert gangs.training_over(990.0, 1000.0) is None  # within the window
    reason = gangs.training_over(960.0, 1000.0)
    assert reason.startswith(gangs.TRAINING_OVER) and "30 s" in reason
    stopped = Outcome("cancelled", None, 137, None, "cancelled", "stopped", 0, 1.0, 1)
    hung = ending_of(stopped, reason, tmp_path)  # no verdict: it hung before writing one
    assert (hung.code, hung.message) == ("ok", f"stopped: {reason}")
    write_json_atomic(tmp_path / "result.json", {"ok": True, "result": {}})
    assert ending_of(stopped, reason, tmp_path).code == "ok"  # hung after its verdict
    write_json_atomic(tmp_path / "result.json", {"ok": False, "code": "oom", "error": "out of memory"})
    assert ending_of(stopped, reason, tmp_path).code == "oom"  # a failure of its own stays one


# --- precompile on a neuron gang ------------------------------------------------------------

@pytest.fixture
def launcher(monkeypatch, tmp_path):
    """Runs a host's launcher (neuron_workers.process.gang.main) in this process, its
    commands recorded and replaced by a Python that exits with `exits[argv[0]]`
    (0 if not given): what torchrun and neuron_parallel_compile would be asked to do."""
    launched: list[tuple[list[str], dict | None]] = []
    exits: dict[str, int] = {}
    real_popen = subprocess.Popen

    def recording_popen(argv, **kwargs):
        launched.append((list(argv), kwargs.get("env")))
        code = exits.get(argv[0], 0)
        return real_popen([sys.executable, "-c", f"import sys; sys.exit({code})"], stdin=subprocess.DEVNULL)

    monkeypatch.setattr(gang_launcher.subprocess, "Popen", recording_popen)
    monkeypatch.setenv("NEURONDECK_COMPILE_CACHE", str(tmp_path / "fleet-cache"))
    previous = signal.getsignal(signal.SIGTERM)  # main() installs its own

    def run(payload: dict) -> int:
        path = Path(payload["workdir"]) / "payload.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload))
        try:
            return gang_launcher.main([str(path)])
        finally:
            signal.signal(signal.SIGTERM, previous)

    run.launched, run.exits = launched, exits
    return run


def stages_of(workdir: Path) -> list[tuple[str, str]]:
    path = workdir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [(row["stage"], row["state"]) for row in rows if row.get("event") == "stage"]


def neuron_rank_payloads(cast, **spec) -> tuple[Job, list[dict]]:
    hosts = [trn1("trn1-a", "10.0.0.11"), trn1("trn1-b", "10.0.0.12")]
    job = gang(cast, hosts, spec={"steps": 5, **spec})
    place(job, hosts)
    payloads = []
    for rank, host in enumerate(hosts):
        job, member = gangs.claim_rank(job.pk, host.pk)
        payloads.append(rank_payload(job, member, gangs.members_of(job.pk), rank_workdir(job.pk, 1, rank)))
    return job, payloads


@pytest.mark.django_db
def test_precompile_runs_each_neuron_gang_hosts_torchrun_under_neuron_parallel_compile_before_training(
        cast, settings, _storage, launcher, tmp_path):
    settings.GANG_PORT_BASE = 41000
    job, payloads = neuron_rank_payloads(cast, precompile=True)
    for payload in payloads:
        assert payload["gang"]["precompile"] is True
        assert launcher(payload) == 0
    for rank, payload in enumerate(payloads):
        (compile_argv, compile_env), (train_argv, train_env) = launcher.launched[2 * rank: 2 * rank + 2]
        workdir = Path(payload["workdir"])
        trial_gang = {**payload["gang"], "rdzv_id": f"job-{job.pk}-1-precompile"}
        # The host's own torchrun command under neuron_parallel_compile, a rendezvous of its own,
        # the trial length and the fleet cache; then the training command, without them.
        assert compile_argv == ["neuron_parallel_compile",
                                *torchrun_argv(sys.executable, trial_gang, workdir / "precompile" / "payload.json")]
        assert compile_env["NEURON_COMPILE_CACHE_URL"] == str(tmp_path / "fleet-cache")
        assert compile_env[config.TRIAL_STEPS_ENV] == "3"
        assert train_argv == torchrun_argv(sys.executable, payload["gang"], workdir / "payload.json")
        assert train_env is None  # the host's environment: no trial length
        trial = json.loads((workdir / "precompile" / "payload.json").read_text())
        assert trial["workdir"] == str(workdir / "precompile") and "gang" not in trial
        assert trial["env"] == payload["env"]  # the same cores, collectives root and EFA settings
    # Rank 0 reports the stages for the job page; the other host none.
    assert stages_of(Path(payloads[0]["workdir"])) == [("precompile", "started"), ("precompile", "done"),
                                                       ("train", "started"), ("train", "done")]
    assert stages_of(Path(payloads[1]["workdir"])) == []


@pytest.mark.django_db
def test_a_failed_precompile_ends_the_hosts_share_as_a_compile_error_without_training(
        cast, settings, _storage, launcher):
    job, payloads = neuron_rank_payloads(cast, precompile=True)
    launcher.exits["neuron_parallel_compile"] = 3
    assert launcher(payloads[1]) == 3
    assert [argv[0] for argv, _ in launcher.launched] == ["neuron_parallel_compile"]  # no training after it
    workdir = Path(payloads[1]["workdir"])
    outcome = outcome_of(workdir, 3, None, max_runtime_s=None, log_bytes=0, duration_s=1.0, pid=1)
    ending = ending_of(outcome, None, workdir)
    assert ending.code == "compile_error"
    assert ending.message == "neuron_parallel_compile exited with status 3 on host rank 1"


@pytest.mark.django_db
def test_without_precompile_a_neuron_gang_trains_at_once_and_shows_the_stage_skipped(
        cast, settings, _storage, launcher):
    job, payloads = neuron_rank_payloads(cast)
    assert payloads[0]["gang"]["precompile"] is False
    assert launcher(payloads[0]) == 0
    assert [argv[0] for argv, _ in launcher.launched] == [sys.executable]
    assert stages_of(Path(payloads[0]["workdir"])) == [("precompile", "skipped"), ("train", "started"),
                                                       ("train", "done")]


@pytest.mark.django_db
def test_the_job_page_shows_every_gang_hosts_utilization_of_its_ranks_cores(cast, client, _storage):
    import time as clock

    from jobs.live import metrics
    from tests.live_support import drop_streams

    drop_streams()
    hosts = [trn1("trn1-a", "10.0.0.11"), trn1("trn1-b", "10.0.0.12")]
    job = gang(cast, hosts)
    place(job, hosts)
    for host in hosts:
        gangs.claim_rank(job.pk, host.pk)
    now = clock.time()
    for ts, util_a, util_b in ((now - 2, 40.0, 10.0), (now - 1, 80.0, 50.0)):
        # Host a: every core of rank 0; host b: half of rank 1's cores busy (neuron-monitor
        # leaves idle cores out of its report: they read 0).
        for host, util in ((hosts[0], {str(c): util_a for c in range(32)}),
                           (hosts[1], {str(c): util_b for c in range(16)})):
            metrics.publish(host.name, {"ts": ts, "kind": "neuron", "util": util, "mem": {}, "job": {}}, {})
    try:
        client.force_login(cast.bob)
        page = client.get(f"/jobs/{job.pk}/").content.decode()
        assert 'id="gang-util-chart"' in page and "NeuronCore utilization: the mean over the rank" in page
        figure = json.loads(page.split('id="gang-util-figure" type="application/json">')[1].split("</script>")[0])
        assert [(t["name"], t["y"]) for t in figure["data"]] == [("rank 0 · trn1-a", [40.0, 80.0]),
                                                                 ("rank 1 · trn1-b", [5.0, 25.0])]
        assert figure["layout"]["title"]["text"] == "NeuronCore utilization by host"
        assert 'value="80.0"></meter> 80 %' in page and 'value="25.0"></meter> 25 %' in page
        rows = client.get(f"/jobs/{job.pk}/status.json").json()["gang_util"]
        assert [(r["rank"], r["host"], r["util"], r["now"]) for r in rows] == [
            (0, "trn1-a", [40.0, 80.0], 80.0), (1, "trn1-b", [5.0, 25.0], 25.0)]
        # A host that stopped reporting keeps its history but shows no current figure.
        with freeze_clock(now + metrics.FRESH_S + 5):
            rows = client.get(f"/jobs/{job.pk}/status.json").json()["gang_util"]
        assert [r["now"] for r in rows] == [None, None] and rows[0]["util"] == [40.0, 80.0]
        assert client.get(f"/jobs/{job.pk}/").status_code == 200
    finally:
        drop_streams()


def freeze_clock(at: float):
    from unittest import mock

    from jobs.live import metrics

    return mock.patch.object(metrics.time, "time", lambda: at)
