"""A Neuron replica: an existing OpenAI-compatible server for Neuron, started with
the endpoint's options on the job's NeuronCores, probed, announced, drained.

HONESTY NOTE: no Neuron hardware here. The command lines are written against the
real CLIs and tested at this seam (tests/test_serve_neuron.py asserts argv and env);
they have not run on an Inf2/Trn host.

Two servers (spec "server"):
- "optimum" (default): `optimum-cli neuron serve -m MODEL --served_model_name NAME
  --tensor_parallel_size TP --batch_size B --sequence_length S --port P --host H`
  (optimum-neuron optimum/commands/neuron/serve.py: its own flags are -m,
  --served_model_name, --tensor_parallel_size, --batch_size, --sequence_length, --port;
  unknown flags such as --host go on to vLLM). A compiled Neuron model must have been
  exported at exactly that batch size, sequence length and TP degree (it refuses
  otherwise); an HF model is exported on start from the Neuron cache.
- "vllm": `python -m vllm.entrypoints.openai.api_server --model MODEL
  --served-model-name NAME --tensor-parallel-size TP --max-num-seqs B --max-model-len S
  --host H --port P` with the Neuron plugin (vllm-neuron) installed in the job's Python,
  which vLLM discovers as its platform.
Both answer GET /health with 200 once the model is loaded, which is the probe.

Environment: NEURON_RT_VISIBLE_CORES is the job's contiguous core range (the
scheduler's placement; tensor-parallel size = its length), and with TP > 1
LOCAL_WORLD_SIZE = TP (Neuron's torch-xla maps ranks onto the visible range,
neuron.md §0); VLLM_WORKER_MULTIPROC_METHOD=spawn as optimum does for one server.
The server runs in its own process group: a stop sends it SIGTERM (both servers
finish in-flight requests on SIGTERM through uvicorn's graceful shutdown) and
SIGKILL after drain_s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from .base import JobContext, JobFailed, input_path
from .neuron_env import parse_visible_cores
from .serve_handoff import ServeSettings, announce_draining, announce_ready, free_port, serve_settings, url_for, \
    wait_healthy

SERVERS = ("optimum", "vllm")
STOP_POLL_S = 0.2


def server_argv(server: str, *, python: str, model: str, name: str, tp: int, settings: ServeSettings,
                port: int) -> list[str]:
    """The command line that serves `model` with the endpoint's options."""
    seq = settings.max_seq_len
    if seq is None:
        raise JobFailed("bad_input", "a Neuron replica needs max_seq_len: its model is compiled for one sequence "
                                     "length")
    if server == "optimum":
        cli = str(Path(python).parent / "optimum-cli")
        return [cli, "neuron", "serve", "-m", model, "--served_model_name", name,
                "--tensor_parallel_size", str(tp), "--batch_size", str(settings.max_batch_size),
                "--sequence_length", str(seq), "--port", str(port), "--host", settings.bind_host]
    if server == "vllm":
        return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", name,
                "--tensor-parallel-size", str(tp), "--max-num-seqs", str(settings.max_batch_size),
                "--max-model-len", str(seq), "--host", settings.bind_host, "--port", str(port)]
    raise JobFailed("bad_input", f"spec field 'server' must be one of {', '.join(SERVERS)}, got {server!r}")


def server_env(base: Mapping[str, str], cores: str) -> dict[str, str]:
    """The server's environment: the job's cores, and the TP world on them."""
    visible = parse_visible_cores(cores)
    if not visible:
        raise JobFailed("cores_unavailable", "a Neuron replica needs NeuronCores (NEURON_RT_VISIBLE_CORES is empty)")
    env = {**base, "NEURON_RT_VISIBLE_CORES": cores, "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    if len(visible) > 1:
        env["LOCAL_WORLD_SIZE"] = str(len(visible))
    return env


def serve_on_neuron(ctx: JobContext, *, python: str | None = None,
                    popen: type[subprocess.Popen] = subprocess.Popen) -> dict:
    """The neuron backend's serve kind: run the server, announce it once /health
    answers, stop it (drained) when the job is cancelled."""
    settings = serve_settings(ctx.spec)
    cores = os.environ.get("NEURON_RT_VISIBLE_CORES") or ctx.cores or ""
    env = server_env(os.environ, cores)
    tp = len(parse_visible_cores(cores))
    model = str(input_path(ctx, "model_path"))
    name = str(ctx.spec.get("model_name") or Path(model).name)
    port = free_port(settings.bind_host)
    argv = server_argv(str(ctx.spec.get("server") or "optimum"), python=python or sys.executable, model=model,
                       name=name, tp=tp, settings=settings, port=port)
    ctx.log("starting: " + " ".join(argv))
    log = (ctx.workdir / "server.log").open("ab")
    proc = popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    threading.Thread(target=_relay, args=(ctx, ctx.workdir / "server.log", proc), daemon=True).start()
    url = url_for(settings.advertise_host, port)
    try:
        if not wait_healthy(url, timeout_s=settings.ready_timeout_s, should_stop=ctx.should_stop,
                            alive=lambda: proc.poll() is None):
            if ctx.should_stop():
                raise JobFailed("cancelled", "stopped before the server was ready")
            raise JobFailed("runtime_error", f"the server exited ({proc.poll()}) or did not answer {url}/health "
                                             f"within {settings.ready_timeout_s} s; see server.log")
        announce_ready(ctx, settings, url, server=argv[0])
        while not ctx.should_stop():
            if proc.poll() is not None:
                raise JobFailed("runtime_error", f"the server exited with {proc.returncode}; see server.log")
            time.sleep(STOP_POLL_S)
        announce_draining(ctx, settings)
        drained = _stop(proc, settings.drain_s)
    finally:
        if proc.poll() is None:
            _stop(proc, 0)
        log.close()
    return {"url": url, "drained": drained, "server": argv[0], "tensor_parallel_size": tp, "backend": "neuron"}


def _stop(proc: subprocess.Popen, grace_s: float) -> bool:
    """SIGTERM the server's group (graceful: in-flight requests finish), SIGKILL after grace_s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
        return True
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return False
    except ProcessLookupError:
        return True


def _relay(ctx: JobContext, path: Path, proc: subprocess.Popen) -> None:
    """The server's output into the job log (what the job page shows), until it exits."""
    with path.open("rb") as f:
        while True:
            line = f.readline()
            if not line:
                if proc.poll() is not None:
                    return
                time.sleep(0.2)
                continue
            ctx.log(line.decode("utf-8", "replace").rstrip())
