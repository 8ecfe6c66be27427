"""Plugins: configuration writes, the per-process plugin snapshot, sandboxed invocation, tickets.

The web process never imports plugin code. It learns what plugins exist from a discovery worker
(the catalogue), combines that with PluginConfig rows into a Snapshot, and runs hooks through the
sandbox runtime (runner.py). Every change bumps PluginRegistryState.version and publishes
`plugin_config_updated` after commit; each process also re-reads the version every
PLUGIN_VERSION_CHECK_SECONDS, so a missed event heals itself.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, Group
from django.core.cache import cache
from django.db import transaction
from django.utils.translation import gettext

from apps.core import authz
from apps.core.errors import ApplicationError, NotFound, PermissionDenied
from apps.core.events import publish_on_commit, register_handler

from . import metrics, schema
from .base import (EXPLICIT_SCOPES, SCOPE_CONVERSATION, SCOPE_HTTP, SCOPE_KNOWLEDGE, SCOPE_STORAGE, SCOPE_TICKETS,
                   SCOPES, STAGES)
from .models import PluginConfig, PluginInvocation, PluginRegistryState, Ticket
from .router import IntentRouter, IntentSpec, RouteDecision
from .runner import CallOutcome, PluginRuntime, PluginSpec, RpcError, RuntimeOptions

logger = logging.getLogger(__name__)

EVENT = "plugin_config_updated"
MAX_STORAGE_KEY = 200
MAX_STORAGE_VALUE_BYTES = 64 * 1024
MAX_RESULT_CONTENT = 4000
HOST_ENTRY_RE = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d{1,5})?$|^\[[0-9a-f:]+\](:\d{1,5})?$", re.I)


# --- secrets --------------------------------------------------------------------------------------

def _fernet():
    from cryptography.fernet import Fernet

    digest = hashlib.sha256(b"kotaemon-plugin-secrets:" + settings.SECRET_KEY.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def secrets_encrypt(values: dict[str, str]) -> str:
    values = {k: v for k, v in values.items() if v not in (None, "")}
    return _fernet().encrypt(json.dumps(values).encode()).decode() if values else ""


def secrets_decrypt(token: str) -> dict[str, str]:
    """Raises ApplicationError("secrets_unreadable") when SECRET_KEY changed since they were stored."""
    if not token:
        return {}
    from cryptography.fernet import InvalidToken

    try:
        return json.loads(_fernet().decrypt(token.encode()))
    except (InvalidToken, ValueError):
        raise ApplicationError("secrets_unreadable", gettext("The plugin's stored secrets cannot be decrypted (SECRET_KEY changed?); enter them again.")) from None


# --- runtime ----------------------------------------------------------------------------------------

def _runtime_options() -> RuntimeOptions:
    denied = [str(settings.DATA_DIR), str(settings.MEDIA_ROOT), str(settings.INDEX_ROOT),
              str(settings.BASE_DIR / ".env")]
    db_name = str(settings.DATABASES["default"].get("NAME") or "")
    if db_name.startswith("/"):
        denied.append(db_name)
    return RuntimeOptions(
        plugins_dir=str(settings.PLUGINS_DIR) if settings.PLUGINS_DIR else None,
        dotted_paths=tuple(settings.PLUGINS), memory_limit_mb=settings.PLUGIN_MEMORY_LIMIT_MB,
        denied_paths=tuple(denied), start_timeout=settings.PLUGIN_START_TIMEOUT_SECONDS,
        pool_size=max(1, settings.PLUGIN_WORKERS_PER_PLUGIN), entry_points=settings.PLUGIN_ENTRY_POINTS,
        sys_path=tuple(str(p) for p in settings.PLUGIN_PYTHONPATH),
        sandbox=settings.PLUGIN_SANDBOX, cpu_seconds=settings.PLUGIN_CPU_SECONDS,
        file_size_mb=settings.PLUGIN_MAX_FILE_MB, scratch_mb=settings.PLUGIN_SCRATCH_MB,
        max_processes=settings.PLUGIN_MAX_PROCESSES, sandbox_uid=settings.PLUGIN_SANDBOX_UID,
        sandbox_gid=settings.PLUGIN_SANDBOX_GID,
        on_spawn=lambda name: metrics.plugin_workers_started_total.labels(name).inc(),
        on_violation=_on_violation,
    )


def _on_violation(plugin: str, code: str, message: str) -> None:
    """Every refusal a worker reports or the kernel enforces, recorded in the web process as it happens."""
    metrics.plugin_sandbox_violations_total.labels(plugin or "unknown", code).inc()
    logger.warning("plugin sandbox violation", extra={"plugin": plugin, "error_code": code, "detail": message})


@dataclass
class PluginView:
    """One plugin as this process sees it. `config` holds secrets: never serialise or log it."""

    name: str
    meta: dict[str, Any] | None          # from the catalogue; None: not installed (or failed to load)
    row_id: int | None
    enabled: bool
    status: str                          # enabled | disabled | invalid_config | not_installed
    problems: list[dict[str, str]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    secrets_set: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)
    granted_scopes: frozenset[str] = frozenset()   # explicit grants (EXPLICIT_SCOPES) by an administrator
    groups: frozenset[str] | None = None  # None: every signed-in user
    timeout: float = 5.0
    version: int = 0

    @property
    def active(self) -> bool:
        return self.status == "enabled"

    @property
    def declared_scopes(self) -> tuple[str, ...]:
        return tuple((self.meta or {}).get("scopes") or ())

    @property
    def scopes(self) -> tuple[str, ...]:
        """What the plugin may use: declared, and for EXPLICIT_SCOPES also granted by an administrator."""
        return tuple(s for s in self.declared_scopes if s not in EXPLICIT_SCOPES or s in self.granted_scopes)

    def spec(self) -> PluginSpec:
        meta = self.meta or {}
        return PluginSpec(self.name, meta.get("source", ""), meta.get("ref", ""), self.version, self.config,
                          self.scopes, tuple(self.allowed_hosts))

    def hooks(self, stage: str) -> list[dict[str, Any]]:
        return [h for h in (self.meta or {}).get("hooks", []) if h["stage"] == stage]

    def intents(self) -> list[IntentSpec]:
        out = []
        for h in self.hooks("intent"):
            if h.get("configurable"):
                cfg = self.config
                if cfg.get("intent"):
                    out.append(IntentSpec(self.name, cfg["intent"], h["method"], int(cfg.get("priority") or 0),
                                          tuple(cfg.get("examples") or ()), tuple(cfg.get("keywords") or ())))
            else:
                out.append(IntentSpec(self.name, h["intent"], h["method"], h["priority"], tuple(h["examples"]),
                                      tuple(h["keywords"])))
        return out


@dataclass
class Snapshot:
    version: int
    discovery_version: int
    plugins: dict[str, PluginView]
    load_errors: list[dict[str, str]]
    has_catalogue: bool
    _router: IntentRouter | None = None
    _router_lock: threading.Lock = field(default_factory=threading.Lock)

    def active(self) -> list[PluginView]:
        return [p for p in self.plugins.values() if p.active]

    def router(self) -> IntentRouter:
        with self._router_lock:
            if self._router is None:
                self._router = build_router([i for p in self.active() for i in p.intents()])
            return self._router


def _encode(texts: list[str]):
    from apps.core.runtime import configure_process
    from apps.knowledge.rag.embedder import get_embedder

    configure_process(kind="web")
    return get_embedder(settings.EMBEDDING_MODEL_PATH or None, batch_size=settings.EMBEDDING_BATCH_SIZE).encode(texts)


def build_router(intents: Iterable[IntentSpec]) -> IntentRouter:
    return IntentRouter(intents, encode=_encode, threshold=settings.PLUGIN_ROUTER_THRESHOLD,
                        margin=settings.PLUGIN_ROUTER_MARGIN, top_k=settings.PLUGIN_ROUTER_TOP_K,
                        keyword_bonus=settings.PLUGIN_ROUTER_KEYWORD_BONUS)


class _State:
    """Per-process plugin state. Rebuilt when the registry version moves; all access under `lock`."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.runtime: PluginRuntime | None = None
        self.options: RuntimeOptions | None = None
        self.catalogue = None
        self.catalogue_key: tuple | None = None
        self.snapshot: Snapshot | None = None
        self.checked_at = 0.0


_state = _State()


def _runtime() -> PluginRuntime:
    """The process's runtime; replaced (old workers shut down) when the settings behind it change."""
    options = _runtime_options()
    with _state.lock:
        if _state.runtime is None or _state.options != options:
            old = _state.runtime
            _state.runtime, _state.options = PluginRuntime(options), options
            _state.catalogue, _state.catalogue_key, _state.snapshot = None, None, None
            if old is not None:
                old.shutdown()
        return _state.runtime


def _teardown_rpc(snapshot: "Snapshot | None"):
    """RPC handlers for teardowns during shutdown: the plugin's own scopes, no user."""
    def rpc_for(name: str):
        view = snapshot.plugins.get(name) if snapshot is not None else None
        return _rpc_handler(name, scopes=view.scopes if view is not None else (),
                            allowed_hosts=view.allowed_hosts if view is not None else (),
                            http_timeout=view.timeout if view is not None else settings.PLUGIN_TIMEOUT_SECONDS)

    return rpc_for


def runtime_reset() -> None:
    """Shut every worker down (plugins get their teardown) and forget all cached state."""
    with _state.lock:
        runtime, _state.runtime = _state.runtime, None
        snapshot = _state.snapshot
        _state.catalogue = _state.catalogue_key = _state.snapshot = None
        _state.checked_at = 0.0
    if runtime is not None:
        runtime.shutdown(rpc_for=_teardown_rpc(snapshot))


def _registry_versions() -> tuple[int, int]:
    row = PluginRegistryState.objects.filter(pk=1).values_list("version", "discovery_version").first()
    return row if row else (0, 0)


def _catalogue(discovery_version: int):
    runtime = _runtime()
    key = (discovery_version, runtime.generation)
    with _state.lock:
        if _state.catalogue is not None and _state.catalogue_key == key:
            return _state.catalogue
    catalogue = runtime.discover()
    for error in catalogue.errors:
        logger.warning("plugin failed to load and was skipped",
                       extra={"plugin_source": error.get("source"), "ref": error.get("ref"), "error": error.get("error")})
    with _state.lock:
        _state.catalogue, _state.catalogue_key = catalogue, key
    return catalogue


def _view(name: str, meta: dict | None, row: PluginConfig | None) -> PluginView:
    enabled = bool(row and row.enabled)
    view = PluginView(name=name, meta=meta, row_id=row.pk if row else None, enabled=enabled, status="disabled",
                      timeout=(row.timeout_seconds if row and row.timeout_seconds else settings.PLUGIN_TIMEOUT_SECONDS),
                      version=row.version if row else 0)
    if row is not None:
        view.granted_scopes = frozenset(row.granted_scopes or ())
        groups = [g.name for g in row.allowed_groups.all()]
        view.groups = frozenset(groups) if groups else None
    if meta is None:
        view.status = "not_installed"
        return view
    config_schema = meta.get("config_schema") or {"type": "object"}
    try:
        secrets = secrets_decrypt(row.secrets_encrypted) if row else {}
    except ApplicationError as exc:
        secrets = {}
        view.problems.append({"field": "(secrets)", "message": exc.message})
    view.secrets_set = sorted(k for k, v in secrets.items() if v)
    stored = dict(row.config) if row else {}
    view.problems += schema.validate(config_schema, stored, secrets) + _intent_problems(meta, stored, config_schema)
    view.config = schema.effective_config(config_schema, stored, secrets)
    # Explicit only: a URL setting (http_api's url_template, order_query's base_url) never allows its own host.
    view.allowed_hosts = sorted(set(row.allowed_hosts if row else []))
    if enabled:
        view.status = "invalid_config" if view.problems else "enabled"
    return view


def _intent_problems(meta: dict, config: dict, config_schema: dict) -> list[dict[str, str]]:
    problems = []
    if any(h.get("configurable") for h in meta.get("hooks", []) if h["stage"] == "intent"):
        merged = schema.effective_config(config_schema, config, {})
        for i, pattern in enumerate(merged.get("keywords") or []):
            try:
                re.compile(pattern)
            except (re.error, TypeError) as exc:
                problems.append({"field": f"keywords.{i}", "message": f"is not a valid regular expression: {exc}"})
    return problems


def _build_snapshot(version: int, discovery_version: int, need_catalogue: bool) -> Snapshot:
    rows = {r.name: r for r in PluginConfig.objects.prefetch_related("allowed_groups")}
    if not need_catalogue and not any(r.enabled for r in rows.values()):
        # Nothing enabled: answer without starting a discovery worker.
        plugins = {name: _view(name, None, row) for name, row in rows.items()}
        for view in plugins.values():
            view.status = "disabled"
        return Snapshot(version, discovery_version, plugins, [], has_catalogue=False)
    catalogue = _catalogue(discovery_version)
    names = sorted(set(rows) | set(catalogue.plugins))
    plugins = {name: _view(name, catalogue.plugins.get(name), rows.get(name)) for name in names}
    return Snapshot(version, discovery_version, plugins, list(catalogue.errors), has_catalogue=True)


def plugins_snapshot(*, force: bool = False, need_catalogue: bool = False) -> Snapshot:
    """The current snapshot; re-reads the registry version at most every PLUGIN_VERSION_CHECK_SECONDS."""
    now = time.monotonic()
    runtime = _runtime()
    with _state.lock:
        snap = _state.snapshot
        fresh = snap is not None and not force and (now - _state.checked_at) < settings.PLUGIN_VERSION_CHECK_SECONDS
        if fresh and (snap.has_catalogue or not need_catalogue):
            return snap
        version, discovery_version = _registry_versions()
        _state.checked_at = now
        if (snap is not None and not force and snap.version == version and snap.discovery_version == discovery_version
                and (snap.has_catalogue or not need_catalogue)):
            return snap
        if snap is not None and snap.discovery_version != discovery_version:
            # New or changed modules: every worker must re-import, so retire them all (teardown runs).
            runtime.shutdown(rpc_for=_teardown_rpc(snap))
        new = _build_snapshot(version, discovery_version, need_catalogue or (snap is not None and snap.has_catalogue))
        _state.snapshot = new
    metrics.plugin_config_version.set(version)
    specs = {p.name: p.spec() for p in new.active()}
    # A retired plugin tears down with the scopes it had; a reconfigured one with its new ones.
    teardown_rpc, new_rpc = _teardown_rpc(snap), _teardown_rpc(new)
    runtime.apply(specs, timeout=settings.PLUGIN_TIMEOUT_SECONDS,
                  rpc_for=lambda spec: (new_rpc if spec.name in new.plugins else teardown_rpc)(spec.name))
    return new


def _on_plugin_config_updated(event: dict[str, Any]) -> None:
    """Cluster event handler: idempotent, applies only versions newer than the one held."""
    with _state.lock:
        held = _state.snapshot.version if _state.snapshot else -1
    if event.get("version") is None or event["version"] > held:
        plugins_snapshot(force=True)


def register_event_handlers() -> None:
    register_handler(EVENT, _on_plugin_config_updated)


# --- configuration writes ------------------------------------------------------------------------------

def _bump_version(*, rediscover: bool = False) -> tuple[int, int]:
    with transaction.atomic():
        state, _ = PluginRegistryState.objects.select_for_update().get_or_create(pk=1)
        state.version += 1
        if rediscover:
            state.discovery_version += 1
        state.save(update_fields=["version", "discovery_version", "updated_at"])
    return state.version, state.discovery_version


def _publish(version: int, discovery_version: int, *, plugin: str | None, reason: str) -> None:
    publish_on_commit(EVENT, {"plugin": plugin, "reason": reason, "discovery_version": discovery_version},
                      version=version)


def plugins_sync() -> list[str]:
    """Create a (disabled) PluginConfig row for every discovered plugin that has none. Returns the new names."""
    snap = plugins_snapshot(need_catalogue=True)
    created = []
    for name, view in snap.plugins.items():
        if view.meta is not None and view.row_id is None:
            _, made = PluginConfig.objects.get_or_create(name=name)
            if made:
                created.append(name)
    if created:
        plugins_snapshot(force=True, need_catalogue=True)
    return created


def ensure_plugin_admin(actor: AbstractBaseUser | None) -> None:
    """Plugin settings are for plugin administrators (apps.core.authz; None: the system itself, e.g. a
    management command)."""
    if actor is not None:
        authz.require(actor, "plugins.manage")


def plugins_reload(*, actor: AbstractBaseUser | None = None) -> Snapshot:
    """Discover modules again and restart every plugin (teardown of the old, setup of the new instances)."""
    ensure_plugin_admin(actor)
    with transaction.atomic():
        version, discovery_version = _bump_version(rediscover=True)
        _publish(version, discovery_version, plugin=None, reason="reload")
    logger.info("plugins reloaded", extra={"plugin_version": version, "actor": getattr(actor, "username", None)})
    plugins_sync()
    return plugins_snapshot(force=True, need_catalogue=True)


_UNSET: Any = object()


def _clean_hosts(hosts: Any) -> list[str]:
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        raise ApplicationError("invalid_allowed_hosts", gettext("allowed_hosts must be a list of host names."))
    cleaned = [h.strip().lower() for h in hosts if h.strip()]
    bad = [h for h in cleaned if not HOST_ENTRY_RE.match(h)]
    if bad:
        raise ApplicationError("invalid_allowed_hosts", gettext("Use host, host:port or *.domain entries."),
                               details={"invalid": bad})
    return sorted(set(cleaned))


@dataclass
class _Prepared:
    row: PluginConfig
    enabled: bool
    config: dict[str, Any]
    secrets: dict[str, str]
    hosts: list[str] | None
    granted: list[str] | None = None


def _clean_grants(scopes: Any) -> list[str]:
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise ApplicationError("invalid_granted_scopes", gettext("granted_scopes must be a list of scope names."))
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise ApplicationError("invalid_granted_scopes", gettext("Unknown scopes: %(unknown)s.")
                                                         % {"unknown": ', '.join(unknown)},
                               details={"invalid": unknown, "known": list(SCOPES)})
    return sorted(set(scopes))


def plugin_config_validate(*, name: str, enabled: bool | None = None, config: dict[str, Any] | None = None,
                           secrets: dict[str, str] | None = None, clear_secrets: Iterable[str] = (),
                           allowed_hosts: list[str] | None = None, timeout_seconds: float | None = _UNSET,
                           granted_scopes: list[str] | None = None) -> _Prepared:
    """Check a change without saving it (the admin form shows these errors). Raises ApplicationError."""
    snap = plugins_snapshot(need_catalogue=True)
    view = snap.plugins.get(name)
    if view is None:
        raise NotFound(gettext("No plugin named %(name)r.") % {"name": name}, code="plugin_not_found")
    meta = view.meta
    row = PluginConfig.objects.filter(name=name).first() or PluginConfig(name=name)
    will_enable = row.enabled if enabled is None else bool(enabled)
    if meta is None and will_enable:
        raise ApplicationError("plugin_not_installed", gettext("Plugin %(name)r is not installed (or failed to load); it can only be disabled.")
                                                       % {"name": name})
    new_config = dict(row.config) if config is None else config
    if not isinstance(new_config, dict):
        raise ApplicationError("invalid_plugin_config", gettext("The config must be a JSON object."),
                               details={"problems": [{"field": "(config)", "message": "must be a JSON object"}]})
    try:
        stored_secrets = secrets_decrypt(row.secrets_encrypted)
    except ApplicationError:
        stored_secrets = {}
    if meta is not None:
        config_schema = meta.get("config_schema") or {"type": "object"}
        secret_names = set(schema.secret_fields(config_schema))
        unknown = sorted(set(secrets or {}) - secret_names)
        if unknown:
            raise ApplicationError("invalid_plugin_config", gettext("Unknown secret fields."),
                                   details={"problems": [{"field": k, "message": "is not a secret field of this plugin"}
                                                         for k in unknown]})
        for key, value in (secrets or {}).items():
            if value not in (None, ""):
                stored_secrets[key] = str(value)
        for key in clear_secrets:
            stored_secrets.pop(key, None)
        problems = schema.validate(config_schema, new_config, stored_secrets) + \
            _intent_problems(meta, new_config, config_schema)
        if not will_enable:
            # A disabled plugin may be saved half-configured; it is checked in full when enabled.
            problems = [p for p in problems if p["message"] != "is required"]
        if problems:
            raise ApplicationError("invalid_plugin_config",
                                   gettext("The configuration of %(name)r is invalid: %(problems)s")
                                   % {"name": name, "problems": schema.format_problems(problems)},
                                   details={"problems": problems})
    if timeout_seconds is not _UNSET and timeout_seconds is not None:
        if isinstance(timeout_seconds, bool) or not isinstance(timeout_seconds, (int, float)) \
                or not 0 < timeout_seconds <= 60:
            raise ApplicationError("invalid_timeout", gettext("timeout_seconds must be between 0 and 60."))
    hosts = _clean_hosts(allowed_hosts) if allowed_hosts is not None else None
    granted = _clean_grants(granted_scopes) if granted_scopes is not None else None
    return _Prepared(row, will_enable, new_config, stored_secrets, hosts, granted)


def plugin_config_update(*, name: str, actor: AbstractBaseUser | None = None, enabled: bool | None = None,
                         config: dict[str, Any] | None = None, secrets: dict[str, str] | None = None,
                         clear_secrets: Iterable[str] = (), allowed_groups: Iterable[Group | int] | None = None,
                         allowed_hosts: list[str] | None = None, timeout_seconds: float | None = _UNSET,
                         granted_scopes: list[str] | None = None) -> PluginConfig:
    """Change a plugin's settings; takes effect on every instance without a restart (teardown of the old
    instance, setup of the new). Secrets given as "" keep their stored value. Raises
    ApplicationError("invalid_plugin_config", details={"problems": [{"field", "message"}]}) on a bad config.
    `actor` None means the system (a management command); a user must be staff."""
    ensure_plugin_admin(actor)
    prepared = plugin_config_validate(name=name, enabled=enabled, config=config, secrets=secrets,
                                      clear_secrets=clear_secrets, allowed_hosts=allowed_hosts,
                                      timeout_seconds=timeout_seconds, granted_scopes=granted_scopes)
    row = prepared.row
    with transaction.atomic():
        row.enabled = prepared.enabled
        row.config = prepared.config
        row.secrets_encrypted = secrets_encrypt(prepared.secrets)
        if prepared.hosts is not None:
            row.allowed_hosts = prepared.hosts
        if prepared.granted is not None:
            row.granted_scopes = prepared.granted
        if timeout_seconds is not _UNSET:
            row.timeout_seconds = timeout_seconds
        row.version = (row.version or 0) + 1 if row.pk else 1
        row.updated_by = actor if actor is not None and actor.is_authenticated else None
        row.save()
        if allowed_groups is not None:
            row.allowed_groups.set(list(allowed_groups))
        version, discovery_version = _bump_version()
        _publish(version, discovery_version, plugin=name, reason="config")
    logger.info("plugin config updated", extra={"plugin": name, "enabled": row.enabled, "plugin_version": version,
                                                "actor": getattr(actor, "username", None)})
    return row


# --- invocation --------------------------------------------------------------------------------------

def user_identity(user: AbstractBaseUser) -> dict[str, Any]:
    groups = getattr(user, "_plugin_group_names", None)
    if groups is None:
        groups = sorted(user.groups.values_list("name", flat=True)) if user.pk else []
        user._plugin_group_names = groups
    return {"id": user.pk, "username": user.get_username(), "email": getattr(user, "email", "") or "",
            "groups": groups}


def user_may_use(view: PluginView, user: AbstractBaseUser) -> bool:
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return False
    if view.groups is None:
        return True
    return bool(view.groups & set(user_identity(user)["groups"]))


def _cache_key(plugin: str, scope: str, user_id: int | None, key: Any) -> str:
    if not isinstance(key, str) or not 0 < len(key) <= MAX_STORAGE_KEY:
        raise RpcError("error", "invalid_key", f"storage keys are strings of 1-{MAX_STORAGE_KEY} characters")
    digest = hashlib.sha256(key.encode()).hexdigest()[:40]
    if scope == "user":
        if user_id is None:
            raise RpcError("error", "no_user", "user_storage is only available while serving a user")
        return f"plugin:{plugin}:u:{user_id}:{digest}"
    if scope != "plugin":
        raise RpcError("error", "invalid_scope", "unknown storage scope")
    return f"plugin:{plugin}:g:{digest}"


_HTTP_DENIALS = {"host_not_allowed", "address_not_allowed", "scheme_not_allowed"}
_HTTP_ERRORS = {"timeout": "http_timeout", "response_too_large": "http_response_too_large",
                "too_many_redirects": "http_too_many_redirects", "invalid_url": "http_invalid_url"}


def _plugin_http(plugin: str, args: dict[str, Any], *, allowed_hosts: Iterable[str], timeout: float) -> dict[str, Any]:
    """A plugin's HTTP request, made by the web process: the plugin's allow-list, then the outbound gate."""
    from apps.core.outbound import OutboundError, fetch

    from .httpclient import MAX_RESPONSE_BYTES, host_allowed

    hosts = list(allowed_hosts)
    method = str(args.get("verb") or "GET").upper()
    if method not in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"):
        raise RpcError("error", "http_bad_method", f"HTTP method {method!r} is not supported")
    headers = args.get("headers") or {}
    if not isinstance(headers, dict):
        raise RpcError("error", "http_bad_request", "headers must be an object")
    try:
        body = base64.b64decode(args["body"]) if args.get("body") else None
        requested = float(args.get("timeout") or timeout)
    except (ValueError, TypeError):
        raise RpcError("error", "http_bad_request", "invalid body or timeout") from None
    try:
        resp = fetch(str(args.get("url") or ""), method=method, headers={str(k): str(v) for k, v in headers.items()},
                     body=body, timeout=max(0.05, min(requested, timeout)), max_bytes=MAX_RESPONSE_BYTES,
                     host_filter=lambda host, port: host_allowed(host, port, hosts))
    except OutboundError as exc:
        if exc.code in _HTTP_DENIALS:
            raise RpcError("denied", exc.code, f"{plugin}: {exc.message}") from None
        raise RpcError("error", _HTTP_ERRORS.get(exc.code, "http_unreachable"), exc.message) from None
    return {"status": resp.status, "headers": resp.headers, "url": resp.url,
            "body": base64.b64encode(resp.content).decode()}


def _rpc_handler(plugin: str, *, scopes: Iterable[str], user: AbstractBaseUser | None = None,
                 turn: dict[str, Any] | None = None, allowed_hosts: Iterable[str] = (),
                 http_timeout: float | None = None):
    """Serves a sandboxed plugin's requests. The namespace and the user come from here, never from the plugin."""
    scopes = set(scopes)
    user_id = user.pk if user is not None else None
    allowed_hosts = tuple(allowed_hosts)

    def handle(method: str, args: dict[str, Any]) -> Any:
        if method == "http.request":
            if SCOPE_HTTP not in scopes:
                raise RpcError("denied", "scope_missing", f"{plugin} does not declare the 'http' scope")
            return _plugin_http(plugin, args, allowed_hosts=allowed_hosts,
                                timeout=http_timeout or settings.PLUGIN_TIMEOUT_SECONDS)
        if method.startswith("storage."):
            if SCOPE_STORAGE not in scopes:
                raise RpcError("denied", "scope_missing", f"{plugin} does not declare the 'storage' scope")
            key = _cache_key(plugin, args.get("scope", "plugin"), user_id, args.get("key"))
            if method == "storage.get":
                return cache.get(key)
            if method == "storage.set":
                value = args.get("value")
                if len(json.dumps(value, default=str)) > MAX_STORAGE_VALUE_BYTES:
                    raise RpcError("error", "value_too_large", f"values are limited to {MAX_STORAGE_VALUE_BYTES} bytes")
                ttl = args.get("ttl") or settings.PLUGIN_STORAGE_TTL_SECONDS
                if not isinstance(ttl, int) or ttl <= 0:
                    raise RpcError("error", "invalid_ttl", "ttl is a positive number of seconds")
                cache.set(key, value, timeout=min(ttl, settings.PLUGIN_STORAGE_TTL_SECONDS))
                return None
            if method == "storage.delete":
                cache.delete(key)
                return None
            if method == "storage.incr":
                delta = args.get("delta", 1)
                if not isinstance(delta, int):
                    raise RpcError("error", "invalid_delta", "delta must be an integer")
                if cache.add(key, delta, timeout=settings.PLUGIN_STORAGE_TTL_SECONDS):
                    return delta
                try:
                    return cache.incr(key, delta)
                except ValueError:  # expired between add and incr
                    cache.set(key, delta, timeout=settings.PLUGIN_STORAGE_TTL_SECONDS)
                    return delta
        if method == "tickets.create":
            if SCOPE_TICKETS not in scopes:
                raise RpcError("denied", "scope_missing", f"{plugin} does not declare the 'tickets:create' scope")
            if user is None:
                raise RpcError("error", "no_user", "tickets can only be opened while serving a user")
            t = turn or {}
            try:
                ticket = ticket_create(user=user, subject=str(args.get("subject") or ""),
                                       description=str(args.get("description") or ""),
                                       priority=str(args.get("priority") or "normal"),
                                       transcript=t.get("transcript") or [], conversation_id=t.get("conversation_id"),
                                       session_id=t.get("session_id") or "", source_plugin=plugin)
            except ApplicationError as exc:
                raise RpcError("error", exc.code, exc.message) from None
            return {"id": ticket.pk, "number": ticket.number, "status": ticket.status}
        raise RpcError("error", "unknown_method", f"unknown platform call {method!r}")

    return handle


def _record(*, plugin: str, stage: str, intent: str | None, outcome: CallOutcome, user: AbstractBaseUser | None,
            conversation_id: int | None, confidence: float | None) -> None:
    metrics.plugin_invocations_total.labels(plugin, outcome.outcome).inc()
    metrics.plugin_duration_seconds.labels(plugin).observe(outcome.duration)
    if outcome.outcome != "ok":
        logger.warning("plugin invocation failed", extra={
            "plugin": plugin, "stage": stage, "intent": intent, "outcome": outcome.outcome,
            "error_code": outcome.error_code, "duration_ms": round(outcome.duration * 1000, 1)})
    try:
        PluginInvocation.objects.create(
            plugin=plugin, stage=stage, intent=intent or "", outcome=outcome.outcome,
            error_code=(outcome.error_code or "")[:64], error_message=(outcome.error_message or "")[:500],
            duration_ms=outcome.duration * 1000, confidence=confidence,
            user=user if user is not None and user.pk else None, conversation_id=conversation_id)
    except Exception:  # noqa: BLE001 - bookkeeping must never fail the turn
        logger.exception("could not record a plugin invocation", extra={"plugin": plugin})


def plugin_invoke(*, view: PluginView, stage: str, method: str, user: AbstractBaseUser, ctx: dict[str, Any],
                  intent: str | None = None, confidence: float | None = None, slots: dict[str, str] | None = None,
                  turn: dict[str, Any] | None = None) -> CallOutcome:
    """Run one hook of one plugin in the sandbox, permission-checked, timed and recorded."""
    conversation_id = (turn or {}).get("conversation_id")
    if not view.active:
        outcome = CallOutcome("denied", error_code="plugin_disabled", error_message=f"status {view.status}")
    elif not user_may_use(view, user):
        outcome = CallOutcome("denied", error_code="group_not_allowed",
                              error_message="the user is not in the plugin's allowed groups")
    else:
        message = {"op": "invoke", "stage": stage, "method": method, "intent": intent, "confidence": confidence,
                   "slots": slots or {}, "user": user_identity(user), "ctx": ctx,
                   "http_timeout": view.timeout}
        rpc = _rpc_handler(view.name, scopes=view.scopes, user=user, turn=turn, allowed_hosts=view.allowed_hosts,
                           http_timeout=view.timeout)
        outcome = _runtime().call(view.spec(), message, timeout=view.timeout, rpc=rpc)
        outcome = _checked(outcome)
    _record(plugin=view.name, stage=stage, intent=intent, outcome=outcome, user=user,
            conversation_id=conversation_id, confidence=confidence)
    return outcome


def _checked(outcome: CallOutcome) -> CallOutcome:
    """A result must be plain text the answer can cite; anything else is the plugin's error."""
    result = outcome.result
    if outcome.outcome != "ok" or result is None:
        return outcome
    if not isinstance(result, dict) or not isinstance(result.get("content"), str) or not result["content"].strip():
        return CallOutcome("error", outcome.duration, error_code="bad_result",
                           error_message="the hook returned a result without text content")
    result["title"] = str(result.get("title") or "")[:200]
    result["content"] = result["content"][:MAX_RESULT_CONTENT]
    url = result.get("url")
    result["url"] = url if isinstance(url, str) and url.startswith(("http://", "https://")) else None
    result["data"] = result.get("data") if isinstance(result.get("data"), dict) else {}
    return outcome


# --- the chat turn hook ---------------------------------------------------------------------------------

def _source_dict(key: int, source: Any, *, with_text: bool) -> dict[str, Any]:
    get = (lambda k, d=None: source.get(k, d)) if isinstance(source, dict) else \
        (lambda k, d=None: getattr(source, k, d))
    # Chunk text only for plugins granted knowledge:read; the others see where a source is, not what it says.
    return {"key": key, "chunk_id": get("chunk_id"), "document_id": get("document_id"),
            "document_title": get("document_title", ""),
            "text": str(get("text", "") or "")[:2000] if with_text else "",
            "page": get("page"), "heading_path": list(get("heading_path", []) or []), "score": get("score"),
            "url": get("url", "")}


def _ctx_payload(ctx: Any, stage: str, view: PluginView) -> dict[str, Any]:
    return {
        "message": ctx.message, "query": ctx.query, "conversation_id": ctx.conversation_id,
        "history": list(ctx.history or [])[-20:] if SCOPE_CONVERSATION in view.scopes else [],
        "sources": [_source_dict(i, s, with_text=SCOPE_KNOWLEDGE in view.scopes) for i, s in enumerate(ctx.sources or [])],
        "plugin_results": [r.to_dict() for r in ctx.plugin_results if getattr(r, "ok", False)],
        "answer": ctx.answer if stage == "after_answer" else None,
    }


def _turn_info(ctx: Any) -> dict[str, Any]:
    transcript = [{"role": str(t.get("role", "")), "content": str(t.get("content", ""))[:4000]}
                  for t in list(ctx.history or [])[-20:] if isinstance(t, dict)]
    transcript.append({"role": "user", "content": ctx.message})
    return {"conversation_id": ctx.conversation_id, "session_id": ctx.session_id, "transcript": transcript}


def _apply_patch(ctx: Any, stage: str, patch: dict[str, Any]) -> None:
    if stage in ("intent", "before_retrieval"):
        query = patch.get("query")
        if isinstance(query, str) and query.strip():
            ctx.query = query[:2000]
        if patch.get("skip_retrieval") is True:
            ctx.skip_retrieval = True
    if stage == "after_retrieval" and isinstance(patch.get("source_keys"), list):
        seen: set[int] = set()
        order = []
        for key in patch["source_keys"]:
            if isinstance(key, int) and 0 <= key < len(ctx.sources) and key not in seen:
                seen.add(key)
                order.append(key)
        # Hooks may reorder or drop knowledge sources, never invent them.
        ctx.sources[:] = [ctx.sources[k] for k in order]


def _plugin_result(view: PluginView, intent: str | None, outcome: CallOutcome):
    from apps.conversations.hooks import PluginResult

    if outcome.outcome == "ok" and outcome.result:
        r = outcome.result
        return PluginResult(plugin=view.name, intent=intent, ok=True, title=r["title"] or view.name,
                            content=r["content"], data=r["data"], url=r["url"])
    return PluginResult(plugin=view.name, intent=intent, ok=False, title=view.name, content="", data={},
                        error_code=outcome.error_code or outcome.outcome)


def route_message(*, message: str, user: AbstractBaseUser, snapshot: Snapshot | None = None) -> RouteDecision:
    """The intent of `message` among enabled plugins; handlers are limited to those `user` may use."""
    snap = snapshot or plugins_snapshot()
    if not any(p.intents() for p in snap.active()):
        return RouteDecision(None, 0.0, reason="no_intents")
    decision = snap.router().route(message)
    metrics.intent_routes_total.labels(decision.intent or "none").inc()
    return decision


def plugins_turn_hook(stage: str, ctx: Any) -> None:
    """Registered into apps.conversations.hooks: intent plugins and generic hooks for one chat turn."""
    user = ctx.user
    if not getattr(user, "is_authenticated", False):
        return
    snap = plugins_snapshot()
    active = snap.active()
    if not active:
        return
    turn = _turn_info(ctx)
    if stage == "before_retrieval":
        decision = route_message(message=ctx.message, user=user, snapshot=snap)
        if decision.intent:
            for handler in decision.handlers:
                view = snap.plugins[handler.plugin]
                if not user_may_use(view, user):
                    # Recorded, never run: a user outside the allowed groups never triggers the plugin.
                    plugin_invoke(view=view, stage="intent", method=handler.method, user=user, ctx={},
                                  intent=decision.intent, confidence=decision.confidence, turn=turn)
                    continue
                outcome = plugin_invoke(view=view, stage="intent", method=handler.method, user=user,
                                        ctx=_ctx_payload(ctx, stage, view), intent=decision.intent,
                                        confidence=decision.confidence, slots=decision.slots, turn=turn)
                _apply_patch(ctx, "intent", outcome.patch)
                ctx.plugin_results.append(_plugin_result(view, decision.intent, outcome))
                if outcome.outcome == "ok" and outcome.result:
                    break
    hooks = sorted(((h["priority"], view, h) for view in active for h in view.hooks(stage)),
                   key=lambda t: (-t[0], t[1].name, t[2]["method"]))
    for _, view, h in hooks:
        if not user_may_use(view, user):
            continue
        outcome = plugin_invoke(view=view, stage=stage, method=h["method"], user=user,
                                ctx=_ctx_payload(ctx, stage, view), turn=turn)
        if outcome.outcome == "ok":
            _apply_patch(ctx, stage, outcome.patch)
            if outcome.result and stage != "after_answer":
                ctx.plugin_results.append(_plugin_result(view, None, outcome))


def plugin_test(*, name: str, utterance: str, user: AbstractBaseUser) -> dict[str, Any]:
    """`manage.py plugins test`: route the utterance (this plugin's intents only) and run the winner."""
    snap = plugins_snapshot(need_catalogue=True)
    view = snap.plugins.get(name)
    if view is None or view.meta is None:
        raise NotFound(gettext("No installed plugin named %(name)r.") % {"name": name}, code="plugin_not_found")
    if not view.active:
        raise ApplicationError("plugin_not_enabled", gettext("Plugin %(name)r is %(status)s: %(problems)s.")
                                                     % {"name": name, "status": view.status.replace('_', ' '),
                                                        "problems": schema.format_problems(view.problems)
                                                        or gettext("enable it first")})
    if not user_may_use(view, user):
        raise PermissionDenied(gettext("%(user)s is not in the allowed groups of %(name)r.")
                               % {"user": user.get_username(), "name": name},
                               code="group_not_allowed")
    decision = build_router(view.intents()).route(utterance)
    out: dict[str, Any] = {"plugin": name, "route": decision.to_dict()}
    if not decision.intent:
        out["invocation"] = None
        return out
    handler = decision.handlers[0]
    ctx = {"message": utterance, "query": utterance, "conversation_id": None, "history": [], "sources": [],
           "plugin_results": [], "answer": None}
    outcome = plugin_invoke(view=view, stage="intent", method=handler.method, user=user, ctx=ctx,
                            intent=decision.intent, confidence=decision.confidence, slots=decision.slots,
                            turn={"conversation_id": None, "session_id": "", "transcript":
                                  [{"role": "user", "content": utterance}]})
    out["invocation"] = {"outcome": outcome.outcome, "duration_ms": round(outcome.duration * 1000, 1),
                         "result": outcome.result, "patch": outcome.patch, "error_code": outcome.error_code,
                         "error_message": outcome.error_message}
    return out


# --- tickets ---------------------------------------------------------------------------------------------

def ticket_create(*, user: AbstractBaseUser, subject: str, description: str = "", priority: str = "normal",
                  transcript: list[dict[str, str]] | None = None, conversation_id: int | None = None,
                  session_id: str = "", source_plugin: str = "") -> Ticket:
    subject = " ".join(subject.split())[:200]
    if not subject:
        raise ApplicationError("invalid_ticket", gettext("A ticket needs a subject."))
    if priority not in dict(Ticket.PRIORITIES):
        raise ApplicationError("invalid_ticket", gettext("priority must be one of %(priorities)s.")
                                                 % {"priorities": [p for p, _ in Ticket.PRIORITIES]})
    with transaction.atomic():
        ticket = Ticket.objects.create(user=user, subject=subject, description=description[:20_000],
                                       priority=priority, transcript=list(transcript or [])[-50:],
                                       conversation_id=conversation_id, session_id=session_id[:100],
                                       source_plugin=source_plugin)
        ticket.number = f"T-{ticket.pk:06d}"
        ticket.save(update_fields=["number"])
    logger.info("support ticket opened", extra={"ticket": ticket.number, "plugin": source_plugin})
    return ticket


__all__ = ["plugins_snapshot", "plugins_sync", "plugins_reload", "plugin_config_update",
           "plugin_config_validate", "plugin_invoke", "plugins_turn_hook", "plugin_test", "route_message", "ticket_create", "runtime_reset",
           "secrets_encrypt", "secrets_decrypt", "user_may_use", "build_router", "STAGES"]
