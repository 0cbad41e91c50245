"""Forms only validate: an endpoint's fields for create and change. The page and the
API use the same forms, so a bad field gets the same message, named after it."""
from __future__ import annotations

from django import forms

from jobs.lifecycle.forms import TeamObjectField, TeamScopedForm
from jobs.models import Family, ModelAsset

# The serving options an endpoint keeps in Endpoint.options (and each revision's).
OPTION_FIELDS = ("max_batch_size", "max_seq_len", "max_concurrent")
MAX_REPLICAS = 64


OPTION_DEFAULTS = {"max_batch_size": 8, "max_seq_len": 256, "max_concurrent": 16}


def _option_fields(*, required: bool) -> dict[str, forms.Field]:
    """The serving options' fields: with their defaults on create, optional without
    defaults on a change (left out = unchanged)."""
    def field(name: str, low: int, high: int, text: str) -> forms.IntegerField:
        return forms.IntegerField(min_value=low, max_value=high, required=required, help_text=text,
                                  initial=OPTION_DEFAULTS[name] if required else None)

    return {"max_batch_size": field("max_batch_size", 1, 256, "Requests that share one forward pass at most."),
            "max_seq_len": field("max_seq_len", 8, 32768, "Prompt plus generated tokens, at most."),
            "max_concurrent": field("max_concurrent", 1, 4096,
                                    "Requests one replica takes at once; the autoscaler aims at 70% of it.")}


def _check_model_for_family(model: ModelAsset | None, family: str) -> str | None:
    """Why `model` cannot be served on `family`, or None."""
    if model is None:
        return None
    if not model.generates_text:
        return f"{model} does not generate text (a text-to-image pipeline or another task); an endpoint serves a " \
               "text-generation model."
    if model.format == ModelAsset.Format.NEURON and family == Family.CPU:
        return f"{model} is compiled for Neuron; a cpu endpoint needs a Hugging Face folder or a cpu artifact."
    if model.format == ModelAsset.Format.TORCHSCRIPT and family != Family.CPU:
        return f"{model} is a cpu (TorchScript) artifact; a {family} endpoint needs a Neuron-compiled model or a folder."
    return None


class EndpointCreateForm(TeamScopedForm):
    name = forms.SlugField(max_length=63, help_text="Letters, digits, - and _: part of the endpoint's URL.")
    model = TeamObjectField(ModelAsset, error_messages={"invalid_choice": "Select a model of your team."})
    family = forms.ChoiceField(choices=Family.choices, initial=Family.CPU)
    cores_per_replica = forms.IntegerField(min_value=1, max_value=128, initial=1)
    min_replicas = forms.IntegerField(min_value=0, max_value=MAX_REPLICAS, initial=1,
                                      help_text="0: no replica while idle; the first request waits for a cold start.")
    max_replicas = forms.IntegerField(min_value=1, max_value=MAX_REPLICAS, initial=1)
    max_batch_size, max_seq_len, max_concurrent = _option_fields(required=True).values()

    field_order = ["name", "model", "family", "cores_per_replica", "min_replicas", "max_replicas", *OPTION_FIELDS]

    def clean(self):
        data = super().clean()
        low, high = data.get("min_replicas"), data.get("max_replicas")
        if low is not None and high is not None and high < low:
            self.add_error("max_replicas", f"must be at least min_replicas ({low}).")
        problem = _check_model_for_family(data.get("model"), data.get("family", ""))
        if problem:
            self.add_error("model", problem)
        return data

    def options(self) -> dict:
        return {name: self.cleaned_data[name] for name in OPTION_FIELDS}


class EndpointChangeForm(TeamScopedForm):
    """A change: every field optional, a field left out keeps its value. A new model,
    options or cores per replica start a rollout; min / max only rescale."""

    model = TeamObjectField(ModelAsset, required=False,
                            error_messages={"invalid_choice": "Select a model of your team."})
    cores_per_replica = forms.IntegerField(min_value=1, max_value=128, required=False)
    min_replicas = forms.IntegerField(min_value=0, max_value=MAX_REPLICAS, required=False)
    max_replicas = forms.IntegerField(min_value=1, max_value=MAX_REPLICAS, required=False)
    max_batch_size, max_seq_len, max_concurrent = _option_fields(required=False).values()

    field_order = ["model", "cores_per_replica", "min_replicas", "max_replicas", *OPTION_FIELDS]

    def __init__(self, *args, endpoint, **kwargs):
        self.endpoint = endpoint
        super().__init__(*args, team=endpoint.team, **kwargs)

    def clean(self):
        data = super().clean()
        low = data.get("min_replicas")
        high = data.get("max_replicas")
        low = self.endpoint.min_replicas if low is None else low
        high = self.endpoint.max_replicas if high is None else high
        if high < low:
            self.add_error("max_replicas" if self.data.get("max_replicas") not in (None, "") else "min_replicas",
                           f"min_replicas ({low}) must not be above max_replicas ({high}).")
        problem = _check_model_for_family(data.get("model"), self.endpoint.family)
        if problem:
            self.add_error("model", problem)
        return data

    def changes(self) -> dict:
        """The fields given, with their new values (model as the ModelAsset)."""
        return {name: value for name, value in self.cleaned_data.items()
                if value is not None and self.data.get(name) not in (None, "")}
