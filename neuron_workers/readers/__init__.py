"""Pure, Django-free readers of host state: neuron-ls, neuron-monitor, /proc.

Nothing in this package may import Django, torch or redis: the host agent and
the tests use it without a database (DESIGN.md §6, STYLE.md rule 3).
"""

from neuron_workers.readers.neuron_ls import (
    INSTANCE_TYPES,
    HostInventory,
    detect_instance_type,
    family_for_instance_type,
    parse_neuron_ls,
    run_neuron_ls,
)
from neuron_workers.readers.neuron_monitor import (
    JobPlacement,
    MalformedReport,
    Report,
    attribute,
    iter_reports,
    job_id_from_tag,
    monitor_config,
    parse_report,
    replay,
)
from neuron_workers.readers.os_sampler import CpuTimes, sample_os

__all__ = [
    "INSTANCE_TYPES",
    "CpuTimes",
    "HostInventory",
    "JobPlacement",
    "MalformedReport",
    "Report",
    "attribute",
    "detect_instance_type",
    "family_for_instance_type",
    "iter_reports",
    "job_id_from_tag",
    "monitor_config",
    "parse_neuron_ls",
    "parse_report",
    "replay",
    "run_neuron_ls",
    "sample_os",
]
