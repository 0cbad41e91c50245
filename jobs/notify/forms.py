"""Forms of the notifications page. They only validate: jobs.notify.services creates
subscriptions (with the SSRF check of their target) and applies an alert policy
(audited)."""
from __future__ import annotations

from django import forms

from jobs.models import EventKind, Subscription, TeamAlertPolicy

MAX_THRESHOLDS = 10


class SubscriptionForm(forms.Form):
    scope = forms.ChoiceField(choices=Subscription.Scope.choices, initial=Subscription.Scope.SELF)
    channel = forms.ChoiceField(choices=Subscription.Channel.choices)
    target = forms.CharField(max_length=500, help_text="An email address, or the https URL of a Slack incoming "
                                                       "webhook or of your signed-webhook receiver.")
    events = forms.MultipleChoiceField(choices=EventKind.choices, widget=forms.CheckboxSelectMultiple)

    def __init__(self, *args, may_subscribe_team: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if not may_subscribe_team:
            self.fields["scope"].choices = [(Subscription.Scope.SELF, Subscription.Scope.SELF.label)]


class AlertPolicyForm(forms.Form):
    """A team's idle-core rule and budget thresholds, in the units people think in
    (percent of a core; minutes; percents of the monthly budget)."""

    idle_util_below_pct = forms.FloatField(
        label="Idle below (% of a core)", min_value=0.1, max_value=100,
        help_text="A job is idle when every core it holds stays under this utilization.")
    idle_minutes = forms.IntegerField(label="For (minutes)", min_value=1, max_value=24 * 60)
    idle_action = forms.ChoiceField(label="Then", choices=TeamAlertPolicy.IdleAction.choices)
    idle_grace_minutes = forms.IntegerField(
        label="Grace before stopping (minutes)", min_value=0, max_value=24 * 60,
        help_text="With \"stop\": a flagged job still idle this much later is stopped.")
    budget_thresholds = forms.CharField(
        label="Budget alerts at (% of the monthly budget)", required=False, max_length=200,
        help_text="Comma-separated percents, e.g. 50, 80, 100. Empty: the site's default.")

    @classmethod
    def initial_of(cls, policy: TeamAlertPolicy) -> dict:
        return {"idle_util_below_pct": round(policy.idle_util_below * 100, 3), "idle_minutes": policy.idle_minutes,
                "idle_action": policy.idle_action, "idle_grace_minutes": policy.idle_grace_minutes,
                "budget_thresholds": ", ".join(str(p) for p in policy.budget_thresholds)}

    def clean_budget_thresholds(self) -> list[int]:
        raw = self.cleaned_data["budget_thresholds"].replace(";", ",")
        values = []
        for item in (part.strip().rstrip("%").strip() for part in raw.split(",")):
            if not item:
                continue
            if not item.isdigit() or not 1 <= int(item) <= 1000:
                raise forms.ValidationError(f"{item!r} is not a whole percent from 1 to 1000")
            values.append(int(item))
        if len(set(values)) > MAX_THRESHOLDS:
            raise forms.ValidationError(f"at most {MAX_THRESHOLDS} thresholds")
        return sorted(set(values))

    def policy_values(self) -> dict:
        """The TeamAlertPolicy fields these answers set."""
        data = self.cleaned_data
        return {"idle_util_below": round(data["idle_util_below_pct"] / 100, 6), "idle_minutes": data["idle_minutes"],
                "idle_action": data["idle_action"], "idle_grace_minutes": data["idle_grace_minutes"],
                "budget_thresholds": data["budget_thresholds"]}
