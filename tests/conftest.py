"""The fixed cast and the real components every test shares.

Cast: alice manages team "vision" and bob is a member of it; charlie manages
team "audio" and has no access to vision; vera is a viewer in vision; admin is staff.
So every permission test reads "charlie gets 404".
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.workers import Worker, process_env

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
PASSWORD = "pw-for-tests-1"

# Whole modules that need PostgreSQL itself (row locks under real concurrency,
# server-side failures), not just a database: they run on PostgreSQL only. A test
# elsewhere says so with @pytest.mark.postgres_only.
POSTGRES_ONLY_MODULES = {"test_quota_race.py", "test_faults.py"}


def pytest_collection_modifyitems(config, items):
    from django.conf import settings

    on_sqlite = settings.DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3"
    skip = pytest.mark.skip(reason="PostgreSQL only (this run is on SQLite)")
    for item in items:
        if item.path.name in POSTGRES_ONLY_MODULES:
            item.add_marker(pytest.mark.postgres_only)
        if on_sqlite and item.get_closest_marker("postgres_only"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _storage(settings, tmp_path_factory):
    # A storage root of each test's own: job folders are named by job id, and ids
    # start again at 1 in each test on SQLite (a rolled-back transaction takes the
    # sequence back with it; PostgreSQL's sequences never go back).
    root = tmp_path_factory.mktemp("storage")
    settings.STORAGE_ROOT = root
    # A fast hasher for the cast: PBKDF2's deliberate cost buys nothing in tests.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    # Each test has a history of its own: no fair-share usage (per process, and the
    # closed days kept in Django's cache) from an earlier test.
    from jobs.quotas.selectors import clear_usage_cache

    clear_usage_cache()
    return root


@pytest.fixture(autouse=True)
def _no_gang_memory():
    # The hosts the last dispatch reserved each waiting gang (kept in Redis across
    # runs) belong to another test's jobs, whose ids a test may reuse.
    from django.core.cache import caches

    from jobs.lifecycle.scheduler import GANG_HOSTS

    caches["shared"].delete(GANG_HOSTS)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from neuron_workers.backends.tinymodel import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-gpt")


@pytest.fixture(scope="session")
def demo_dataset_file(tmp_path_factory) -> Path:
    from neuron_workers.backends.tinymodel import create_demo_dataset

    return create_demo_dataset(tmp_path_factory.mktemp("data") / "demo.jsonl", rows=64)


@pytest.fixture
def cast(db, django_user_model):
    from jobs.models import Role
    from jobs.teams.services import membership_set, team_create

    users = {name: django_user_model.objects.create_user(name, f"{name}@example.com", PASSWORD)
             for name in ("alice", "bob", "charlie", "vera")}
    users["admin"] = django_user_model.objects.create_superuser("admin", "admin@example.com", PASSWORD)
    vision = team_create(slug="vision", name="Vision")
    audio = team_create(slug="audio", name="Audio")
    membership_set(team=vision, user=users["alice"], role=Role.MANAGER)
    membership_set(team=vision, user=users["bob"], role=Role.MEMBER)
    membership_set(team=vision, user=users["vera"], role=Role.VIEWER)
    membership_set(team=audio, user=users["charlie"], role=Role.MANAGER)
    return type("Cast", (), {**users, "vision": vision, "audio": audio})


@pytest.fixture
def cpu_host(db):
    """The host the test worker serves (NEURONDECK_HOST=test-host)."""
    from django.utils import timezone

    from jobs.models import Host

    return Host.objects.create(name="test-host", family="cpu", core_ids=list(range(4)), backend="cpu",
                               memory_bytes=8 << 30, last_heartbeat=timezone.now())


@pytest.fixture
def tiny_model(cast, tiny_model_dir):
    from jobs.assets.services import model_register
    from jobs.assets.uploads import model_meta

    from django.conf import settings

    dest = Path(settings.STORAGE_ROOT) / "models" / "vision" / "tiny"
    shutil.copytree(tiny_model_dir, dest)
    return model_register(team=cast.vision, user=cast.alice, name="tiny-gpt", path=dest, meta=model_meta(dest))


@pytest.fixture
def dataset(cast, demo_dataset_file):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from jobs.assets.services import dataset_upload

    upload = SimpleUploadedFile("demo.jsonl", demo_dataset_file.read_bytes())
    return dataset_upload(team=cast.vision, user=cast.alice, name="demo", upload=upload)


@pytest.fixture
def fresh_scheduler(settings):
    """Scheduling state with no memory between tests: fair-share usage read fresh on
    every call, no cached start estimates, no recent dispatch run to wait behind."""
    from jobs.lifecycle import forecasts, scheduler
    from jobs.quotas.selectors import clear_usage_cache

    settings.FAIRSHARE_CACHE_S = 0
    clear_usage_cache()
    forecasts.clear_cache()
    scheduler._last_run.update(ended=0.0, waiting=0)
    yield
    forecasts.clear_cache()


def api_client(user):
    """A Django test client authenticated with a fresh API token of `user`."""
    from django.test import Client

    from jobs.teams.tokens import token_create

    raw, _ = token_create(user=user, name="tests")
    return Client(HTTP_AUTHORIZATION=f"Bearer {raw}")


@pytest.fixture
def bob(cast):
    """Bob (a member of vision) through the API, with a token of his own."""
    return api_client(cast.bob)


@pytest.fixture
def bob_page(cast):
    """Bob logged in to the web pages."""
    from django.test import Client

    client = Client()
    client.force_login(cast.bob)
    return client


# --- a real Celery worker --------------------------------------------------------

@pytest.fixture
def celery_worker_proc(transactional_db, _storage, tmp_path):
    """A real `celery worker` serving the scheduler queue and host.test-host, against
    the test database and Redis (flushed first: no message of an earlier test).
    Yields the running tests.workers.Worker; stops it and its zygote afterwards."""
    from jobs.live.store import redis

    redis().flushdb()
    worker = Worker(tmp_path / "worker.log", process_env(storage_root=_storage), queues="scheduler,host.test-host",
                    name="test")
    worker.start()
    yield worker
    worker.close()


# --- a real browser ---------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-gpu"]
SHOTS = ROOT / "test-artifacts"  # screenshots for a human to look at (gitignored)


@pytest.fixture
def browser(monkeypatch):
    """Headless Debian Chromium driven by Playwright's sync API."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    from django.db import connections
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an asyncio loop in this thread; the test's own ORM
    # calls (fixtures, assertions) are still plain synchronous code.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
        # While Playwright's loop counts as running, Django keeps the test's database
        # connection in context-local storage, out of reach of the teardown's
        # close_all(); close it here, or the test database cannot be dropped.
        connections.close_all()


def browser_page(browser, width: int = 1280, height: int = 900):
    """A new browser page whose waits (navigation, selectors, wait_for_function and
    expect()) all end at the shared deadline, polling.DEADLINE_S."""
    from playwright.sync_api import expect

    from polling import DEADLINE_S

    expect.set_options(timeout=DEADLINE_S * 1000)
    page = browser.new_context(viewport={"width": width, "height": height}).new_page()
    page.set_default_timeout(DEADLINE_S * 1000)
    return page


def log_in(browser, base_url: str, username: str, width: int = 1280, height: int = 900):
    """A new browser page logged in as `username`, on its landing page."""
    import re

    page = browser_page(browser, width, height)
    page.goto(f"{base_url}/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/teams/[\w-]+/jobs/$"))
    return page

