"""The zygote's warm-up: "module:function" preload entries, and the cpu warm-up's
fork-safety promises (no extra native threads, torch's thread count restored)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from neuron_workers.process import DEFAULT_PRELOAD, Zygote

ROOT = Path(__file__).resolve().parent.parent


def test_a_module_function_preload_entry_is_called_and_its_failure_reported():
    zygote = Zygote(preload=("json:dumps", "neuron_workers.process.zygote_warmup:no_such_function"), spares=0)
    zygote.start()
    try:
        errors = zygote.info["preload_errors"]
    finally:
        zygote.close()
    # json.dumps() without arguments raises TypeError: proof that it was called.
    assert any(e.startswith("json:dumps: TypeError") for e in errors), errors
    assert any("no_such_function" in e and "AttributeError" in e for e in errors), errors


def test_the_default_zygote_warms_up_the_model_path():
    assert "neuron_workers.process.zygote_warmup:warm_up" in DEFAULT_PRELOAD


def test_warm_up_starts_no_threads_and_restores_torchs_thread_count():
    code = (
        "import json, torch; torch.set_num_threads(2)\n"
        "from neuron_workers.process import zygote_warmup as w\n"
        "before = w.native_threads(); w.warm_up()\n"
        "print(json.dumps({'before': before, 'after': w.native_threads(), 'torch': torch.get_num_threads()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         check=True).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["after"] == seen["before"] and seen["torch"] == 2
