from django.contrib import admin

from jobs import models

admin.site.register([models.Team, models.Membership, models.TeamQuota, models.FamilyQuota, models.AuditEntry,
                     models.Host, models.ModelAsset, models.Dataset, models.InstancePrice, models.KindPriority])


@admin.register(models.Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ("id", "team", "user", "kind", "status", "family", "cores", "host", "created_at")
    list_filter = ("status", "kind", "family")
    raw_id_fields = ("team", "user", "model", "dataset", "output_model", "host")
