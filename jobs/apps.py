from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    verbose_name = "NeuronDeck"

    def ready(self) -> None:
        from jobs.endpoints import replicas  # noqa: F401  (drains a replica the scheduler preempts)
        from jobs.teams import logins  # noqa: F401  (connects the login audit receivers)
        from jobs.teams import sso  # noqa: F401  (registers the check of the single sign-on settings)
