"""Settings: the embedded default, production variables, and refusal to start insecurely."""
import subprocess
import sys

from tests.helpers import ROOT

PROBE = (
    "import django, json; django.setup(); from django.conf import settings as s; "
    "print(json.dumps({'db': s.DATABASES['default']['ENGINE'], 'cache': s.CACHES['default']['BACKEND'], "
    "'layer': s.CHANNEL_LAYERS['default']['BACKEND'], 'eager': s.CELERY_TASK_ALWAYS_EAGER, "
    "'broker': s.CELERY_BROKER_URL, 'session': s.SESSION_ENGINE, 'debug': s.DEBUG}))"
)
# KOTAEMON_DEMO=0: these tests are about the environment alone, not a var/demo-mode left by `make demo`.
BASE_ENV = {"PATH": "/usr/bin:/bin", "DJANGO_SETTINGS_MODULE": "kotaemon_site.settings", "HOME": "/tmp",
            "KOTAEMON_DEMO": "0"}


def run_python(code: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *(args or ["-c", code])], cwd=ROOT, env=BASE_ENV | env,
                          capture_output=True, text=True, timeout=120)


def probe(env: dict) -> dict:
    import json

    result = run_python(PROBE, env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def probe_value(env: dict, name: str):
    import json

    result = run_python(f"import django, json; django.setup(); from django.conf import settings as s; "
                        f"print(json.dumps(getattr(s, {name!r})))", env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_embedded_default_needs_nothing(tmp_path):
    got = probe({"KOTAEMON_DEMO": "1", "KOTAEMON_DATA_DIR": str(tmp_path)})
    assert got == {
        "db": "django.db.backends.sqlite3",
        "cache": "django.core.cache.backends.locmem.LocMemCache",
        "layer": "channels.layers.InMemoryChannelLayer",
        "eager": True,
        "broker": "",
        "session": "django.contrib.sessions.backends.cached_db",
        "debug": True,
    }


def test_production_variables_switch_integrations(tmp_path):
    got = probe({
        "SECRET_KEY": "s" * 64, "ALLOWED_HOSTS": "example.com",
        "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/test", "REDIS_URL": "redis://127.0.0.1:6379/3",
    })
    assert got["db"] == "django.db.backends.postgresql"
    assert got["cache"] == "django_redis.cache.RedisCache"
    assert got["layer"] == "channels_redis.core.RedisChannelLayer"
    assert got["eager"] is False and got["broker"] == "redis://127.0.0.1:6379/3"
    assert got["debug"] is False


def test_broker_can_differ_from_redis():
    got = probe({"SECRET_KEY": "s" * 64, "ALLOWED_HOSTS": "x", "REDIS_URL": "redis://127.0.0.1:6379/3",
                 "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//"})
    assert got["broker"].startswith("amqp://") and got["eager"] is False


def test_debug_off_without_secret_key_refuses_to_start():
    result = run_python(PROBE, {"ALLOWED_HOSTS": "example.com"})
    assert result.returncode != 0
    assert "SECRET_KEY is not set" in result.stderr


def test_debug_off_without_allowed_hosts_refuses_to_start():
    result = run_python(PROBE, {"SECRET_KEY": "s" * 64})
    assert result.returncode != 0
    assert "ALLOWED_HOSTS is not set" in result.stderr


def test_check_deploy_is_clean_under_production_settings():
    result = run_python("", {
        "SECRET_KEY": "k3y-" + "abcdefghij" * 6, "ALLOWED_HOSTS": "kotaemon.example.com",
        "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/test", "REDIS_URL": "redis://127.0.0.1:6379/3",
    }, "manage.py", "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_check_deploy_flags_insecure_overrides():
    """The deploy check is real: turning a protection off is reported."""
    result = run_python("", {
        "SECRET_KEY": "k3y-" + "abcdefghij" * 6, "ALLOWED_HOSTS": "kotaemon.example.com",
        "SESSION_COOKIE_SECURE": "0",
    }, "manage.py", "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode != 0
    assert "security.W012" in result.stdout + result.stderr
