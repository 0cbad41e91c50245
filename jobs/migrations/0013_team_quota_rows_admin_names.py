"""Every team gets its quota rows (a team created in the Django admin before had none,
and saving its row on /quotas/ was a 500), and the admin's plural names read right."""
from django.db import migrations

FAMILIES = ("inf2", "trn1", "trn2", "cpu")
DEFAULTS = {"cpu": (8, 8)}  # jobs.models.DEFAULT_FAMILY_QUOTA at the time of writing
NEURON_DEFAULT = (0, 32)


def add_missing_quota_rows(apps, schema_editor):
    Team = apps.get_model("jobs", "Team")
    TeamQuota = apps.get_model("jobs", "TeamQuota")
    FamilyQuota = apps.get_model("jobs", "FamilyQuota")
    team_ids = list(Team.objects.values_list("id", flat=True))
    TeamQuota.objects.bulk_create([TeamQuota(team_id=t) for t in team_ids], ignore_conflicts=True)
    FamilyQuota.objects.bulk_create(
        [FamilyQuota(team_id=t, family=f, guaranteed_cores=DEFAULTS.get(f, NEURON_DEFAULT)[0],
                     borrow_limit=DEFAULTS.get(f, NEURON_DEFAULT)[1]) for t in team_ids for f in FAMILIES],
        ignore_conflicts=True)


class Migration(migrations.Migration):

    dependencies = [
        ("jobs", "0012_drop_redundant_fk_indexes"),
    ]

    operations = [
        migrations.AlterModelOptions(name="auditentry",
                                     options={"ordering": ["-at", "-id"], "verbose_name_plural": "audit entries"}),
        migrations.AlterModelOptions(name="kindpriority", options={"verbose_name_plural": "kind priorities"}),
        migrations.RunPython(add_missing_quota_rows, migrations.RunPython.noop),
    ]
