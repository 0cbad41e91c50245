"""Forms only validate. The same forms check HTML submissions and API JSON bodies,
so a bad field gets the same message, named after the field, in both."""
from __future__ import annotations

from django import forms
from django.core.exceptions import ValidationError
from django.utils.safestring import mark_safe

from jobs import safe_json
from jobs.models import Dataset, Family, Kind, ModelAsset, Team
from neuron_workers.backends.export_options import (
    AUTO_CAST,
    AUTO_CAST_TYPES,
    TASKS,
    ExportOptionError,
    check_export_options,
)
from neuron_workers.backends.export_options import DEFAULTS as EXPORT_DEFAULTS
from neuron_workers.backends.training_options import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_KEEP_CHECKPOINTS,
    LR_SCHEDULES,
    MAX_KEEP_CHECKPOINTS,
)

MAX_PROMPTS = 1000
MAX_PROMPT_CHARS = 8192


class TeamObjectField(forms.ModelChoiceField):
    """One of the form's team's objects (a model or a dataset), chosen by id.

    `where` (filter() arguments) narrows the choices beyond the team, e.g. to
    uncompiled models. The HTML select lists the queryset and a submitted id is
    looked up in it, so both offer the same objects; until the form limits the field
    to its team (TeamScopedForm) the queryset is empty, so a field nobody scoped
    accepts no id rather than any team's."""

    def __init__(self, model: type, *, where: dict | None = None, **kwargs):
        self.where = dict(where or {})
        super().__init__(queryset=model.objects.none(), **kwargs)

    def limit_to_team(self, team: Team) -> None:
        self.queryset = self.queryset.model.objects.filter(team=team, **self.where)


class TeamScopedForm(forms.Form):
    """A form whose model/dataset choices are limited to one team."""

    def __init__(self, *args, team: Team, **kwargs):
        super().__init__(*args, **kwargs)
        self.team = team
        if self.is_bound:
            # A field left out of an API body takes its documented default (its
            # initial value), as it would arrive pre-filled from the HTML form.
            missing = {name: f.initial for name, f in self.fields.items()
                       if f.initial is not None and name not in self.data}
            if missing:
                data = self.data.copy()
                for name, value in missing.items():
                    data[name] = value
                self.data = data
        for name, field in self.fields.items():
            if isinstance(field, TeamObjectField):
                field.limit_to_team(team)
            elif isinstance(field, forms.ModelChoiceField):
                field.queryset = field.queryset.filter(team=team)


MAX_HOSTS = 64  # hosts one job may ask for
PLACEMENT_FIELDS = ("family", "cores", "host_count", "same_network", "max_runtime_s")  # Job columns, not spec


class JobBaseForm(TeamScopedForm):
    family = forms.ChoiceField(choices=Family.choices, initial=Family.CPU)
    cores = forms.IntegerField(min_value=1, max_value=128 * MAX_HOSTS, initial=1,
                               help_text="In all: on several hosts, the host count times one host's cores.")
    host_count = forms.IntegerField(min_value=1, max_value=MAX_HOSTS, initial=1, required=False,
                                    help_text="Whole hosts of the family the job runs on at once (fine-tune only).")
    same_network = forms.BooleanField(required=False, help_text="Keep the hosts inside one network (EFA domain).")
    max_runtime_s = forms.IntegerField(min_value=1, max_value=30 * 24 * 3600, required=False,
                                       help_text="Stop the job after this many seconds (default: the team's limit).")

    kind: str = ""
    model_error = "Select a model of your team."

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.kind != Kind.FINETUNE:  # the other kinds run on one host: no host count to multiply by
            self.fields["cores"].help_text = ""

    def clean_host_count(self) -> int:
        count = self.cleaned_data.get("host_count") or 1
        if count > 1 and self.kind != Kind.FINETUNE:
            raise ValidationError("only fine-tune jobs run on several hosts")
        return count

    def spec(self) -> dict:
        """The validated spec stored on the Job (JSON-serializable)."""
        data = {k: v for k, v in self.cleaned_data.items() if k not in PLACEMENT_FIELDS}
        for key, value in list(data.items()):
            if isinstance(value, (ModelAsset, Dataset)):
                data[f"{key}_id"] = value.pk
                del data[key]
        return data


class CompileForm(JobBaseForm):
    kind = Kind.COMPILE
    model = TeamObjectField(ModelAsset, where={"format": ModelAsset.Format.HF},
                            error_messages={"invalid_choice": "Unknown model: select an uncompiled model of your team."})
    task = forms.ChoiceField(choices=[(t, t) for t in TASKS], initial="text-generation",
                             help_text="As optimum-cli export neuron --task.")
    batch_size = forms.IntegerField(min_value=1, max_value=64, initial=1)
    sequence_length = forms.IntegerField(min_value=1, max_value=8192, initial=32)
    tensor_parallel_size = forms.IntegerField(min_value=1, max_value=128, initial=1,
                                              help_text="NeuronCores the model is split over (one instance's).")
    auto_cast = forms.ChoiceField(choices=[(a, a) for a in AUTO_CAST], initial="none")
    auto_cast_type = forms.ChoiceField(choices=[(a, a) for a in AUTO_CAST_TYPES], initial="bf16")
    height = forms.IntegerField(min_value=8, max_value=2048, required=False, help_text="text-to-image only")
    width = forms.IntegerField(min_value=8, max_value=2048, required=False, help_text="text-to-image only")
    num_images_per_prompt = forms.IntegerField(min_value=1, max_value=16, required=False,
                                               help_text="text-to-image only")
    compiler_options = forms.CharField(required=False, help_text=mark_safe(  # flags in <code>: never wrapped at a dash
        "Allow-listed neuronx-cc flags, e.g. <code>--model-type=transformer</code> <code>-O2</code>"))

    def clean_compiler_options(self) -> list[str]:
        from neuron_workers.backends.compiler_options import CompilerOptionError, validate_compiler_options

        raw = self.cleaned_data.get("compiler_options") or ""
        options = raw if isinstance(raw, list) else raw.split()
        if not all(isinstance(o, str) for o in options):
            raise ValidationError("compiler_options must be strings")
        try:
            return validate_compiler_options(options, self.data.get("family") or Family.CPU)
        except CompilerOptionError as exc:
            raise ValidationError(str(exc)) from None

    def clean(self):
        data = super().clean()
        if self.errors:
            return data
        family = data.get("family") or Family.CPU
        image = data.get("task") == "text-to-image"
        for name in ("height", "width", "num_images_per_prompt"):
            if not image:
                data.pop(name, None)
            elif data.get(name) is None:
                data[name] = EXPORT_DEFAULTS[name]
        try:
            check_export_options(data, family)
        except ExportOptionError as exc:
            self.add_error(exc.field, str(exc))
            return data
        if data.get("tensor_parallel_size", 1) > data.get("cores", 1):
            self.add_error("cores", f"tensor_parallel_size {data['tensor_parallel_size']} needs as many cores; "
                                    f"the job asks for {data.get('cores')}")
            return data
        model, seq = data.get("model"), data.get("sequence_length")
        if model and image and not (model.meta or {}).get("diffusers"):
            self.add_error("task", "text-to-image needs a diffusers pipeline model")
        elif model and not image and (model.meta or {}).get("diffusers"):
            self.add_error("task", f"{model} is a diffusers pipeline: choose task text-to-image")
        elif model and seq and not image:
            limit = (model.meta or {}).get("max_positions")
            if limit and seq > limit:
                self.add_error("sequence_length", f"sequence_length {seq} is longer than the model's {limit} positions")
        return data


class FinetuneForm(JobBaseForm):
    kind = Kind.FINETUNE
    model = TeamObjectField(ModelAsset, where={"format": ModelAsset.Format.HF},
                            error_messages={"invalid_choice": "Unknown model: select an uncompiled model of your team."})
    dataset = TeamObjectField(Dataset,
                              error_messages={"invalid_choice": "Unknown dataset: select a dataset of your team."})
    steps = forms.IntegerField(min_value=1, max_value=1_000_000, required=False)
    epochs = forms.IntegerField(min_value=1, max_value=1000, required=False)
    learning_rate = forms.FloatField(min_value=1e-8, max_value=1.0, initial=1e-3)
    batch_size = forms.IntegerField(min_value=1, max_value=512, initial=4)
    sequence_length = forms.IntegerField(min_value=2, max_value=8192, initial=64)
    seed = forms.IntegerField(required=False, min_value=0, max_value=2**31 - 1)
    lr_schedule = forms.ChoiceField(choices=[(s, s) for s in LR_SCHEDULES], initial="constant",
                                    help_text="constant, or linear decay to 0 at the last step.")
    checkpoint_every = forms.IntegerField(
        min_value=1, max_value=1_000_000, initial=DEFAULT_CHECKPOINT_EVERY,
        help_text="Steps between checkpoints; a next attempt (preemption, a lost host, Suspend / Resume) "
                  "continues from the last one.")
    keep_checkpoints = forms.IntegerField(min_value=1, max_value=MAX_KEEP_CHECKPOINTS, initial=DEFAULT_KEEP_CHECKPOINTS,
                                          help_text="How many of the newest checkpoints are kept.")
    precompile = forms.BooleanField(required=False, help_text=mark_safe(
        "Neuron: run <code>neuron_parallel_compile</code> with a few trial steps first, filling the "
        "fleet's compile cache."))
    tensor_parallel_size = forms.IntegerField(min_value=1, max_value=64, initial=1, help_text=(
        "Neuron: NeuronCores each layer is split over (neuronx-distributed); must divide the cores."))
    zero_1 = forms.BooleanField(required=False, help_text="Neuron: shard the optimizer state over the "
                                                          "data-parallel ranks (ZeRO-1).")

    def clean(self):
        data = super().clean()
        model = data.get("model")
        if model is not None and not model.generates_text:
            self.add_error("model", f"{model} is a text-to-image pipeline: a fine-tune trains a text-generation model")
        if not self.errors:
            self._check_neuron_training(data)
        if not self.errors and not data.get("steps") and not data.get("epochs"):
            self.add_error("steps", "Give steps or epochs (a positive number).")
        elif data.get("steps") and data.get("epochs"):
            # The trainer takes one of them (steps would win): refuse both rather than ignore epochs.
            self.add_error("epochs", "Give steps or epochs, not both: steps counts optimizer steps, "
                                     "epochs counts passes over the dataset.")
        return data

    def _check_neuron_training(self, data: dict) -> None:
        """Precompile, tensor parallelism and ZeRO-1 are Neuron training options
        (neuron_workers.backends.neuron_parallel); the cpu backend trains data-parallel only."""
        from neuron_workers.backends.neuron_parallel import ParallelOptionError, check_parallel_options

        try:
            check_parallel_options(data.get("family") or Family.CPU, data.get("cores") or 1,
                                   data.get("tensor_parallel_size") or 1, bool(data.get("zero_1")),
                                   bool(data.get("precompile")))
        except ParallelOptionError as exc:
            self.add_error(exc.field, str(exc))


class PromptsField(forms.Field):
    """Prompts as a list of strings, or text with one prompt per line."""

    # What a JSON body may send (jobs.api.body.json_type_errors).
    json_type = (lambda value: isinstance(value, str) or (isinstance(value, list)
                                                          and all(isinstance(p, str) for p in value)),
                 "a string (one prompt per line) or a list of strings")

    def to_python(self, value):
        if value in (None, "", []):
            return []
        if isinstance(value, str):
            return [line for line in value.splitlines() if line.strip()]
        if isinstance(value, list) and all(isinstance(p, str) for p in value):
            return value
        raise ValidationError("prompts must be a list of strings or text with one prompt per line")

    def validate(self, value):
        if len(value) > MAX_PROMPTS:
            raise ValidationError(f"at most {MAX_PROMPTS} prompts per job (got {len(value)})")
        for i, prompt in enumerate(value, 1):
            if len(prompt) > MAX_PROMPT_CHARS:
                raise ValidationError(f"prompt {i} is longer than {MAX_PROMPT_CHARS} characters")
            if "\x00" in prompt:
                raise ValidationError(f"prompt {i} contains a NUL character (U+0000), which cannot be stored")


def parse_prompts_jsonl(raw: bytes) -> list[str]:
    """Prompts from a JSONL upload: each line an object with a "prompt" (or "text") string."""
    prompts: list[str] = []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError("prompts_file is not UTF-8 text") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = safe_json.loads(line)  # depth, NUL and lone surrogates refused too
        except safe_json.JSONInputError as exc:
            raise ValidationError(exc.sentence(f"prompts_file line {number}")) from None
        prompt = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
        if not isinstance(prompt, str):
            raise ValidationError(f'prompts_file line {number} needs a "prompt" string')
        prompts.append(prompt)
    return prompts


class InferenceForm(JobBaseForm):
    kind = Kind.INFERENCE
    model = TeamObjectField(ModelAsset,
                            error_messages={"invalid_choice": "Unknown model: select a model or compiled artifact of your team."})
    prompts = PromptsField(required=False, widget=forms.Textarea(attrs={"rows": 4}),
                           help_text="One prompt per line.")
    prompts_file = forms.FileField(required=False, help_text="Or a JSONL file with a \"prompt\" per line.")
    max_new_tokens = forms.IntegerField(min_value=1, max_value=4096, initial=16)
    temperature = forms.FloatField(min_value=0.0, max_value=5.0, initial=0.0)
    seed = forms.IntegerField(required=False, min_value=0, max_value=2**31 - 1)
    num_inference_steps = forms.IntegerField(required=False, min_value=1, max_value=200,
                                             help_text="Text-to-image: denoising steps (default 4).")
    guidance_scale = forms.FloatField(required=False, min_value=0.0, max_value=30.0,
                                      help_text="Text-to-image: classifier-free guidance (default 7.5).")

    def clean(self):
        data = super().clean()
        upload = data.pop("prompts_file", None)
        if upload is not None:
            if upload.size > 10 * 1024 * 1024:
                self.add_error("prompts_file", "prompts_file is larger than 10 MiB")
                return data
            try:
                data["prompts"] = list(data.get("prompts") or []) + parse_prompts_jsonl(upload.read())
            except ValidationError as exc:
                self.add_error("prompts_file", exc)
                return data
        if not self.errors and not data.get("prompts"):
            self.add_error("prompts", "Give at least one prompt.")
        elif len(data.get("prompts") or []) > MAX_PROMPTS:
            self.add_error("prompts", f"at most {MAX_PROMPTS} prompts per job")
        model = data.get("model")
        if model and not model.is_compiled and (model.meta or {}).get("diffusers"):
            # Images are made only at a compiled shape (a compile with task text-to-image).
            self.add_error("model", f"{model} is a diffusers pipeline: compile it with task text-to-image first, "
                                    "then run inference on the compiled artifact")
        elif model and not model.is_compiled and getattr(self.team, "cached_configurations_only", False):
            self.add_error("model", f"team {self.team.slug} runs cached configurations only: choose a compiled "
                                    f"configuration of {model} (or compile one first)")
        if model and model.is_compiled and data.get("prompts"):
            batch = (model.meta or {}).get("batch_size", 1)
            if batch != 1:
                self.add_error("model", f"compiled artifact has batch size {batch}; inference runs one prompt at a time")
            elif data.get("max_new_tokens"):
                from jobs.compile_cache.shapes import ShapeMismatch, check_prompts_fit

                try:
                    check_prompts_fit(model, data["prompts"], data["max_new_tokens"])
                except ShapeMismatch as exc:
                    self.add_error(exc.field, str(exc))
        return data


JOB_FORMS: dict[str, type[JobBaseForm]] = {Kind.COMPILE: CompileForm, Kind.FINETUNE: FinetuneForm, Kind.INFERENCE: InferenceForm}


