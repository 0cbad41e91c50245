"""Running totals of the site's queue-wait sketches (UsageSiteWaitTotal), built
from the UsageSiteDaily rows already folded."""
from django.db import migrations, models


def build(apps, schema_editor):
    daily = apps.get_model("jobs", "UsageSiteDaily")
    totals = apps.get_model("jobs", "UsageSiteWaitTotal")
    totals.objects.all().delete()
    running: dict[str, tuple[int, dict]] = {}  # per kind: waits and merged sketch up to the current day
    current = {}
    for day, kind, count, sketch in (daily.objects.filter(wait_count__gt=0).order_by("kind", "day")
                                     .values_list("day", "kind", "wait_count", "wait_sketch")):
        n, merged = running.get(kind, (0, {}))
        merged = dict(merged)
        for key, value in (sketch or {}).items():
            merged[key] = merged.get(key, 0) + int(value)
        running[kind] = (n + count, merged)
        current[(kind, day)] = running[kind]
    rows = [totals(day=day, kind=kind, wait_count=n, wait_sketch=sketch)
            for (kind, day), (n, sketch) in current.items()]
    totals.objects.bulk_create(rows, batch_size=500)


class Migration(migrations.Migration):

    dependencies = [
        ('jobs', '0009_active_jobs_index'),
    ]

    operations = [
        migrations.CreateModel(
            name='UsageSiteWaitTotal',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('day', models.DateField()),
                ('kind', models.CharField(choices=[('compile', 'Compile'), ('finetune', 'Fine-tune'), ('inference', 'Inference')], max_length=16)),
                ('wait_count', models.BigIntegerField(default=0)),
                ('wait_sketch', models.JSONField(blank=True, default=dict)),
            ],
            options={
                'constraints': [models.UniqueConstraint(fields=('kind', 'day'), name='uniq_usage_wait_total')],
            },
        ),
        migrations.RunPython(build, migrations.RunPython.noop),
    ]
