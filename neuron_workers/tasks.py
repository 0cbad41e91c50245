"""Host-side Celery tasks (queue "host.<name>"): thin — load by id, call, record."""
from celery import shared_task


@shared_task(name="neuron_workers.run_job", ignore_result=True)
def run_job(job_id: int) -> str:
    from jobs.execution import run

    return run(int(job_id))
