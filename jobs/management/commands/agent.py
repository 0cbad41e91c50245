"""`manage.py agent`: the host agent (neuron_workers.agent) in the foreground."""
from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from neuron_workers import agent


class Command(BaseCommand):
    help = ("Register this host, heartbeat, and stream neuron-monitor (or OS) samples into Redis. "
            "--replay FILE streams a recorded neuron-monitor file instead, marked as a replay.")

    def add_arguments(self, parser) -> None:
        parser.add_argument("--name", default="", help="host name (default: NEURONDECK_HOST or the hostname)")
        parser.add_argument("--replay", type=Path, help="a recorded neuron-monitor .jsonl to replay at 1 report/s")
        parser.add_argument("--once", action="store_true",
                            help="publish one sample and exit (with --replay: the file once, no loop)")
        parser.add_argument("--neuron-ls", default="neuron-ls", help="the neuron-ls executable")
        parser.add_argument("--neuron-monitor", default="neuron-monitor", help="the neuron-monitor executable")

    def handle(self, *args, **options) -> None:
        replay = options["replay"]
        if replay is not None and not replay.is_file():
            raise CommandError(f"--replay: no such file: {replay}")
        opts = agent.AgentOptions(
            name=options["name"] or agent.agent_host_name(), replay=replay, once=options["once"],
            neuron_ls=options["neuron_ls"], neuron_monitor=options["neuron_monitor"],
        )
        try:
            published = agent.run(opts)
        except ValueError as exc:  # a bad NEURONDECK_CPU_SLOTS or a recording without reports
            raise CommandError(str(exc)) from None
        self.stdout.write(f"published {published} samples")
