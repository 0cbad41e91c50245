"""Deploy settings: `manage.py check --deploy` is clean as soon as DEBUG is off and
SECRET_KEY and ALLOWED_HOSTS are set; each HTTPS default can be switched off for a
plain-HTTP install; Redis over TLS with a password and PostgreSQL with sslmode are
read from their URLs. Settings are read in a fresh interpreter, as a deployment
would read them."""
from __future__ import annotations

import json
import os
import secrets
import ssl
import subprocess
import sys

import pytest

from tests.conftest import ROOT

DEPLOY = {"DEBUG": "0", "SECRET_KEY": secrets.token_urlsafe(50), "ALLOWED_HOSTS": "neurondeck.example.com"}
SWITCHES = ("SECURE_SSL_REDIRECT", "SECURE_COOKIES", "SECURE_HSTS_SECONDS", "SECURE_HSTS_INCLUDE_SUBDOMAINS",
            "SECURE_HSTS_PRELOAD", "TRUST_X_FORWARDED_PROTO", "DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL")

SHOW = """
import json, django
from django.conf import settings
django.setup()
from jobs.live.store import redis
from webapp.celery import app
pool = redis().connection_pool
broker = app.connection_for_write()
print(json.dumps({
    "redirect": settings.SECURE_SSL_REDIRECT, "session_secure": settings.SESSION_COOKIE_SECURE,
    "csrf_secure": settings.CSRF_COOKIE_SECURE, "hsts": settings.SECURE_HSTS_SECONDS,
    "proxy_header": settings.SECURE_PROXY_SSL_HEADER, "db": settings.DATABASES["default"],
    "broker_ssl": settings.CELERY_BROKER_USE_SSL,
    "live_class": pool.connection_class.__name__, "live_kwargs": {k: v for k, v in pool.connection_kwargs.items()
                                                                  if k in ("host", "port", "db", "password", "ssl_ca_certs", "ssl_cert_reqs")},
    "broker_password": broker.password, "broker_ssl_conn": broker.ssl, "broker_transport": broker.transport_cls,
}, default=str))
"""


def run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in SWITCHES + tuple(DEPLOY)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env={**base, **env}, capture_output=True, text=True,
                          timeout=120)


def settings_of(**env: str) -> dict:
    done = run(["-c", SHOW], DJANGO_SETTINGS_MODULE="webapp.settings", **env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_check_deploy_is_clean_with_debug_off_and_a_secret_key_and_hosts():
    done = run(["manage.py", "check", "--deploy", "--fail-level", "WARNING"], **DEPLOY)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues" in done.stdout


def test_https_is_the_default_with_debug_off():
    values = settings_of(**DEPLOY)
    assert values["redirect"] and values["session_secure"] and values["csrf_secure"]
    assert values["hsts"] == 365 * 24 * 3600
    assert values["proxy_header"] == ["HTTP_X_FORWARDED_PROTO", "https"]


def test_each_https_default_is_switched_off_for_a_plain_http_install():
    values = settings_of(**DEPLOY, SECURE_SSL_REDIRECT="0", SECURE_COOKIES="0", SECURE_HSTS_SECONDS="0",
                         TRUST_X_FORWARDED_PROTO="0")
    assert not values["redirect"] and not values["session_secure"] and not values["csrf_secure"]
    assert values["hsts"] == 0 and values["proxy_header"] is None


def test_a_local_debug_install_has_none_of_them():
    values = settings_of(DEBUG="1")
    assert (values["redirect"], values["session_secure"], values["hsts"], values["proxy_header"]) == (False, False, 0, None)


def test_postgresql_sslmode_and_redis_tls_with_a_password_are_read_from_their_urls():
    values = settings_of(
        **DEPLOY,
        DATABASE_URL="postgres://nd:p%40ss@db.example.com:5432/neurondeck?sslmode=verify-full&sslrootcert=/etc/ssl/db-ca.pem",
        REDIS_URL="rediss://:s3cret@redis.example.com:6380/2?ssl_ca_certs=/etc/ssl/redis-ca.pem")
    db = values["db"]
    assert (db["HOST"], db["PASSWORD"], db["NAME"]) == ("db.example.com", "p@ss", "neurondeck")
    assert db["OPTIONS"]["sslmode"] == "verify-full" and db["OPTIONS"]["sslrootcert"] == "/etc/ssl/db-ca.pem"
    # the live-metrics client: TLS, the password, the CA
    assert values["live_class"] == "SSLConnection"
    assert values["live_kwargs"]["password"] == "s3cret" and values["live_kwargs"]["port"] == 6380
    assert values["live_kwargs"]["ssl_ca_certs"] == "/etc/ssl/redis-ca.pem"
    # the Celery broker: TLS that checks the certificate (kombu's own default would not)
    assert values["broker_password"] == "s3cret"
    assert values["broker_ssl"] == {"ssl_cert_reqs": int(ssl.CERT_REQUIRED), "ssl_ca_certs": "/etc/ssl/redis-ca.pem"}
    assert values["broker_ssl_conn"] == values["broker_ssl"]


def test_a_plain_redis_url_has_no_tls_options():
    assert settings_of(REDIS_URL="redis://:pw@127.0.0.1:6379/0")["broker_ssl"] is None


@pytest.mark.parametrize("url, expected", [
    ("rediss://h/0", {"ssl_cert_reqs": ssl.CERT_REQUIRED}),
    ("rediss://h/0?ssl_cert_reqs=none", {"ssl_cert_reqs": ssl.CERT_NONE}),
    ("rediss://h/0?ssl_cert_reqs=CERT_OPTIONAL&ssl_certfile=/c.pem&ssl_keyfile=/k.pem",
     {"ssl_cert_reqs": ssl.CERT_OPTIONAL, "ssl_certfile": "/c.pem", "ssl_keyfile": "/k.pem"}),
])
def test_rediss_options(url, expected):
    from webapp.settings import redis_ssl_options

    assert redis_ssl_options(url) == expected


def test_a_bad_ssl_cert_reqs_is_refused_naming_it():
    from webapp.settings import redis_ssl_options

    with pytest.raises(ValueError, match="ssl_cert_reqs"):
        redis_ssl_options("rediss://h/0?ssl_cert_reqs=maybe")


def test_the_broker_url_keeps_its_other_parameters_and_loses_the_tls_ones():
    from webapp.settings import without_ssl_query

    assert without_ssl_query("rediss://:pw@h:6380/0?ssl_cert_reqs=none&ssl_ca_certs=/a&health=1") == \
        "rediss://:pw@h:6380/0?health=1"
    assert without_ssl_query("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_docker_compose_runs_its_plain_http_web_service_with_these_settings():
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env = {k: str(v) for k, v in compose["services"]["web"]["environment"].items()}
    done = run(["manage.py", "check"], **env)
    assert done.returncode == 0, done.stdout + done.stderr
    values = settings_of(**env)
    assert not values["redirect"] and not values["session_secure"] and values["hsts"] == 0
    assert values["proxy_header"] is None


def test_plain_http_is_redirected_and_a_proxys_https_is_honoured(settings, db):
    from django.test import Client

    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_HSTS_SECONDS = 3600
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    client = Client()
    response = client.get("/login/")
    assert response.status_code == 301 and response["Location"] == "https://testserver/login/"
    response = client.get("/login/", HTTP_X_FORWARDED_PROTO="https")
    assert response.status_code == 200 and response["Strict-Transport-Security"].startswith("max-age=3600")
