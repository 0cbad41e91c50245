"""Forms for team members: add someone with a role, change or remove a role. They only
validate; jobs.teams.services applies the change and audits it."""
from __future__ import annotations

from django import forms
from django.contrib.auth import get_user_model

from jobs.models import Role
from jobs.validators import shown_as_is


class MemberAddForm(forms.Form):
    username = forms.CharField(max_length=150)
    role = forms.ChoiceField(choices=Role.choices, initial=Role.MEMBER)

    def clean_username(self):
        name = self.cleaned_data["username"].strip()
        user = get_user_model().objects.filter(username=name, is_active=True).first()
        if user is None:
            raise forms.ValidationError(f"no active user named {name!r}")
        return user


class MemberRoleForm(forms.Form):
    """Change a member's role, or remove them (role "remove")."""

    user_id = forms.IntegerField(min_value=1, max_value=2**63 - 1)  # an id (beyond 64 bits SQLite cannot compare it)
    role = forms.ChoiceField(choices=[*Role.choices, ("remove", "Remove")])


RESERVED_SLUGS = {"new"}  # /teams/new/ is the create page


class TeamCreateForm(forms.Form):
    """A new team (staff only): slug, name, time zone and, optionally, its first manager."""

    slug = forms.SlugField(max_length=64, help_text="Lower-case letters, digits and dashes; used in URLs.")
    name = forms.CharField(max_length=120, validators=[shown_as_is])
    time_zone = forms.CharField(max_length=64, initial="UTC",
                                help_text="Usage pages count days in this zone, e.g. Europe/Berlin.")
    manager = forms.CharField(max_length=150, required=False,
                              help_text="Username of the team's first manager (add more members on the team page).")

    def clean_slug(self) -> str:
        from jobs.models import Team

        slug = self.cleaned_data["slug"]
        if slug != slug.lower():
            raise forms.ValidationError("use lower-case letters")
        if slug in RESERVED_SLUGS:
            raise forms.ValidationError(f"{slug!r} is reserved; choose another slug")
        if Team.objects.filter(slug=slug).exists():
            raise forms.ValidationError(f"a team with slug {slug!r} exists already")
        return slug

    def clean_time_zone(self) -> str:
        import zoneinfo

        name = self.cleaned_data["time_zone"].strip() or "UTC"
        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise forms.ValidationError(f"unknown time zone {name!r} (e.g. UTC, Europe/Berlin)") from None
        return name

    def clean_manager(self):
        name = self.cleaned_data["manager"].strip()
        if not name:
            return None
        user = get_user_model().objects.filter(username=name, is_active=True).first()
        if user is None:
            raise forms.ValidationError(f"no active user named {name!r}")
        return user
