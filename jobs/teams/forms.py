"""Forms for team members: add someone with a role, change or remove a role. They only
validate; jobs.teams.services applies the change and audits it."""
from __future__ import annotations

from django import forms
from django.contrib.auth import get_user_model

from jobs.models import Role


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

    user_id = forms.IntegerField()
    role = forms.ChoiceField(choices=[*Role.choices, ("remove", "Remove")])
