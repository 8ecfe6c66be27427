"""kotaemon-site settings: one file, driven by environment variables.

Nothing set gives the embedded default (SQLite, local memory, in-memory channel layer,
eager Celery). Each integration turns on when its variable is set (see README.md,
"Configuration reference"). With DEBUG off, SECRET_KEY and ALLOWED_HOSTS are required.
"""
from __future__ import annotations

import os
import socket
import sys
import uuid
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
env = environ.Env()

# Before torch or FAISS is imported anywhere: OpenMP threads that spin while idle made short query
# encodes ~10x slower on 2 shared cores (docs/benchmarks.md). The process kind sets thread counts later.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The demo (make demo) and the test runner are the only places where insecure defaults are allowed.
TESTING = env.bool("KOTAEMON_TESTING", default="pytest" in sys.modules)
DEMO_MARKER = BASE_DIR / "var" / "demo-mode"


def _demo_marker() -> bool:
    """`make demo` (demo_setup) leaves var/demo-mode naming this checkout, so later `manage.py` commands in it
    find the demo's settings without KOTAEMON_DEMO=1. Only where nothing is configured: never with a
    SECRET_KEY or DATABASE_URL (every production deployment sets SECRET_KEY, or refuses to start), a data dir
    elsewhere, or under the test runner; and only for the checkout that wrote it."""
    if TESTING or any(os.environ.get(name) for name in ("SECRET_KEY", "DATABASE_URL", "KOTAEMON_DATA_DIR", "DEBUG")):
        return False
    try:
        return DEMO_MARKER.read_text(encoding="utf-8").strip() == str(BASE_DIR)
    except OSError:
        return False


DEMO = env.bool("KOTAEMON_DEMO", default=False) if "KOTAEMON_DEMO" in os.environ else _demo_marker()
DEBUG = env.bool("DEBUG", default=DEMO)
_DEV_DEFAULTS = DEBUG or DEMO or TESTING

DATA_DIR = Path(env("KOTAEMON_DATA_DIR", default=str(BASE_DIR / "var")))

SECRET_KEY = env("SECRET_KEY", default="")
if not SECRET_KEY:
    if not _DEV_DEFAULTS:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. With DEBUG off, kotaemon-site refuses to start without a secret key: "
            "set SECRET_KEY to a long random value (python -c 'import secrets; print(secrets.token_urlsafe(64))')."
        )
    SECRET_KEY = "insecure-dev-only-" + "k" * 50

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=[])
if not ALLOWED_HOSTS:
    if not _DEV_DEFAULTS:
        raise ImproperlyConfigured(
            "ALLOWED_HOSTS is not set. With DEBUG off, kotaemon-site refuses to start without it: "
            "set ALLOWED_HOSTS to a comma-separated list of the host names it serves."
        )
    ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]", "testserver"]
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTANCE_ID = env("INSTANCE_ID", default=f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "channels",
    "apps.core",
    "apps.knowledge",
    "apps.conversations",
    "apps.plugins",
    "apps.monitoring",
    "apps.accounts",
]

MIDDLEWARE = [
    "apps.core.middleware.RequestContextMiddleware",
    "apps.monitoring.middleware.PrometheusMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    # After sessions, before common: the language comes from the user's choice (cookie), else Accept-Language.
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "apps.core.login_limits.LoginRateLimitMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "apps.core.middleware.ApiErrorMiddleware",
]

ROOT_URLCONF = "kotaemon_site.urls"
WSGI_APPLICATION = None
ASGI_APPLICATION = "kotaemon_site.asgi.application"

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
                "apps.accounts.context_processors.sign_in",
                "django.template.context_processors.i18n",
            ],
        },
    },
]

# --- Database ---------------------------------------------------------------------------
# Test runs on one machine may overlap (several developers, CI): each gets its own test database.
_TEST_DB_SUFFIX = env("KOTAEMON_TEST_DB_SUFFIX", default=str(os.getpid()))
DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{DATA_DIR / 'db.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    # WAL lets the demo's web process read while an eager task writes.
    DATABASES["default"].setdefault("OPTIONS", {})["init_command"] = "PRAGMA journal_mode=WAL;"
    DATABASES["default"]["OPTIONS"]["timeout"] = 20
    # Take the write lock at BEGIN: a transaction that reads then writes otherwise fails at once with
    # "database is locked" when another connection writes (eager tasks + web requests in the demo).
    DATABASES["default"]["OPTIONS"]["transaction_mode"] = "IMMEDIATE"
    # A file, not memory, so server processes started by tests see the test database.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / f"test-{_TEST_DB_SUFFIX}.sqlite3")}
else:
    DATABASES["default"]["TEST"] = {"NAME": f"test_{DATABASES['default']['NAME']}_{_TEST_DB_SUFFIX}"}
    # 0 by default: under ASGI every request runs in its own thread, so persistent connections pile
    # up per thread instead of being reused (Django docs, "Persistent connections" + ASGI).
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("DB_CONN_MAX_AGE", default=0)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Cache, sessions, channel layer ----------------------------------------------------
REDIS_URL = env("REDIS_URL", default="")
REDIS_TIMEOUT = env.float("REDIS_TIMEOUT", default=2.0)
# Test runs get their own prefix so overlapping runs never touch each other's keys.
CACHE_KEY_PREFIX = env("CACHE_KEY_PREFIX", default=f"kstest{_TEST_DB_SUFFIX}" if TESTING else "ks")
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": CACHE_KEY_PREFIX,
            "OPTIONS": {
                "CLIENT_CLASS": "django_redis.client.DefaultClient",
                "SOCKET_CONNECT_TIMEOUT": REDIS_TIMEOUT,
                "SOCKET_TIMEOUT": REDIS_TIMEOUT,
                "CONNECTION_POOL_KWARGS": {"max_connections": env.int("REDIS_MAX_CONNECTIONS", default=50)},
            },
        }
    }
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": f"{CACHE_KEY_PREFIX}:asgi", "capacity": 1000, "expiry": 60},
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "KEY_PREFIX": CACHE_KEY_PREFIX}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
# Sessions live in the cache (Redis in production) and are written through to the database,
# so a flushed Redis logs nobody out.
SESSION_ENGINE = "django.contrib.sessions.backends.cached_db"

# --- Celery ----------------------------------------------------------------------------
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default=REDIS_URL)
CELERY_RESULT_BACKEND = env("CELERY_RESULT_BACKEND", default=REDIS_URL or None)
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=not CELERY_BROKER_URL)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# A task whose worker died this many times while running it is parked, not redelivered again (ParkedTask).
CELERY_MAX_DELIVERIES = env.int("CELERY_MAX_DELIVERIES", default=3)
# A prefork child that has not reported "up" within this many seconds is killed. Celery's 4 s default is
# shorter than a child's start (process set-up) on a busy 2-core machine: replacements were killed in a loop.
CELERY_WORKER_PROC_ALIVE_TIMEOUT = env.float("CELERY_WORKER_PROC_ALIVE_TIMEOUT", default=30.0)
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SOFT_TIME_LIMIT = env.int("CELERY_TASK_SOFT_TIME_LIMIT", default=15 * 60)
CELERY_TASK_TIME_LIMIT = env.int("CELERY_TASK_TIME_LIMIT", default=20 * 60)
CELERY_RESULT_EXPIRES = 24 * 3600
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": CELERY_TASK_TIME_LIMIT + 600}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULE: dict = {}

# --- Auth, REST API --------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
if TESTING:
    # The production hasher costs ~0.3 s per user on 2 cores and tests create many users. Test servers
    # (KOTAEMON_TESTING=1) use the same list, so they accept the users the tests created.
    PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
LOGIN_URL = "/accounts/login/"
# Failed sign-ins (/accounts/login/, /admin/login/) allowed per username and per client address within
# LOGIN_LOCKOUT_SECONDS; past either, the login is refused with 429 until the window ends (apps/core/login_limits.py).
LOGIN_FAILURES_PER_USERNAME = env.int("LOGIN_FAILURES_PER_USERNAME", default=5)
LOGIN_FAILURES_PER_IP = env.int("LOGIN_FAILURES_PER_IP", default=20)
LOGIN_LOCKOUT_SECONDS = env.int("LOGIN_LOCKOUT_SECONDS", default=900)
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

# --- Sign-in: local passwords, OpenID Connect, LDAP (see docs/operations.md) -----------------
# `all`: everyone may sign in with a local password; `superusers`: only superusers may (break-glass),
# everyone else signs in through single sign-on or LDAP.
PASSWORD_LOGIN = env("PASSWORD_LOGIN", default="all")
if PASSWORD_LOGIN not in ("all", "superusers"):
    raise ImproperlyConfigured("PASSWORD_LOGIN must be `all` or `superusers`")
AUTHENTICATION_BACKENDS = ["apps.accounts.backends.PasswordBackend"]
# Directory groups -> Django groups (apps/accounts/directory.py), shared by OpenID Connect and LDAP.
SSO_GROUP_RULES = env("SSO_GROUP_RULES", default="")
SSO_STAFF_GROUPS = env.list("SSO_STAFF_GROUPS", default=[])
SSO_SUPERUSER_GROUPS = env.list("SSO_SUPERUSER_GROUPS", default=[])

# OpenID Connect (authorization code + PKCE; endpoints from the issuer's discovery document).
OIDC_ISSUER = env("OIDC_ISSUER", default="").rstrip("/")
OIDC_PROVIDER_NAME = env("OIDC_PROVIDER_NAME", default="")
OIDC_RP_CLIENT_ID = env("OIDC_CLIENT_ID", default="")
OIDC_RP_CLIENT_SECRET = env("OIDC_CLIENT_SECRET", default="")
OIDC_RP_SCOPES = env("OIDC_SCOPES", default="openid email profile")
OIDC_RP_SIGN_ALGO = env("OIDC_SIGN_ALGO", default="RS256")
OIDC_GROUPS_CLAIM = env("OIDC_GROUPS_CLAIM", default="groups")
OIDC_USERNAME_CLAIM = env("OIDC_USERNAME_CLAIM", default="preferred_username")
OIDC_CREATE_USER = env.bool("OIDC_CREATE_USER", default=True)
OIDC_USE_PKCE = True
OIDC_STORE_ID_TOKEN = True  # the id_token_hint of RP-initiated logout
OIDC_TIMEOUT = env.float("OIDC_TIMEOUT_SECONDS", default=10.0)
OIDC_VERIFY_SSL = env("OIDC_CA_BUNDLE", default="") or env.bool("OIDC_VERIFY_SSL", default=True)
OIDC_AUTHENTICATION_CALLBACK_URL = "oidc_authentication_callback"
LOGIN_REDIRECT_URL_FAILURE = LOGIN_URL
if OIDC_ISSUER:
    if not (OIDC_RP_CLIENT_ID and OIDC_RP_CLIENT_SECRET):
        raise ImproperlyConfigured("OIDC_ISSUER is set: OIDC_CLIENT_ID and OIDC_CLIENT_SECRET are required too")
    AUTHENTICATION_BACKENDS.append("apps.accounts.oidc.Backend")

# LDAP / Active Directory (django-auth-ldap), on when LDAP_SERVER_URI is set.
AUTH_LDAP_SERVER_URI = env("LDAP_SERVER_URI", default="")
AUTH_LDAP_BIND_DN = env("LDAP_BIND_DN", default="")
AUTH_LDAP_BIND_PASSWORD = env("LDAP_BIND_PASSWORD", default="")
AUTH_LDAP_START_TLS = env.bool("LDAP_START_TLS", default=False)
AUTH_LDAP_USER_ATTR_MAP = {"first_name": "givenName", "last_name": "sn", "email": "mail"}
AUTH_LDAP_ALWAYS_UPDATE_USER = True
AUTH_LDAP_GROUP_SEARCH = None
LDAP_LINK_EXISTING_USERS = env.bool("LDAP_LINK_EXISTING_USERS", default=False)
if AUTH_LDAP_SERVER_URI:
    import ldap as _ldap
    from django_auth_ldap import config as _ldap_config

    _tls_require = {"demand": _ldap.OPT_X_TLS_DEMAND, "hard": _ldap.OPT_X_TLS_HARD,
                    "allow": _ldap.OPT_X_TLS_ALLOW, "never": _ldap.OPT_X_TLS_NEVER}
    _tls_mode = env("LDAP_TLS_REQUIRE_CERT", default="demand")
    if _tls_mode not in _tls_require:
        raise ImproperlyConfigured("LDAP_TLS_REQUIRE_CERT must be demand, hard, allow or never")
    AUTH_LDAP_CONNECTION_OPTIONS = {
        _ldap.OPT_REFERRALS: 0,  # Active Directory: never chase referrals with our credentials
        _ldap.OPT_NETWORK_TIMEOUT: env.float("LDAP_TIMEOUT_SECONDS", default=5.0),
        _ldap.OPT_TIMEOUT: env.float("LDAP_TIMEOUT_SECONDS", default=5.0),
        _ldap.OPT_X_TLS_REQUIRE_CERT: _tls_require[_tls_mode],
    }
    if env("LDAP_CA_CERT_FILE", default=""):
        AUTH_LDAP_CONNECTION_OPTIONS[_ldap.OPT_X_TLS_CACERTFILE] = env("LDAP_CA_CERT_FILE")
    # Must come last: it applies the TLS options above to this connection's context.
    AUTH_LDAP_CONNECTION_OPTIONS[_ldap.OPT_X_TLS_NEWCTX] = 0
    if env("LDAP_USER_DN_TEMPLATE", default=""):
        AUTH_LDAP_USER_DN_TEMPLATE = env("LDAP_USER_DN_TEMPLATE")
    else:
        AUTH_LDAP_USER_SEARCH = _ldap_config.LDAPSearch(
            env("LDAP_USER_SEARCH_BASE"), _ldap.SCOPE_SUBTREE, env("LDAP_USER_FILTER", default="(uid=%(user)s)"))
    if env("LDAP_GROUP_SEARCH_BASE", default=""):
        _group_types = {
            "groupOfNames": _ldap_config.GroupOfNamesType, "groupOfUniqueNames": _ldap_config.GroupOfUniqueNamesType,
            "posixGroup": _ldap_config.PosixGroupType, "activeDirectory": _ldap_config.ActiveDirectoryGroupType,
            "nestedGroupOfNames": _ldap_config.NestedGroupOfNamesType,
            "nestedActiveDirectory": _ldap_config.NestedActiveDirectoryGroupType,
        }
        _group_type = env("LDAP_GROUP_TYPE", default="groupOfNames")
        if _group_type not in _group_types:
            raise ImproperlyConfigured(f"LDAP_GROUP_TYPE must be one of {', '.join(_group_types)}")
        AUTH_LDAP_GROUP_TYPE = _group_types[_group_type]()
        AUTH_LDAP_GROUP_SEARCH = _ldap_config.LDAPSearch(
            env("LDAP_GROUP_SEARCH_BASE"), _ldap.SCOPE_SUBTREE,
            env("LDAP_GROUP_FILTER", default="(objectClass=*)"))
    if env("LDAP_REQUIRE_GROUP", default=""):
        AUTH_LDAP_REQUIRE_GROUP = env("LDAP_REQUIRE_GROUP")
    AUTHENTICATION_BACKENDS.append("apps.accounts.ldap.Backend")

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "apps.core.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    # Every endpoint checks the API-key scope it needs (apps/core/scopes.py); permissions proper are the
    # services' business (apps/core/authz.py).
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated",
                                   "apps.core.scopes.ApiKeyScopePermission"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "apps.core.errors.api_exception_handler",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_THROTTLE_CLASSES": ["apps.core.throttling.UserOrKeyRateThrottle"],
    "DEFAULT_THROTTLE_RATES": {
        "user": env("API_RATE_LIMIT", default="600/min"),
        "chat": env("CHAT_RATE_LIMIT", default="30/min"),
    },
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "kotaemon-site API",
    "DESCRIPTION": "Enterprise RAG assistant: knowledge bases, search, chat with citations, plugins.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": r"/api/v1",
    "COMPONENT_SPLIT_REQUEST": True,
    # Several models have a "status" field; name each enum so clients get stable type names.
    "ENUM_NAME_OVERRIDES": {
        "DocumentStatusEnum": "apps.knowledge.models.Document.Status",
        "IndexVersionStatusEnum": "apps.knowledge.models.IndexVersion.Status",
        "TicketStatusEnum": "apps.plugins.models.Ticket.STATUSES",
        "UploadOutcomeStatusEnum": ["created", "duplicate", "rejected"],
    },
}

# --- Security --------------------------------------------------------------------------
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=not _DEV_DEFAULTS)
# Probes and scrapes come over plain HTTP from inside the cluster.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0 if _DEV_DEFAULTS else 31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=True)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=True)
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=not _DEV_DEFAULTS)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=not _DEV_DEFAULTS)
SESSION_COOKIE_HTTPONLY = True
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
SECURE_REFERRER_POLICY = "same-origin"
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("DATA_UPLOAD_MAX_MEMORY_SIZE", default=10 * 1024 * 1024)
FILE_UPLOAD_MAX_MEMORY_SIZE = 5 * 1024 * 1024
DATA_UPLOAD_MAX_NUMBER_FILES = env.int("DATA_UPLOAD_MAX_NUMBER_FILES", default=200)

# --- i18n, static, media ---------------------------------------------------------------
# English stays the default; Chinese (simplified) is chosen on the chat page (a cookie) or by the
# browser's Accept-Language (zh, zh-CN, zh-SG fall back to zh-hans). Compiled catalogs are committed
# (locale/*/LC_MESSAGES/*.mo, kept in sync with the .po files by a test), so no gettext is needed to run.
LANGUAGE_CODE = "en"
LANGUAGES = [("en", "English"), ("zh-hans", "简体中文")]
LOCALE_PATHS = [BASE_DIR / "locale"]
LANGUAGE_COOKIE_NAME = "kotaemon_language"
LANGUAGE_COOKIE_AGE = 365 * 24 * 3600
LANGUAGE_COOKIE_SAMESITE = "Lax"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "/static/"
STATIC_ROOT = Path(env("STATIC_ROOT", default=str(DATA_DIR / "static")))
STATICFILES_DIRS = [BASE_DIR / "static"] if (BASE_DIR / "static").exists() else []
MEDIA_URL = "/media/"
MEDIA_ROOT = Path(env("MEDIA_ROOT", default=str(DATA_DIR / "media")))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if (DEBUG or TESTING)
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = DEBUG or TESTING

# --- Logging ---------------------------------------------------------------------------
LOG_LEVEL = env("LOG_LEVEL", default="INFO")
LOG_FORMAT = env("LOG_FORMAT", default="json")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "apps.core.logging.ContextFilter"}},
    "formatters": {
        "json": {"()": "apps.core.logging.JsonFormatter"},
        "text": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["context"]},
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
        "django.request": {"handlers": ["console"], "level": "ERROR", "propagate": False},
    },
}

# --- Knowledge (apps/knowledge) --------------------------------------------------------
INDEX_ROOT = Path(env("INDEX_ROOT", default=str(DATA_DIR / "indexes")))
EMBEDDING_MODEL_PATH = env("EMBEDDING_MODEL_PATH", default="")  # empty: the bundled all-MiniLM-L6-v2
EMBEDDING_BATCH_SIZE = env.int("EMBEDDING_BATCH_SIZE", default=32)
# Embedding models per knowledge base (apps/knowledge/embeddings.py): the model new bases get (auto: chosen by
# the language of their documents, apps/knowledge/model_choice.py), the backend every model runs on (auto =
# int8 ONNX Runtime where installed), and where exported ONNX files are cached.
EMBEDDING_DEFAULT_MODEL = env("EMBEDDING_DEFAULT_MODEL", default="auto")
EMBEDDING_BACKEND = env("EMBEDDING_BACKEND", default="auto")
EMBEDDING_CACHE_DIR = Path(env("EMBEDDING_CACHE_DIR", default=str(DATA_DIR / "embedding-cache")))
TORCH_NUM_THREADS = env.int("TORCH_NUM_THREADS", default=0)  # 0: decided per process kind
RERANKER_MODEL_PATH = env("RERANKER_MODEL_PATH", default="")
KNOWLEDGE_MAX_UPLOAD_BYTES = env.int("KNOWLEDGE_MAX_UPLOAD_BYTES", default=50 * 1024 * 1024)
KNOWLEDGE_MAX_PAGES = env.int("KNOWLEDGE_MAX_PAGES", default=2000)
KNOWLEDGE_HNSW_THRESHOLD = env.int("KNOWLEDGE_HNSW_THRESHOLD", default=50_000)
KNOWLEDGE_INDEX_GRACE_SECONDS = env.int("KNOWLEDGE_INDEX_GRACE_SECONDS", default=600)
KNOWLEDGE_VERSION_CHECK_SECONDS = env.float("KNOWLEDGE_VERSION_CHECK_SECONDS", default=3.0)
RETRIEVAL_CACHE_SECONDS = env.int("RETRIEVAL_CACHE_SECONDS", default=300)
RETRIEVAL_MAX_TOP_K = env.int("RETRIEVAL_MAX_TOP_K", default=100)
KNOWLEDGE_MAX_UNCOMPRESSED_BYTES = env.int("KNOWLEDGE_MAX_UNCOMPRESSED_BYTES", default=200 * 1024 * 1024)
KNOWLEDGE_MAX_COMPRESSION_RATIO = env.float("KNOWLEDGE_MAX_COMPRESSION_RATIO", default=100.0)
KNOWLEDGE_MAX_CSV_ROWS = env.int("KNOWLEDGE_MAX_CSV_ROWS", default=200_000)
KNOWLEDGE_FETCH_TIMEOUT_SECONDS = env.float("KNOWLEDGE_FETCH_TIMEOUT_SECONDS", default=20.0)
# Ingests finishing within this window share one index rebuild (the later rebuild tasks find nothing to do).
KNOWLEDGE_REBUILD_DELAY_SECONDS = env.float("KNOWLEDGE_REBUILD_DELAY_SECONDS", default=2.0)
# --- Index maintenance (issue 13; docs/knowledge.md "Index maintenance") ---
# While documents of a base are still being ingested (a burst) its builds wait: a burst builds at most
# KNOWLEDGE_BULK_MAX_VERSIONS versions (the last when its last document is done), the ones before spaced by
# this wait, doubling (0: no waiting at all); a burst in which no document finished for
# KNOWLEDGE_REBUILD_STALL_SECONDS has stalled (a stuck document) and is built at once.
KNOWLEDGE_REBUILD_MAX_WAIT_SECONDS = env.float("KNOWLEDGE_REBUILD_MAX_WAIT_SECONDS", default=30.0)
KNOWLEDGE_BULK_MAX_VERSIONS = env.int("KNOWLEDGE_BULK_MAX_VERSIONS", default=3)
KNOWLEDGE_REBUILD_STALL_SECONDS = env.float("KNOWLEDGE_REBUILD_STALL_SECONDS", default=30.0)
KNOWLEDGE_DENSE_COMPRESSION = env("KNOWLEDGE_DENSE_COMPRESSION", default="")  # "ivfpq": compressed large segments
KNOWLEDGE_INDEX_MMAP = env.bool("KNOWLEDGE_INDEX_MMAP", default=False)  # memory-map flat/IVF codes and postings
KNOWLEDGE_INDEX_MEMORY_BUDGET_MB = env.int("KNOWLEDGE_INDEX_MEMORY_BUDGET_MB", default=1536)  # 0: unlimited
# A search never waits for a newer version to load unless this is set (tests make swaps synchronous with it).
KNOWLEDGE_SWAP_WAIT_SECONDS = env.float("KNOWLEDGE_SWAP_WAIT_SECONDS", default=0.0)
KNOWLEDGE_SWEEP_SECONDS = env.int("KNOWLEDGE_SWEEP_SECONDS", default=60)
KNOWLEDGE_INGEST_STUCK_SECONDS = env.int("KNOWLEDGE_INGEST_STUCK_SECONDS", default=900)
KNOWLEDGE_INGEST_MAX_ATTEMPTS = env.int("KNOWLEDGE_INGEST_MAX_ATTEMPTS", default=3)
CELERY_BEAT_SCHEDULE["knowledge-index-cleanup"] = {
    "task": "knowledge.cleanup_indexes", "schedule": float(max(60, KNOWLEDGE_INDEX_GRACE_SECONDS // 2)),
}
CELERY_BEAT_SCHEDULE["knowledge-sweep"] = {"task": "knowledge.sweep", "schedule": float(KNOWLEDGE_SWEEP_SECONDS)}

# --- Outbound requests (apps/core/outbound.py: document URLs, plugins' HTTP, connectors) --
# Internal hosts the platform may fetch from (names, *.domain, IPs, CIDRs, each optionally :port);
# everything that resolves to loopback/private/link-local/metadata ranges is refused otherwise.
OUTBOUND_ALLOWED_HOSTS = env.list("OUTBOUND_ALLOWED_HOSTS", default=[])
OUTBOUND_TIMEOUT_SECONDS = env.float("OUTBOUND_TIMEOUT_SECONDS", default=10.0)
OUTBOUND_MAX_BYTES = env.int("OUTBOUND_MAX_BYTES", default=10 * 1024 * 1024)
OUTBOUND_MAX_REDIRECTS = env.int("OUTBOUND_MAX_REDIRECTS", default=5)

# --- Conversations (apps/conversations) ------------------------------------------------
SESSION_STORE_BACKEND = env("SESSION_STORE_BACKEND", default="redis" if REDIS_URL else "memory")
SESSION_STATE_TTL_SECONDS = env.int("SESSION_STATE_TTL_SECONDS", default=24 * 3600)
SESSION_STATE_COMPRESS_BYTES = env.int("SESSION_STATE_COMPRESS_BYTES", default=4096)
SESSION_STATE_MAX_BYTES = env.int("SESSION_STATE_MAX_BYTES", default=256 * 1024)
SESSION_LOCAL_CACHE_SIZE = env.int("SESSION_LOCAL_CACHE_SIZE", default=1024)
SENSITIVE_PATTERNS = env.list("SENSITIVE_PATTERNS", default=[])  # extra regexes, added to the built-in ones
GENERATOR = env("GENERATOR", default="extractive")  # extractive | openai | llama_cpp
LLM_BASE_URL = env("LLM_BASE_URL", default="")
LLM_API_KEY = env("LLM_API_KEY", default="")
LLM_MODEL = env("LLM_MODEL", default="")
LLM_TIMEOUT_SECONDS = env.float("LLM_TIMEOUT_SECONDS", default=60.0)
LLAMA_CPP_MODEL_PATH = env("LLAMA_CPP_MODEL_PATH", default="")
SESSION_LOCAL_CACHE_SECONDS = env.float("SESSION_LOCAL_CACHE_SECONDS", default=30.0)  # re-validate local copies
GENERATOR_BY_KNOWLEDGE_BASE = env.dict("GENERATOR_BY_KNOWLEDGE_BASE", default={})  # slug=generator,...
CHAT_TOP_K = env.int("CHAT_TOP_K", default=6)
LLM_MAX_TOKENS = env.int("LLM_MAX_TOKENS", default=512)
LLM_PROMPT_MAX_CHARS = env.int("LLM_PROMPT_MAX_CHARS", default=6000)
# Resumable answers (apps/conversations/turn_stream.py): event logs, leases, takeover.
TURN_STREAM_BACKEND = env("TURN_STREAM_BACKEND", default="redis" if REDIS_URL else "memory")
TURN_STREAM_TTL_SECONDS = env.int("TURN_STREAM_TTL_SECONDS", default=3600)  # a log lives this long after its last event
TURN_STREAM_MAXLEN = env.int("TURN_STREAM_MAXLEN", default=10000)  # events kept per turn
TURN_LEASE_SECONDS = env.float("TURN_LEASE_SECONDS", default=5.0)  # a dead generator is taken over after this
TURN_PERSIST_SECONDS = env.float("TURN_PERSIST_SECONDS", default=0.5)  # partial answer saved this often
OPENAI_ALL_MODEL = env("OPENAI_ALL_MODEL", default="kotaemon-all")  # /v1/ model id searching every readable base

# --- Plugins (apps/plugins) ------------------------------------------------------------
PLUGINS_DIR = Path(env("PLUGINS_DIR", default=str(BASE_DIR / "plugins_local")))
PLUGINS = env.list("PLUGINS", default=[])  # dotted paths of extra plugin classes
PLUGIN_TIMEOUT_SECONDS = env.float("PLUGIN_TIMEOUT_SECONDS", default=5.0)
PLUGIN_MEMORY_LIMIT_MB = env.int("PLUGIN_MEMORY_LIMIT_MB", default=512)
PLUGIN_WORKERS_PER_PLUGIN = env.int("PLUGIN_WORKERS_PER_PLUGIN", default=2)  # warm sandbox processes per plugin
PLUGIN_START_TIMEOUT_SECONDS = env.float("PLUGIN_START_TIMEOUT_SECONDS", default=15.0)
PLUGIN_ENTRY_POINTS = env.bool("PLUGIN_ENTRY_POINTS", default=True)  # the `kotaemon_site.plugins` group
PLUGIN_PYTHONPATH = env.list("PLUGIN_PYTHONPATH", default=[])  # extra import dirs for sandbox workers only
PLUGIN_VERSION_CHECK_SECONDS = env.float("PLUGIN_VERSION_CHECK_SECONDS", default=3.0)  # heals missed events
PLUGIN_STORAGE_TTL_SECONDS = env.int("PLUGIN_STORAGE_TTL_SECONDS", default=30 * 24 * 3600)
PLUGIN_STATS_WINDOW_DAYS = env.int("PLUGIN_STATS_WINDOW_DAYS", default=7)
# OS isolation of plugin workers (docs/plugins.md "The sandbox"): bwrap, or none (explicit, unsafe).
PLUGIN_SANDBOX = env("PLUGIN_SANDBOX", default="bwrap")
PLUGIN_CPU_SECONDS = env.int("PLUGIN_CPU_SECONDS", default=300)  # per worker lifetime; recycled at 80 %
PLUGIN_MAX_FILE_MB = env.int("PLUGIN_MAX_FILE_MB", default=64)
PLUGIN_SCRATCH_MB = env.int("PLUGIN_SCRATCH_MB", default=64)
PLUGIN_MAX_PROCESSES = env.int("PLUGIN_MAX_PROCESSES", default=64)  # threads of one worker
# When the web process runs as root, each sandbox worker runs as this host uid/gid (so RLIMIT_NPROC holds);
# a non-root web process's workers run as that user. Plugin code and the runtime must be world-readable.
PLUGIN_SANDBOX_UID = env.int("PLUGIN_SANDBOX_UID", default=65534)
PLUGIN_SANDBOX_GID = env.int("PLUGIN_SANDBOX_GID", default=65534)
# Intent router (tuned on tests/plugins/data/router_dev.json; see docs/plugins.md).
PLUGIN_ROUTER_THRESHOLD = env.float("PLUGIN_ROUTER_THRESHOLD", default=0.40)
PLUGIN_ROUTER_MARGIN = env.float("PLUGIN_ROUTER_MARGIN", default=0.03)
PLUGIN_ROUTER_TOP_K = env.int("PLUGIN_ROUTER_TOP_K", default=2)
PLUGIN_ROUTER_KEYWORD_BONUS = env.float("PLUGIN_ROUTER_KEYWORD_BONUS", default=0.15)

# --- Monitoring (apps/monitoring) -------------------------------------------------------
# When set, /metrics requires `Authorization: Bearer <METRICS_TOKEN>` (Prometheus: authorization.credentials).
METRICS_TOKEN = env("METRICS_TOKEN", default="")
# Without a token, production (DEBUG off) refuses every /metrics scrape (403) unless this says the endpoint
# is reachable only from the monitoring network. Development and tests serve it openly.
METRICS_PUBLIC = env.bool("METRICS_PUBLIC", default=_DEV_DEFAULTS)
# Audit log: every create/update/delete (and many-to-many change) of these models is recorded.
AUDITED_MODELS = env.list("AUDITED_MODELS", default=[
    "knowledge.KnowledgeBase", "knowledge.Document", "plugins.PluginConfig", "core.ApiKey", "auth.User", "auth.Group",
    "accounts.ExternalIdentity",
])
# Fields whose changes alone do not make an audit row ("*": every model). Auto-stamped (auto_now) and
# non-editable fields are always ignored; the document processing status is the ingest task's bookkeeping.
AUDIT_IGNORED_FIELDS = {
    "*": ["last_login", "last_used_at"],
    "knowledge.Document": ["status", "error_code", "error_message", "ingested_at", "detected_type", "page_count",
                           "size_bytes", "sha256"],
}
# Estimated cost on the dashboard: price per 1,000 tokens by generator/model name (Message.generator,
# else LLM_MODEL); "*" is the fallback. JSON, e.g. LLM_PRICES='{"gpt-4o-mini": {"prompt": 0.00015, "completion": 0.0006}}'.
LLM_PRICES = env.json("LLM_PRICES", default={
    "extractive": {"prompt": 0.0, "completion": 0.0},
    "*": {"prompt": 0.0005, "completion": 0.0015},
})
LLM_PRICE_CURRENCY = env("LLM_PRICE_CURRENCY", default="USD")
DASHBOARD_DAYS = env.int("DASHBOARD_DAYS", default=30)
# Conversation archives (manage.py archive_conversations / restore_conversations): gzip JSON Lines files
# under ARCHIVE_ROOT, or in an S3-compatible bucket when ARCHIVE_S3_BUCKET is set.
ARCHIVE_ROOT = Path(env("ARCHIVE_ROOT", default=str(DATA_DIR / "archive")))
# Archives are signed (HMAC-SHA256) with this dedicated key and restore refuses anything it did not sign.
# Kept apart from SECRET_KEY so rotating one does not invalidate the other. Required to archive or restore
# with DEBUG off (the commands say so); development and tests get a fixed insecure key.
ARCHIVE_SIGNING_KEY = env("ARCHIVE_SIGNING_KEY", default="" if not _DEV_DEFAULTS else "insecure-dev-archive-signing-key")
ARCHIVE_S3_BUCKET = env("ARCHIVE_S3_BUCKET", default="")
ARCHIVE_S3_PREFIX = env("ARCHIVE_S3_PREFIX", default="conversations/")
ARCHIVE_S3_ENDPOINT_URL = env("ARCHIVE_S3_ENDPOINT_URL", default="")  # MinIO, Ceph, ...; empty: AWS
ARCHIVE_S3_REGION = env("ARCHIVE_S3_REGION", default="us-east-1")
ARCHIVE_S3_ACCESS_KEY_ID = env("ARCHIVE_S3_ACCESS_KEY_ID", default="")  # empty: the default AWS credential chain
ARCHIVE_S3_SECRET_ACCESS_KEY = env("ARCHIVE_S3_SECRET_ACCESS_KEY", default="")
# Every log line is JSON from our formatter: uvicorn's and Celery's loggers go through it too (their levels
# stay as their command lines set them). Django's access line (kotaemon.access, with the request id)
# replaces uvicorn's, which cannot see the request id. Test servers write no access lines unless asked:
# their output goes to a pipe that nobody may read.
LOGGING["loggers"].update({
    "uvicorn": {"handlers": ["console"], "propagate": False},
    "uvicorn.error": {"handlers": ["console"], "propagate": False},
    "uvicorn.access": {"handlers": ["console"], "level": "WARNING", "propagate": False},
    "celery": {"handlers": ["console"], "propagate": False},
    "kotaemon.access": {"handlers": ["console"], "propagate": False,
                        "level": env("ACCESS_LOG_LEVEL", default="WARNING" if TESTING else "INFO")},
})
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Celery workers serve their metrics (task outcomes, queue wait) here when set; see docs/monitoring.md.
WORKER_METRICS_PORT = env.int("WORKER_METRICS_PORT", default=0)
WORKER_METRICS_ADDR = env("WORKER_METRICS_ADDR", default="0.0.0.0")

# --- Cluster (apps/core: event bus, instance registry; docs/cluster.md) -----------------
CLUSTER_RUNTIME = env.bool("CLUSTER_RUNTIME", default=True)  # ASGI lifespan starts listener + heartbeat
CLUSTER_LISTENER = env.bool("CLUSTER_LISTENER", default=True)  # subscribe to events (needs a shared channel layer)
CLUSTER_WORKER_RUNTIME = env.bool("CLUSTER_WORKER_RUNTIME", default=True)  # Celery processes heartbeat + listen
CLUSTER_HEARTBEAT_SECONDS = env.float("CLUSTER_HEARTBEAT_SECONDS", default=5.0)
CLUSTER_INSTANCE_TTL_SECONDS = env.int("CLUSTER_INSTANCE_TTL_SECONDS", default=15)
# Bounded staleness: how often each instance replays the event journal and runs the apps' checks.
CLUSTER_RECONCILE_SECONDS = env.float("CLUSTER_RECONCILE_SECONDS", default=3.0)
CLUSTER_JOURNAL_SECONDS = env.int("CLUSTER_JOURNAL_SECONDS", default=24 * 3600)
CLUSTER_ADVERTISE_PORT = env.int("CLUSTER_ADVERTISE_PORT", default=0)  # 0: from the server's --port
# X-Instance-ID response header naming the instance that answered (hide it at the edge if it matters).
CLUSTER_INSTANCE_HEADER = env.bool("CLUSTER_INSTANCE_HEADER", default=True)
# Per-process cache of API-key lookups; api_key_revoked drops entries on every instance. 0 disables.
API_KEY_CACHE_SECONDS = env.float("API_KEY_CACHE_SECONDS", default=5.0)
if REDIS_URL and CHANNEL_LAYERS["default"]["BACKEND"] == "channels_redis.core.RedisChannelLayer":
    # redis-py 8 reads with a 5 s socket timeout by default, exactly channels-redis's blocking BZPOPMIN
    # timeout: every idle receive() raised TimeoutError, and a message popped at that instant was lost.
    CHANNEL_LAYERS["default"]["CONFIG"]["hosts"] = [
        {"address": REDIS_URL, "socket_timeout": REDIS_TIMEOUT + 10, "socket_connect_timeout": REDIS_TIMEOUT}]
# Several clusters (or test runs) may share one Redis: each gives its workers and producers its own queue.
CELERY_TASK_DEFAULT_QUEUE = env("CELERY_TASK_DEFAULT_QUEUE", default="celery")
