"""NeuronDeck settings: one file, read top to bottom, driven by the environment.

Every value has a default that runs a local single-machine instance (SQLite, a
local Redis); a deployment differs only by environment variables.
"""
from __future__ import annotations

import json
import os
import ssl
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit, urlunsplit

import dj_database_url

from neuron_workers import config as neuron_config

BASE_DIR = Path(__file__).resolve().parent.parent


def envbool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def envint(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def envlist(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def envnetworks(name: str, default: str) -> list[str]:
    """A comma-separated list of CIDR networks (a bare address is its /32 or /128)."""
    import ipaddress

    try:
        return [str(ipaddress.ip_network(item, strict=False)) for item in envlist(name, default)]
    except ValueError as exc:
        raise ValueError(f"{name} must be comma-separated networks such as 10.0.0.0/8: {exc}") from None


def envjson(name: str, default):
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be JSON, got {raw!r} ({exc})") from None


SSL_QUERY = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def redis_ssl_options(url: str) -> dict | None:
    """The TLS options of a rediss:// URL for Celery's broker (None for redis://):
    the certificate is required unless the URL's ssl_cert_reqs says otherwise."""
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    levels = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
    reqs = query.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    if reqs not in levels:
        raise ValueError(f"ssl_cert_reqs in a rediss:// URL must be required, optional or none, got {reqs!r}")
    return {"ssl_cert_reqs": levels[reqs], **{key: query[key] for key in SSL_QUERY[1:] if key in query}}


def without_ssl_query(url: str) -> str:
    """`url` without its ssl_* parameters: kombu would take those in place of the
    broker's TLS options (and with no ssl_cert_reqs among them, check nothing)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in SSL_QUERY]
    return urlunsplit(parts._replace(query=urlencode(query)))


DEBUG = envbool("DEBUG", True)
SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ValueError("SECRET_KEY must be set when DEBUG is off")
    SECRET_KEY = "dev-only-insecure-key"
ALLOWED_HOSTS = envlist("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver")
CSRF_TRUSTED_ORIGINS = envlist("CSRF_TRUSTED_ORIGINS", "http://localhost:8000,http://127.0.0.1:8000")
CSRF_FAILURE_VIEW = "jobs.pages.csrf_failure"  # the styled 403 saying what to do (Django's own breaks the CSP)

STORAGE_ROOT = Path(os.environ.get("STORAGE_ROOT", BASE_DIR / "var" / "storage")).resolve()
# Django's defaults, except persistent connections: with a connection opened per
# request and per task (DB_CONN_MAX_AGE=0), bench/dispatch.py's burst runs a third to
# a half fewer jobs per second and submit -> running takes longer.
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", f"sqlite:///{BASE_DIR / 'var' / 'neurondeck.sqlite3'}"),
        conn_max_age=envint("DB_CONN_MAX_AGE", 60),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # SQLite is the single-machine default: WAL + a busy timeout let the web app,
    # scheduler and worker share the file without "database is locked" errors.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    Path(DATABASES["default"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    # Tests: a file beside the database instead of Django's in-memory default, so the
    # Celery worker a test starts in another process shares the test database.
    _name = Path(DATABASES["default"]["NAME"])
    DATABASES["default"]["TEST"] = {"NAME": str(_name.with_name(f"test_{_name.name}"))}
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},  # per process
    # What one process computes for all (start-time estimates): Redis, seen by the web
    # app's processes and the Celery workers alike.
    "shared": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL,
               "KEY_PREFIX": "nd", "OPTIONS": {"socket_timeout": 5, "socket_connect_timeout": 2}},
}

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "ninja",  # so /api/v1/docs uses the Swagger UI files ninja ships, not its CDN template
    "axes",  # login throttling and lockout (see "Security" below)
    "jobs",
]
MIDDLEWARE = [
    # The security headers first, so they reach every answer, the ones middleware below
    # makes in place of a view's too (a JSON 404 / 405, a NUL refused, a page's 405).
    "django.middleware.security.SecurityMiddleware",
    "csp.middleware.CSPMiddleware",  # the Content-Security-Policy header (see "Security" below)
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "jobs.middleware.HttpBasics",  # no body on HEAD; the API's 404 / 405 in JSON
    "jobs.middleware.RefuseNulInUrl",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "jobs.middleware.PageMethodNotAllowed",  # a page's 405 as a page, with the user's navigation
    "django.contrib.messages.middleware.MessageMiddleware",
    "axes.middleware.AxesMiddleware",  # last: turns a locked-out login into its answer
]
ROOT_URLCONF = "webapp.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    }
]
WSGI_APPLICATION = "webapp.wsgi.application"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_PASSWORD_VALIDATORS = [{"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"}]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

# --- Security: logins ---------------------------------------------------------------
# Passwords are hashed with Argon2 (argon2-cffi). The other hashers stay listed so
# older PBKDF2 / scrypt hashes still verify; Django re-hashes such a password with the
# first hasher at the user's next successful login.
PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.Argon2PasswordHasher",
    "django.contrib.auth.hashers.PBKDF2PasswordHasher",
    "django.contrib.auth.hashers.PBKDF2SHA1PasswordHasher",
    "django.contrib.auth.hashers.ScryptPasswordHasher",
]
# django-axes refuses a login for LOGIN_LOCKOUT_MINUTES after LOGIN_FAILURE_LIMIT
# failures of one username (from any address) or from one address (for any username).
# Its backend comes first: a locked-out login is refused before the password is
# checked. Every login, failure and lockout is an AuditEntry (jobs.teams.logins).
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "jobs.teams.sso.PasswordBackend",
                           "jobs.teams.sso.SsoBackend"]
LOGIN_FAILURE_LIMIT = envint("LOGIN_FAILURE_LIMIT", 5)
LOGIN_LOCKOUT_MINUTES = envint("LOGIN_LOCKOUT_MINUTES", 15)
AXES_FAILURE_LIMIT = LOGIN_FAILURE_LIMIT
AXES_COOLOFF_TIME = timedelta(minutes=LOGIN_LOCKOUT_MINUTES)
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_RESET_ON_SUCCESS = True  # a successful login clears that username's failures
AXES_DISABLE_ACCESS_LOG = True  # successful logins are in the audit log already
AXES_LOCKOUT_CALLABLE = "jobs.teams.logins.lockout_response"
AXES_CLIENT_IP_CALLABLE = "jobs.teams.logins.client_ip"
AXES_USERNAME_CALLABLE = "jobs.teams.logins.lockout_username"
# Password logins (the login form and the Django admin's): PASSWORD_LOGIN=0 turns them
# off for everyone but superusers, who keep a break-glass form at /login/?local=1 for
# when the identity provider is down (jobs.teams.sso.PasswordBackend).
PASSWORD_LOGIN = envbool("PASSWORD_LOGIN", True)

# --- Security: single sign-on (OpenID Connect, mozilla-django-oidc) -----------------------
# On when OIDC_ISSUER and OIDC_CLIENT_ID are set. The provider's endpoints come from its
# discovery document ({issuer}/.well-known/openid-configuration, read at the first
# sign-in) unless set one by one. The client is registered at the provider with the
# redirect URI https://<this site>/sso/callback/. A user is created at first sign-in
# (identified by issuer + subject, never by e-mail); at every sign-in the groups in
# OIDC_GROUPS_CLAIM set the memberships and roles of the teams OIDC_GROUP_MAP names, and
# staff status when the map has a "staff" entry (jobs.teams.sso).
# OIDC_GROUP_MAP is JSON: {"<group>": "<team slug>:<viewer|member|manager>" or "staff",
# or a list of those}.
OIDC_ISSUER = os.environ.get("OIDC_ISSUER", "").rstrip("/")
OIDC_RP_CLIENT_ID = os.environ.get("OIDC_CLIENT_ID", "")
OIDC_RP_CLIENT_SECRET = os.environ.get("OIDC_CLIENT_SECRET", "")
OIDC_OP_AUTHORIZATION_ENDPOINT = os.environ.get("OIDC_AUTHORIZATION_ENDPOINT", "")
OIDC_OP_TOKEN_ENDPOINT = os.environ.get("OIDC_TOKEN_ENDPOINT", "")
OIDC_OP_USER_ENDPOINT = os.environ.get("OIDC_USERINFO_ENDPOINT", "")
OIDC_OP_JWKS_ENDPOINT = os.environ.get("OIDC_JWKS_URI", "")
OIDC_RP_SIGN_ALGO = os.environ.get("OIDC_SIGN_ALGO", "RS256")
OIDC_RP_SCOPES = os.environ.get("OIDC_SCOPES", "openid email profile groups")
OIDC_GROUPS_CLAIM = os.environ.get("OIDC_GROUPS_CLAIM", "groups")
OIDC_GROUP_MAP = envjson("OIDC_GROUP_MAP", {})
OIDC_PROVIDER_NAME = os.environ.get("OIDC_PROVIDER_NAME", "single sign-on")  # the login button says "Sign in with …"
OIDC_TIMEOUT = envint("OIDC_TIMEOUT", 10)  # seconds, for each call to the provider
OIDC_USE_PKCE = True
OIDC_AUTHENTICATE_CLASS = "jobs.teams.sso.SsoStart"
OIDC_CALLBACK_CLASS = "jobs.teams.sso.SsoCallback"
LOGIN_REDIRECT_URL_FAILURE = "/login/"

# Behind a reverse proxy every request comes from the proxy's address: with
# TRUSTED_PROXY_COUNT = n, the client is the n-th address from the right of
# X-Forwarded-For (the one the outermost trusted proxy saw). 0 = REMOTE_ADDR.
TRUSTED_PROXY_COUNT = envint("TRUSTED_PROXY_COUNT", 0)

# --- Security: HTTPS ------------------------------------------------------------------
# With DEBUG off the site is taken to be served over HTTPS, by itself or by a proxy
# that terminates TLS, so `manage.py check --deploy` is clean: plain HTTP is redirected,
# cookies are sent over HTTPS only, browsers are told to use HTTPS for a year (HSTS),
# and the proxy's X-Forwarded-Proto says whether the request came in over HTTPS. Each
# is switchable for a plain-HTTP test install (docker-compose.yml sets them all off):
#   SECURE_SSL_REDIRECT=0 SECURE_COOKIES=0 SECURE_HSTS_SECONDS=0 TRUST_X_FORWARDED_PROTO=0
# TRUST_X_FORWARDED_PROTO only behind a proxy that sets that header itself (overwriting
# the client's): otherwise a client can claim HTTPS (it then skips the redirect).
SECURE_SSL_REDIRECT = envbool("SECURE_SSL_REDIRECT", not DEBUG)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = envbool("SECURE_COOKIES", not DEBUG)
SECURE_HSTS_SECONDS = envint("SECURE_HSTS_SECONDS", 0 if DEBUG else 365 * 24 * 3600)
SECURE_HSTS_INCLUDE_SUBDOMAINS = envbool("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
SECURE_HSTS_PRELOAD = envbool("SECURE_HSTS_PRELOAD", True)  # consent only: nothing is submitted to a preload list
if envbool("TRUST_X_FORWARDED_PROTO", not DEBUG):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_HTTPONLY = True

# --- Security: Content-Security-Policy (django-csp) ------------------------------------
# Every page may run scripts and load styles from this site's own files only: no inline
# <script>, on*= handler, <style> block or style="" attribute, and no eval. Behaviour and
# styles go in the areas' static/ folders (served by whitenoise). Plotly.js would add
# its own rules in a <style> element; base.html links them instead as a static file
# (jobs/static/jobs/plotly.css, generated from the pinned Plotly.js, see tests/test_csp.py).
# Plotly draws heatmaps as data: images and saves a chart as a PNG from a blob: (img-src).
# One narrow allowance: Plotly.js clears a colour bar's fills with style="" (an empty
# style attribute), so style attributes whose text is empty, and only those, are let
# through by the hash of the empty string ('unsafe-hashes' makes a hash apply to
# attributes); any other style attribute is refused.
from csp.constants import NONE, SELF, UNSAFE_HASHES  # noqa: E402

EMPTY_TEXT_HASH = "'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='"  # base64(sha256(b""))

CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        "style-src-attr": [UNSAFE_HASHES, EMPTY_TEXT_HASH],
        "img-src": [SELF, "data:", "blob:"],
        "font-src": [SELF],
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [SELF],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
        "report-uri": ["/csp-report"],  # violations are logged (jobs.monitoring.csp_reports)
    },
}

LANGUAGE_CODE = "en-us"
TIME_ZONE = os.environ.get("TIME_ZONE", "UTC")
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "static"
# Plotly.js is served by the app itself from the pinned plotly package (no CDN).
import plotly  # noqa: E402

STATICFILES_DIRS = [("plotly", Path(plotly.__file__).parent / "package_data")]
WHITENOISE_USE_FINDERS = True

# Uploads: a request body (model zip / dataset) is capped; larger files are refused
# with a clear error naming the field, not a 500.
MAX_UPLOAD_BYTES = envint("MAX_UPLOAD_BYTES", 512 * 1024 * 1024)
# The fleet's compile cache cap: least-recently-used unpinned entries no job uses are
# evicted above it (jobs.compile_cache.index). 0 = no cap.
COMPILE_CACHE_MAX_BYTES = envint("COMPILE_CACHE_MAX_BYTES", 50 * 1024 ** 3)
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = 5 * 1024 * 1024

# --- NeuronDeck behaviour --------------------------------------------------------
# Every NEURONDECK_* switch is parsed in neuron_workers.config; checking them all here
# makes a bad value stop the web app, scheduler, worker and agent at start, naming the
# variable, instead of failing later in the middle of a job.
neuron_config.values()
HOST_NAME = neuron_config.host_name()  # the worker / agent's own host name
HEARTBEAT_S = envint("HEARTBEAT_S", 5)
HOST_OFFLINE_AFTER_S = envint("HOST_OFFLINE_AFTER_S", 30)
JOB_LEASE_S = envint("JOB_LEASE_S", 60)  # a running job whose heartbeat is older is reaped
QUEUED_RESEND_AFTER_S = envint("QUEUED_RESEND_AFTER_S", 30)
REAP_EVERY_S = envint("REAP_EVERY_S", 15)
DISPATCH_EVERY_S = envint("DISPATCH_EVERY_S", 2)
JOB_MAX_ATTEMPTS = envint("JOB_MAX_ATTEMPTS", 3)
JOB_KILL_GRACE_S = envint("JOB_KILL_GRACE_S", 10)
# A multi-host job's torchrun rendezvous (rank 0 hosts torch's TCPStore) listens on a
# port of GANG_PORT_BASE .. +999, a pair per job attempt (jobs.lifecycle.gangs.ports);
# a rank waits at most GANG_JOIN_TIMEOUT_S for the others to join.
GANG_PORT_BASE = envint("GANG_PORT_BASE", 29400)
GANG_JOIN_TIMEOUT_S = envint("GANG_JOIN_TIMEOUT_S", 600)
# Once rank 0 of a gang has succeeded, the other ranks have this long to exit before
# they are stopped (the training is over: a rank that does not exit hangs in teardown).
GANG_EXIT_WINDOW_S = envint("GANG_EXIT_WINDOW_S", 30)
RUNNER_MODE = os.environ.get("RUNNER_MODE", "")  # "", "fork" or "exec"; "" = by backend
METRICS_STREAM_MAXLEN = envint("METRICS_STREAM_MAXLEN", 3600)
# The endpoints gateway (jobs.gateway, its own process): the base of every endpoint's
# stable URL as users see it; how long a request waits for a replica to start (scale
# from zero) and for a saturated endpoint to free a slot, before 503 / 429.
ENDPOINT_GATEWAY_URL = os.environ.get("ENDPOINT_GATEWAY_URL", "http://127.0.0.1:8001").rstrip("/")
# The endpoint page's playground streams from the gateway: the browser may connect to it.
CONTENT_SECURITY_POLICY["DIRECTIVES"]["connect-src"].append(ENDPOINT_GATEWAY_URL)
ENDPOINT_COLD_START_WAIT_S = float(os.environ.get("ENDPOINT_COLD_START_WAIT_S", "120"))
ENDPOINT_QUEUE_WAIT_S = float(os.environ.get("ENDPOINT_QUEUE_WAIT_S", "1"))
# Fair share: usage decays with this half-life; each queued job is charged this many
# expected core-seconds per core while the queue is ordered (so bursts interleave);
# team usage is recomputed at most this often per process.
FAIRSHARE_HALF_LIFE_H = float(os.environ.get("FAIRSHARE_HALF_LIFE_H", "168"))
FAIRSHARE_QUEUE_CHARGE_S = envint("FAIRSHARE_QUEUE_CHARGE_S", 3600)
FAIRSHARE_CACHE_S = float(os.environ.get("FAIRSHARE_CACHE_S", "5"))
# Starvation guard: a job pending longer than this goes ahead of fair share, oldest
# first (jobs.quotas.fairshare), so the EASY reservation reaches it; 0 turns it off.
SCHED_OVERDUE_AFTER_H = float(os.environ.get("SCHED_OVERDUE_AFTER_H", "0.5"))
# Every pending job's start-time estimate is computed this often (jobs.estimate_starts,
# on the Celery queue "estimates", so a long replay never holds up the dispatcher).
ESTIMATES_EVERY_S = envint("ESTIMATES_EVERY_S", 15)

# --- Inference endpoints (jobs.endpoints) ----------------------------------------
ENDPOINT_RECONCILE_S = float(os.environ.get("ENDPOINT_RECONCILE_S", "2"))  # the reconciler + autoscaler beat
# A replica set draining keeps serving what it has for this long before its job is
# stopped, so a gateway that cached the routing table a moment ago sends it nothing new.
ENDPOINT_DRAIN_ROUTE_GRACE_S = float(os.environ.get("ENDPOINT_DRAIN_ROUTE_GRACE_S", "3"))
# How long a stopped replica's server lets in-flight requests finish (its spec drain_s);
# SIGKILL follows a few seconds after that.
ENDPOINT_DRAIN_S = envint("ENDPOINT_DRAIN_S", 30)
# A rollout whose new replicas are not all ready by then is rolled back.
ENDPOINT_ROLLOUT_DEADLINE_S = envint("ENDPOINT_ROLLOUT_DEADLINE_S", 600)
ENDPOINT_SCALE_DOWN_COOLDOWN_S = envint("ENDPOINT_SCALE_DOWN_COOLDOWN_S", 60)
ENDPOINT_IDLE_TO_ZERO_S = envint("ENDPOINT_IDLE_TO_ZERO_S", 300)  # min_replicas 0: no request for this long
ENDPOINT_TARGET_UTILIZATION = float(os.environ.get("ENDPOINT_TARGET_UTILIZATION", "0.7"))  # of max_concurrent

# --- Notifications, idle cores, budgets, /metrics (jobs.notify) ---------------------
# Mail goes through Django's backend: SMTP at EMAIL_HOST:EMAIL_PORT by default.
EMAIL_BACKEND = os.environ.get("EMAIL_BACKEND", "django.core.mail.backends.smtp.EmailBackend")
EMAIL_HOST = os.environ.get("EMAIL_HOST", "localhost")
EMAIL_PORT = envint("EMAIL_PORT", 25)
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = envbool("EMAIL_USE_TLS", False)
EMAIL_TIMEOUT = envint("EMAIL_TIMEOUT", 10)
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "neurondeck@localhost")
NOTIFY_QUEUE = os.environ.get("NOTIFY_QUEUE", "notify")  # the Celery queue deliveries go to
NOTIFY_HTTP_TIMEOUT_S = float(os.environ.get("NOTIFY_HTTP_TIMEOUT_S", "10"))
NOTIFY_LEASE_S = envint("NOTIFY_LEASE_S", 30)  # a claimed or sent-off delivery is swept again after this
NOTIFY_BACKOFF_BASE_S = float(os.environ.get("NOTIFY_BACKOFF_BASE_S", "0.5"))
NOTIFY_BACKOFF_MAX_S = float(os.environ.get("NOTIFY_BACKOFF_MAX_S", "600"))
NOTIFY_GIVE_UP_S = envint("NOTIFY_GIVE_UP_S", 24 * 3600)
NOTIFY_SWEEP_S = float(os.environ.get("NOTIFY_SWEEP_S", "1"))
# Webhook and Slack targets must resolve to public addresses (jobs.notify.targets):
# loopback, private, link-local (cloud metadata), multicast and reserved ones are
# refused unless inside one of these networks (comma-separated CIDRs, e.g.
# "10.20.0.0/16" for an in-house receiver; the tests allow "127.0.0.1/32").
NOTIFY_ALLOWED_NETWORKS = envnetworks("NOTIFY_ALLOWED_NETWORKS", "")
NOTIFY_BATCH = envint("NOTIFY_BATCH", 10)  # deliveries per swept Celery message
NOTIFY_WAIT_THRESHOLD_S = envint("NOTIFY_WAIT_THRESHOLD_S", 1800)  # "waiting longer than" for job.waiting
BUDGET_THRESHOLDS = [int(p) for p in envlist("BUDGET_THRESHOLDS", "50,80,100")]
# /metrics: open to a request bearing METRICS_TOKEN, or from an address in
# METRICS_ALLOWED_IPS (none by default: behind a reverse proxy every request would
# come from its address); users' API tokens see only their teams' series.
METRICS_TOKEN = os.environ.get("METRICS_TOKEN", "")
METRICS_ALLOWED_IPS = envlist("METRICS_ALLOWED_IPS", "")

# --- Celery -------------------------------------------------------------------
# Settings chosen for multi-hour jobs:
# * JSON only: messages carry primary keys, never pickled objects.
# * acks early + prefetch 1: the Job row in the database is the record and its lease
#   is what recovers from a dead worker (the reaper), so a run message is only a
#   wake-up call. Acking on receipt means the broker never redelivers a multi-hour
#   job when its visibility timeout expires; a worker holds at most one message it
#   has not started.
# * visibility_timeout is long anyway, as a second line of defence, and a second
#   delivery is harmless: the worker claims the job with a conditional UPDATE.
# * No result backend: results live in PostgreSQL.
# A rediss:// broker (Redis over TLS) verifies the server's certificate: kombu alone
# would connect without checking it. ?ssl_cert_reqs=, ?ssl_ca_certs=, ?ssl_certfile=
# and ?ssl_keyfile= in the URL tune it, as redis-py reads them for REDIS_URL.
CELERY_BROKER_USE_SSL = redis_ssl_options(os.environ.get("CELERY_BROKER_URL", REDIS_URL))
CELERY_BROKER_URL = without_ssl_query(os.environ.get("CELERY_BROKER_URL", REDIS_URL))
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = False
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# CELERY_VISIBILITY_TIMEOUT is only lowered by the fault tests (a job outliving it
# must still run once); keep it longer than any job in real deployments.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": envint("CELERY_VISIBILITY_TIMEOUT", 12 * 3600),
                                   "socket_timeout": 5, "socket_connect_timeout": 5}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_DEFAULT_QUEUE = "scheduler"
CELERY_TASK_ROUTES = {"jobs.estimate_starts": {"queue": "estimates"}}  # its own worker (Procfile: estimator)
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_TASK_ALWAYS_EAGER = envbool("CELERY_TASK_ALWAYS_EAGER", False)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
