"""Host-side Celery tasks (queue "host.<name>"): thin — load by id, call, record."""
import logging
import threading

from celery import shared_task
from celery.signals import worker_ready

log = logging.getLogger(__name__)


@shared_task(name="neuron_workers.run_job", ignore_result=True)
def run_job(job_id: int) -> str:
    from neuron_workers.execution import run

    return run(int(job_id))


@worker_ready.connect
def _prewarm_zygote(sender=None, **_) -> None:
    """Start the fork-mode zygote (torch + transformers preloaded) as soon as a host
    worker is up, so its first job does not pay the seconds of imports."""
    queues = {q.name for q in getattr(getattr(sender, "app", None), "amqp", None).queues.consume_from.values()} \
        if sender is not None and getattr(sender, "app", None) is not None else set()
    if not any(name.startswith("host.") for name in queues):
        return
    from neuron_workers.process import prewarm

    threading.Thread(target=prewarm, name="zygote-prewarm", daemon=True).start()
    log.info("prewarming the job zygote")
