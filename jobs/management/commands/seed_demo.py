"""Create the demo cast for a fresh install: an admin, a demo team with two members,
a tiny locally created causal LM and a small text dataset. Idempotent."""
from __future__ import annotations

import shutil

from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management.base import BaseCommand

from jobs.assets import storage
from jobs.assets.services import dataset_upload, model_register
from jobs.assets.uploads import model_meta
from jobs.models import Dataset, Family, ModelAsset, Role, Team, default_family_quota
from jobs.teams.services import membership_set, team_create

DEMO_PASSWORD = "neurondeck"


class Command(BaseCommand):
    help = "Create the demo admin, team, members, tiny model and dataset (idempotent)."

    def handle(self, *args, **options) -> None:
        from neuron_workers.backends.tinymodel import create_demo_dataset, create_tiny_model

        users = get_user_model()
        admin = users.objects.filter(username="admin").first() or users.objects.create_superuser(
            "admin", "admin@example.com", DEMO_PASSWORD)
        team = Team.objects.filter(slug="demo").first()
        if team is None:
            team = team_create(slug="demo", name="Demo team", actor=admin)
            # Guarantee the demo team what the local CPU host has (its job slots), not
            # the default 8: a guarantee beyond the fleet warns on the quota page.
            from jobs.quotas.services import quota_update
            from neuron_workers.agent import cpu_slots

            slots = cpu_slots()
            quota_update(team=team, actor=admin, values={"families": {Family.CPU: {
                "guaranteed_cores": min(slots, default_family_quota(Family.CPU)[0])}}})
        for name, role in (("alice", Role.MANAGER), ("bob", Role.MEMBER)):
            user = users.objects.filter(username=name).first() or users.objects.create_user(
                name, f"{name}@example.com", DEMO_PASSWORD)
            membership_set(team=team, user=user, role=role, actor=admin)
        if not ModelAsset.objects.filter(team=team, name="tiny-gpt").exists():
            dest = storage.root() / "models" / team.slug / "tiny-gpt"
            shutil.rmtree(dest, ignore_errors=True)
            create_tiny_model(dest)
            model_register(team=team, user=admin, name="tiny-gpt", path=dest, meta=model_meta(dest))
        if not ModelAsset.objects.filter(team=team, name="tiny-sd").exists():
            # A tiny random Stable Diffusion pipeline: compile it with task text-to-image
            # (e.g. 32x32), then run inference on the compiled artifact for images.
            from neuron_workers.backends.tinydiffusion import create_tiny_pipeline

            dest = storage.root() / "models" / team.slug / "tiny-sd"
            shutil.rmtree(dest, ignore_errors=True)
            create_tiny_pipeline(dest)
            model_register(team=team, user=admin, name="tiny-sd", path=dest, meta={"diffusers": True})
        if not Dataset.objects.filter(team=team, name="demo-text").exists():
            tmp = storage.root() / "tmp-demo.jsonl"
            tmp.parent.mkdir(parents=True, exist_ok=True)
            create_demo_dataset(tmp, rows=200)
            dataset_upload(team=team, user=admin, name="demo-text",
                           upload=SimpleUploadedFile("demo.jsonl", tmp.read_bytes()))
            tmp.unlink()
        self.stdout.write(f"demo logins (password {DEMO_PASSWORD!r}): admin (staff), alice (manager), bob (member)")
