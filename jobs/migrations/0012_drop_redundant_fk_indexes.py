"""Drop the single-column foreign-key indexes that a kept composite index already
leads with (every insert and every non-HOT update of these hot rows maintained them):

  jobs_job.team_id            job_team_recent (team_id, id DESC), job_team_status, job_team_finished
  jobs_job.host_id            job_host_status (host_id, status)
  jobs_jobattempt.job_id      uniq_attempt (job_id, number)
  jobs_jobattempt.team_id     attempt_team_start (team_id, started_at), attempt_team_ended
  jobs_coreallocation.host_id one_job_per_core (host_id, core)
  jobs_coreallocation.team_id alloc_team_family (team_id, family)
  jobs_joblogchunk.job_id     uniq_log_chunk (job_id, offset)

Django's AlterField(db_index=False) would also drop and re-add each foreign-key
constraint, re-validating every row of jobs_job and jobs_jobattempt under a table
lock; only the index goes here (the constraints are unchanged), the model state
follows through SeparateDatabaseAndState.
"""
import django.db.models.deletion
from django.db import migrations, models

# (table, column, index name Django gave the ForeignKey's index)
DROPPED = [
    ("jobs_job", "team_id", "jobs_job_team_id_c38d3640"),
    ("jobs_job", "host_id", "jobs_job_host_id_8b136019"),
    ("jobs_jobattempt", "job_id", "jobs_jobattempt_job_id_05797094"),
    ("jobs_jobattempt", "team_id", "jobs_jobattempt_team_id_b4afb8db"),
    ("jobs_coreallocation", "host_id", "jobs_coreallocation_host_id_0d9ddc8f"),
    ("jobs_coreallocation", "team_id", "jobs_coreallocation_team_id_c24dee06"),
    ("jobs_joblogchunk", "job_id", "jobs_joblogchunk_job_id_e62f98e0"),
]


class Migration(migrations.Migration):

    dependencies = [
        ('jobs', '0011_usage_rollup_settled_xid'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(f'DROP INDEX IF EXISTS "{name}"',
                                  reverse_sql=f'CREATE INDEX IF NOT EXISTS "{name}" ON "{table}" ("{column}")')
                for table, column, name in DROPPED
            ],
            state_operations=[
                migrations.AlterField(
                    model_name='coreallocation',
                    name='host',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='allocations', to='jobs.host'),
                ),
                migrations.AlterField(
                    model_name='coreallocation',
                    name='team',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='+', to='jobs.team'),
                ),
                migrations.AlterField(
                    model_name='job',
                    name='host',
                    field=models.ForeignKey(blank=True, db_index=False, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='jobs', to='jobs.host'),
                ),
                migrations.AlterField(
                    model_name='job',
                    name='team',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='jobs', to='jobs.team'),
                ),
                migrations.AlterField(
                    model_name='jobattempt',
                    name='job',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='attempt_rows', to='jobs.job'),
                ),
                migrations.AlterField(
                    model_name='jobattempt',
                    name='team',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='+', to='jobs.team'),
                ),
                migrations.AlterField(
                    model_name='joblogchunk',
                    name='job',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='log_chunks', to='jobs.job'),
                ),
            ],
        ),
    ]
