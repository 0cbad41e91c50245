from django import forms
from django.contrib import admin, messages

from jobs import models

admin.site.register([models.Host, models.ModelAsset, models.Dataset, models.InstancePrice, models.KindPriority])


@admin.register(models.Team)
class TeamAdmin(admin.ModelAdmin):
    """A team added here starts like one added in the console: with its quota rows
    (every family; jobs.models.quota_rows_ensure) and an audit entry."""

    list_display = ("slug", "name", "time_zone", "created_at")
    search_fields = ("slug", "name")

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)  # the post_save signal adds the quota rows
        if not change:
            models.AuditEntry.objects.create(team=obj, actor=request.user, subject="team", old="",
                                             new=f"created {obj.slug}")


class TeamQuotaForm(forms.ModelForm):
    """Allowed kinds as checkboxes (stored as a list; every kind = [] = "all", so a
    kind added later is allowed too), not raw JSON."""

    allowed_kinds = forms.MultipleChoiceField(choices=models.Kind.choices, widget=forms.CheckboxSelectMultiple,
                                              help_text="The job kinds the team may submit.")

    class Meta:
        model = models.TeamQuota
        fields = ("team", "share", "monthly_core_hours", "max_runtime_s", "max_pending", "allowed_kinds")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.initial.get("allowed_kinds"):
            self.initial["allowed_kinds"] = list(models.Kind.values)

    def clean_allowed_kinds(self) -> list[str]:
        kinds = self.cleaned_data["allowed_kinds"]
        return [] if set(kinds) == set(models.Kind.values) else sorted(kinds)


# Quotas and memberships edited here are audited exactly like the quota page and the
# team page do it (jobs.services), so the team's audit trail has every change.

@admin.register(models.TeamQuota)
class TeamQuotaAdmin(admin.ModelAdmin):
    form = TeamQuotaForm
    list_display = ("team", "share", "monthly_core_hours", "max_runtime_s", "max_pending", "kinds")

    @admin.display(description="allowed kinds")
    def kinds(self, obj) -> str:
        return ", ".join(obj.allowed_kinds) if obj.allowed_kinds else "all"

    def save_model(self, request, obj, form, change):
        from jobs.quotas.services import QUOTA_FIELDS, quota_update

        if not change:
            return super().save_model(request, obj, form, change)
        quota_update(team=obj.team, actor=request.user,
                     values={name: form.cleaned_data[name] for name in QUOTA_FIELDS if name in form.changed_data})


@admin.register(models.FamilyQuota)
class FamilyQuotaAdmin(admin.ModelAdmin):
    list_display = ("team", "family", "guaranteed_cores", "borrow_limit")
    list_filter = ("family",)

    def save_model(self, request, obj, form, change):
        from jobs.quotas.services import FAMILY_FIELDS, quota_update

        if not change or "family" in form.changed_data or "team" in form.changed_data:
            return super().save_model(request, obj, form, change)
        quota_update(team=obj.team, actor=request.user, values={"families": {obj.family: {
            name: form.cleaned_data[name] for name in FAMILY_FIELDS if name in form.changed_data}}})


@admin.register(models.UserBudget)
class UserBudgetAdmin(admin.ModelAdmin):
    """A user's hard cap of NeuronCore-hours per month in a team, enforced at submit
    (jobs.quotas.policy.user_cap_decision); each change is in the team's audit trail."""

    list_display = ("team", "user", "monthly_core_hours")
    list_filter = ("team",)

    def save_model(self, request, obj, form, change):
        old = models.UserBudget.objects.filter(pk=obj.pk).values_list("monthly_core_hours", flat=True).first()
        super().save_model(request, obj, form, change)
        models.AuditEntry.objects.create(team=obj.team, actor=request.user, subject=f"user_budget.{obj.user.username}",
                                         old="" if old is None else f"{old:g}", new=f"{obj.monthly_core_hours:g}")

    def delete_model(self, request, obj):
        models.AuditEntry.objects.create(team=obj.team, actor=request.user, subject=f"user_budget.{obj.user.username}",
                                         old=f"{obj.monthly_core_hours:g}", new="")
        super().delete_model(request, obj)


@admin.register(models.Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ("team", "user", "role")
    list_filter = ("role",)

    def save_model(self, request, obj, form, change):
        from jobs.teams.services import membership_set

        if change and ("team" in form.changed_data or "user" in form.changed_data):
            return super().save_model(request, obj, form, change)
        membership_set(team=obj.team, user=obj.user, role=obj.role, actor=request.user)

    def delete_model(self, request, obj):
        from jobs.teams.services import MembershipError, membership_change

        try:
            membership_change(team=obj.team, user=obj.user, role=None, actor=request.user)
        except MembershipError as exc:
            self.message_user(request, str(exc), level=messages.ERROR)

    def delete_queryset(self, request, queryset):
        for obj in queryset.select_related("team", "user"):
            self.delete_model(request, obj)


@admin.register(models.AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    """The audit trail is read-only, even for admins."""

    list_display = ("at", "team", "actor", "subject", "old", "new")
    list_filter = ("team",)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(models.Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ("id", "team", "user", "kind", "status", "family", "cores", "host", "created_at")
    list_filter = ("status", "kind", "family")
    raw_id_fields = ("team", "user", "model", "dataset", "output_model", "host")
