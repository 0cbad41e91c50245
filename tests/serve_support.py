"""Real replica servers for the serving tests: `python -m neuron_workers.backends.serve_cpu`
started on a free port of localhost, waited for through its ready file."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.polling import wait_until

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Replica:
    url: str
    proc: subprocess.Popen
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


@contextmanager
def replica(model_dir: Path, workdir: Path, **options) -> Iterator[Replica]:
    """A cpu replica of `model_dir` with options (max_batch_size=..., max_seq_len=...,
    max_concurrent=..., drain_s=...); SIGKILLed at the end if still running."""
    workdir.mkdir(parents=True, exist_ok=True)
    ready = workdir / "ready.json"
    log = workdir / "replica.log"
    argv = [sys.executable, "-m", "neuron_workers.backends.serve_cpu", "--model", str(model_dir),
            "--ready-file", str(ready)]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: ready.exists() or proc.poll() is not None, timeout=120, message="the replica's ready file")
        assert proc.poll() is None, f"the replica exited: {log.read_text()}"
        yield Replica(json.loads(ready.read_text())["url"], proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def sse_events(lines: Iterator[str]) -> Iterator[dict | str]:
    """The data of each server-sent event: a dict, or the string "[DONE]"."""
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)
