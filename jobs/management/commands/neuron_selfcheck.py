"""`manage.py neuron_selfcheck`: run this first on a new Neuron host (see the README)."""
from __future__ import annotations

import json

from django.core.management.base import BaseCommand

from neuron_workers.backends.neuron_selfcheck import DEVICE_CHECKS, run_selfcheck
from neuron_workers.readers.neuron_ls import NEURON_BIN_DIR


class Command(BaseCommand):
    help = ("Check this host as NeuronDeck will use it: Neuron tools and packages, devices and cores, the job "
            "Python (NEURONDECK_JOB_PYTHON) and what it can run, then on the device a tiny trace + load + run on "
            "one core (answering whether neuron-monitor's core keys are global), two concurrent two-core jobs, "
            "a compile cache hit, and with a native TorchNeuron job Python what its multi-rank fine-tunes rely on "
            "(the \"neuron\" group's device all-reduce, the gloo group beside it, torch.neuron's RNG state). On a "
            "host without Neuron it says so and exits 0; it exits 1 when a check fails.")

    def add_arguments(self, parser) -> None:
        parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
        parser.add_argument("--job-python", default="",
                            help="the interpreter jobs run in (default: NEURONDECK_JOB_PYTHON, else this one)")
        parser.add_argument("--neuron-ls", default="neuron-ls", help="the neuron-ls executable")
        parser.add_argument("--neuron-monitor", default="neuron-monitor", help="the neuron-monitor executable")
        parser.add_argument("--neuron-bin-dir", default=NEURON_BIN_DIR,
                            help="where the Neuron tools are when PATH lacks them")
        parser.add_argument("--hold-seconds", type=float, default=8.0,
                            help="how long the one-core job keeps its core busy for neuron-monitor")
        parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed to each device check")
        parser.add_argument("--no-device-checks", action="store_true",
                            help="only the tools, devices and job Python checks: start nothing on a NeuronCore")

    def handle(self, *args, **options) -> None:
        result = run_selfcheck(job_python=options["job_python"] or None, neuron_ls=options["neuron_ls"],
                               neuron_monitor=options["neuron_monitor"], bin_dir=options["neuron_bin_dir"],
                               hold_s=options["hold_seconds"], timeout_s=options["timeout"],
                               device_checks=() if options["no_device_checks"] else DEVICE_CHECKS)
        self.stdout.write(json.dumps(result.to_dict(), indent=2, default=str) if options["json"] else result.table())
        if result.failed:
            raise SystemExit(1)
