"""The NeuronDeck Django app (one app label, `jobs`): one subpackage per area of the
product. `models.py` holds every table; `tasks.py` the scheduler-side Celery tasks;
`pages.py` what every HTML page shares."""
