"""Forms for quotas. They only validate; jobs.quotas.services applies the change and
audits it. The staff quota page and PATCH /api/v1/teams/{slug}/quota use the same
QuotaForm, so a bad number gets the same message, named after the field."""
from __future__ import annotations

from django import forms

from jobs.models import Family, Kind

NEGATIVE = "must not be negative"


def _count(label: str, *, minimum: int = 0, help_text: str = "") -> forms.IntegerField:
    return forms.IntegerField(label=label, min_value=minimum, max_value=1_000_000, help_text=help_text,
                              error_messages={"min_value": NEGATIVE if minimum == 0 else f"must be at least {minimum}"})


def family_field(family: str, name: str) -> str:
    return f"{family}_{name}"


class QuotaForm(forms.Form):
    """One team's quota. With partial=True (the API's PATCH) every field is optional
    and only the fields given are changed."""

    share = _count("Fair share", minimum=1, help_text="Fair-share weight (teams are ordered by usage / share).")
    monthly_core_hours = forms.FloatField(label="NeuronCore-hours / month", min_value=0, max_value=1e9,
                                          error_messages={"min_value": NEGATIVE})
    max_runtime_s = _count("Max runtime (s)", minimum=1)
    max_pending = _count("Max pending jobs")
    allowed_kinds = forms.MultipleChoiceField(label="Allowed kinds", choices=Kind.choices, required=False,
                                              widget=forms.CheckboxSelectMultiple)

    def __init__(self, *args, partial: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.partial = partial
        for family in Family.values:
            self.fields[family_field(family, "guaranteed_cores")] = _count(f"{family} guaranteed cores")
            self.fields[family_field(family, "borrow_limit")] = _count(f"{family} borrowing limit")
        if partial:
            for field in self.fields.values():
                field.required = False

    def clean_allowed_kinds(self) -> list[str] | None:
        kinds = self.cleaned_data.get("allowed_kinds")
        if self.partial and "allowed_kinds" not in self.data:
            return None
        if not kinds:
            raise forms.ValidationError("allow at least one job kind")
        # Every kind allowed is stored as [] ("all"), so a kind added later is allowed too.
        return [] if set(kinds) == set(Kind.values) else sorted(kinds)

    def quota_values(self) -> dict:
        """The validated values in jobs.services.quota_update's shape (only the given
        ones when partial)."""
        data = self.cleaned_data
        given = (lambda name: name in self.data) if self.partial else (lambda name: True)
        values = {name: data[name] for name in ("share", "monthly_core_hours", "max_runtime_s", "max_pending",
                                                "allowed_kinds") if given(name) and data.get(name) is not None}
        families: dict[str, dict[str, int]] = {}
        for family in Family.values:
            for name in ("guaranteed_cores", "borrow_limit"):
                key = family_field(family, name)
                if given(key) and data.get(key) is not None:
                    families.setdefault(family, {})[name] = data[key]
        if families:
            values["families"] = families
        return values

    @classmethod
    def initial_for(cls, usage) -> dict:
        """Initial values from a selectors_teams.TeamUsage."""
        q = usage.quota
        initial = {"share": q.share, "monthly_core_hours": q.monthly_core_hours, "max_runtime_s": q.max_runtime_s,
                   "max_pending": q.max_pending, "allowed_kinds": list(q.allowed_kinds or Kind.values)}
        for fam in usage.families:
            initial[family_field(fam.family, "guaranteed_cores")] = fam.guaranteed
            initial[family_field(fam.family, "borrow_limit")] = fam.borrow_limit
        return initial


def flatten_quota_body(body: dict) -> tuple[dict, dict[str, list[str]]]:
    """An API body ({"share": 2, "families": {"trn1": {"guaranteed_cores": 32}}} or the
    flat form keys) as form data, plus errors for keys that are no quota field."""
    data: dict = {}
    errors: dict[str, list[str]] = {}
    known = set(QuotaForm(partial=True).fields)
    for key, value in body.items():
        if key == "families" and isinstance(value, dict):
            for family, numbers in value.items():
                if family not in Family.values or not isinstance(numbers, dict):
                    errors[f"families.{family}"] = [f"unknown family (one of {', '.join(Family.values)})"]
                    continue
                for name, number in numbers.items():
                    if name not in ("guaranteed_cores", "borrow_limit"):
                        errors[f"families.{family}.{name}"] = ["unknown field (guaranteed_cores or borrow_limit)"]
                    else:
                        data[family_field(family, name)] = number
        elif key in known:
            data[key] = value
        else:
            errors[key] = ["unknown quota field"]
    return data, errors


