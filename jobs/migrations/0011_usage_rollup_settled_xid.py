from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('jobs', '0010_usage_site_wait_totals'),
    ]

    operations = [
        migrations.AddField(
            model_name='usagerollupstate',
            name='settled_xid',
            field=models.BigIntegerField(blank=True, null=True),
        ),
    ]
