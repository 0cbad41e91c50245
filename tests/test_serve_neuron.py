"""The Neuron replica at its seam: the command line and environment it starts
`optimum-cli neuron serve` / vLLM with, its health probe, the ready record, and the
SIGTERM that drains it. No Neuron hardware: a stand-in `optimum-cli` (a small HTTP
server answering /health) records what it was started with."""
from __future__ import annotations

import json
import os
import stat
import sys
import threading
from pathlib import Path

import pytest

from neuron_workers.backends.base import JobContext, JobFailed
from neuron_workers.backends.serve_handoff import serve_settings
from neuron_workers.backends.serve_neuron import server_argv, server_env, serve_on_neuron
from tests.polling import wait_until

pytestmark = pytest.mark.timeout(120)

SETTINGS = serve_settings({"max_batch_size": 8, "max_seq_len": 2048, "bind_host": "127.0.0.1"})


def test_optimum_command_line_carries_the_endpoint_options():
    argv = server_argv("optimum", python="/opt/aws_neuronx_venv/bin/python", model="/models/llama", name="llama",
                       tp=2, settings=SETTINGS, port=9001)
    assert argv == ["/opt/aws_neuronx_venv/bin/optimum-cli", "neuron", "serve", "-m", "/models/llama",
                    "--served_model_name", "llama", "--tensor_parallel_size", "2", "--batch_size", "8",
                    "--sequence_length", "2048", "--port", "9001", "--host", "127.0.0.1"]


def test_vllm_command_line_carries_the_endpoint_options():
    argv = server_argv("vllm", python="/venv/bin/python", model="/m", name="m", tp=4, settings=SETTINGS, port=9002)
    assert argv == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m",
                    "--served-model-name", "m", "--tensor-parallel-size", "4", "--max-num-seqs", "8",
                    "--max-model-len", "2048", "--host", "127.0.0.1", "--port", "9002"]


def test_a_neuron_replica_needs_a_sequence_length_and_a_known_server():
    with pytest.raises(JobFailed, match="max_seq_len"):
        server_argv("optimum", python="/p", model="/m", name="m", tp=1, settings=serve_settings({}), port=1)
    with pytest.raises(JobFailed, match="'server' must be one of"):
        server_argv("triton", python="/p", model="/m", name="m", tp=1, settings=SETTINGS, port=1)


def test_environment_pins_the_jobs_cores_and_the_tensor_parallel_world():
    env = server_env({"PATH": "/bin"}, "4-7")
    assert env["NEURON_RT_VISIBLE_CORES"] == "4-7" and env["LOCAL_WORLD_SIZE"] == "4"
    assert env["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn" and env["PATH"] == "/bin"
    assert "LOCAL_WORLD_SIZE" not in server_env({}, "3")
    with pytest.raises(JobFailed) as refused:
        server_env({}, "")
    assert refused.value.code == "cores_unavailable"


STAND_IN = '''#!{python}
import json, os, signal, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
args = sys.argv[1:]
port = int(args[args.index("--port") + 1]); host = args[args.index("--host") + 1]
with open({record!r}, "w") as f:
    json.dump({{"argv": sys.argv, "cores": os.environ.get("NEURON_RT_VISIBLE_CORES"),
               "world": os.environ.get("LOCAL_WORLD_SIZE")}}, f)
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
server = HTTPServer((host, port), H)
def term(*_):
    open({record!r} + ".term", "w").close(); sys.exit(0)
signal.signal(signal.SIGTERM, term)
server.serve_forever()
'''


def test_the_replica_starts_the_server_probes_it_announces_and_stops_it(tmp_path, monkeypatch):
    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    record = tmp_path / "started.json"
    cli = bindir / "optimum-cli"
    cli.write_text(STAND_IN.format(python=sys.executable, record=str(record)))
    cli.chmod(cli.stat().st_mode | stat.S_IEXEC)
    model = tmp_path / "model"
    model.mkdir()
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "2-3")
    stop = threading.Event()
    metrics: list[dict] = []
    ctx = JobContext(job_id=1, kind="serve", workdir=tmp_path / "job", inputs={"model_path": str(model)},
                     spec={"max_batch_size": 4, "max_seq_len": 1024, "replica_id": 5, "drain_s": 10},
                     log=lambda line: None, metric=metrics.append, should_stop=stop.is_set)
    ctx.workdir.mkdir()
    results: list = []
    runner = threading.Thread(target=lambda: results.append(serve_on_neuron(ctx, python=str(bindir / "python"))))
    runner.start()
    try:
        ready = wait_until(lambda: [m for m in metrics if m.get("replica") == "ready"], timeout=60,
                           message="the replica-ready record")[0]
        started = json.loads(record.read_text())
        assert started["cores"] == "2-3" and started["world"] == "2"
        argv = started["argv"][1:]
        assert argv[:4] == ["neuron", "serve", "-m", str(model)]
        assert argv[argv.index("--tensor_parallel_size") + 1] == "2"
        assert argv[argv.index("--batch_size") + 1] == "4" and argv[argv.index("--sequence_length") + 1] == "1024"
        assert ready["url"] == f"http://127.0.0.1:{argv[argv.index('--port') + 1]}" and ready["replica_id"] == 5
    finally:
        stop.set()
        runner.join(timeout=60)
    assert results and results[0]["drained"] is True and results[0]["tensor_parallel_size"] == 2
    assert Path(str(record) + ".term").exists(), "the server was not sent SIGTERM"
    assert any(m.get("replica") == "draining" for m in metrics)


def test_a_server_that_dies_before_answering_fails_the_job(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    cli = bindir / "optimum-cli"
    cli.write_text("#!/bin/sh\necho 'no NeuronCores' >&2\nexit 3\n")
    cli.chmod(cli.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "model").mkdir()
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "0")
    ctx = JobContext(job_id=1, kind="serve", workdir=tmp_path, inputs={"model_path": str(tmp_path / "model")},
                     spec={"max_seq_len": 512}, log=lambda line: None, metric=lambda m: None)
    with pytest.raises(JobFailed) as failed:
        serve_on_neuron(ctx, python=str(bindir / "python"))
    assert failed.value.code == "runtime_error" and "server.log" in failed.value.message
    assert "no NeuronCores" in (tmp_path / "server.log").read_text()
    assert os.environ["NEURON_RT_VISIBLE_CORES"] == "0"
