"""The single-machine default (`make run`) is SQLite: paths with hand-written SQL
must work there too. The rest of the suite runs on PostgreSQL, so these run a
child process against a fresh SQLite file."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
from datetime import timedelta
from django.contrib.auth import get_user_model
from django.utils import timezone
from jobs.models import ApiToken
from jobs.tokens import token_create, token_user

user = get_user_model().objects.create_user("sqlite-user", password="x")
raw, token = token_create(user=user, name="t")
assert token_user(raw) == user                      # first use: records last_used_at
assert token_user(raw) == user                      # within the throttle window
stale = timezone.now() - timedelta(hours=2)
ApiToken.objects.filter(pk=token.pk).update(last_used_at=stale)
assert token_user(raw) == user                      # outside it: written again
token.refresh_from_db()
assert token.last_used_at > stale, token.last_used_at
assert token_user("nd_not-a-token") is None
print("ok")
"""


def test_api_tokens_authenticate_repeatedly_on_sqlite(tmp_path):
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'nd.sqlite3'}"}
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True,
                   timeout=300)
    done = subprocess.run([sys.executable, "manage.py", "shell", "-c", SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
