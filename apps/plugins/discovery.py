"""Finding plugins: built-ins, dotted paths from settings, the `kotaemon_site.plugins` entry-point
group, and modules in the plugins directory. Django-free.

Identity comes from the platform, never from the plugin: `candidates()` runs in the web process and
lists locations WITHOUT importing anything, naming each one after where it is (the built-in module,
the file or package in PLUGINS_DIR, the entry point's name, the last module of a dotted path or an
explicit `name=dotted.path`). Each location is then imported in its own sandbox worker
(`describe_unit`), which can only describe the plugin named after it: a module that declares another
plugin's name is a load error, and one module cannot describe (or forge) another. Secrets are given
only to a worker that loaded the location its name maps to.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from .base import NAME_RE, BasePlugin

ENTRY_POINT_GROUP = "kotaemon_site.plugins"
BUILTIN_MODULES = (
    "apps.plugins.builtin.order_query",
    "apps.plugins.builtin.ticket_create",
    "apps.plugins.builtin.http_api",
)
LOCAL_PACKAGE = "kotaemon_plugins_local"


@dataclass
class Found:
    cls: type[BasePlugin]
    source: str   # builtin | setting | entry_point | dir
    ref: str      # what load_plugin_class needs to find it again

    def describe(self) -> dict:
        return self.cls.describe() | {"source": self.source, "ref": self.ref}


@dataclass
class LoadError:
    source: str
    ref: str
    error: str

    def to_dict(self) -> dict:
        return {"source": self.source, "ref": self.ref, "error": self.error}


def _error_text(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"[:1000]


def _plugin_classes(obj: object, module_name: str | None = None) -> list[type[BasePlugin]]:
    if isinstance(obj, type):
        if not issubclass(obj, BasePlugin):
            raise TypeError(f"{obj!r} is not a BasePlugin subclass")
        return [obj]
    if isinstance(obj, ModuleType):
        found = [c for c in list(vars(obj).values()) if isinstance(c, type)
                 and issubclass(c, BasePlugin) and c is not BasePlugin and c.__module__ == obj.__name__
                 and getattr(c, "name", "")]
        return sorted(found, key=lambda c: c.name)
    raise TypeError(f"{obj!r} is neither a module nor a plugin class")


def _import_dotted(path: str) -> object:
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as exc:
        module_path, _, attr = path.rpartition(".")
        if not module_path or exc.name not in (path,):
            raise
        return getattr(importlib.import_module(module_path), attr)


def _local_package() -> None:
    if LOCAL_PACKAGE not in sys.modules:
        pkg = ModuleType(LOCAL_PACKAGE)
        pkg.__path__ = []  # namespace-like: submodules are loaded from explicit file locations
        sys.modules[LOCAL_PACKAGE] = pkg


def import_local_file(path: Path) -> ModuleType:
    """Import one module (file.py or package dir) from the plugins directory under a private name."""
    _local_package()
    name = f"{LOCAL_PACKAGE}.{path.stem if path.is_file() else path.name}"
    if path.is_dir():
        spec = importlib.util.spec_from_file_location(name, path / "__init__.py",
                                                      submodule_search_locations=[str(path)])
    else:
        spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def local_candidates(plugins_dir: Path | str | None) -> list[Path]:
    if not plugins_dir:
        return []
    root = Path(plugins_dir)
    if not root.is_dir():
        return []
    out = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(("_", ".")):
            continue
        if entry.is_file() and entry.suffix == ".py":
            out.append(entry)
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            out.append(entry)
    return out


def discover(*, plugins_dir: str | None, dotted_paths: list[str], entry_points: bool = True,
             builtins: bool = True, skip: set[str] | frozenset[str] = frozenset(),
             on_import=None) -> tuple[list[Found], list[LoadError]]:
    """Every plugin class that can be found, first-found wins on a name clash (reported as an error).

    `on_import(source, ref)` is called before each import, so a supervisor can tell which module hung;
    refs in `skip` are not imported (they hung last time).
    """
    import importlib.metadata  # lazily: it costs a noticeable part of a worker's start

    found: list[Found] = []
    errors: list[LoadError] = []
    names: dict[str, Found] = {}

    def add(source: str, ref: str, loader) -> None:
        if ref in skip:
            return
        if on_import is not None:
            on_import(source, ref)
        try:
            classes = _plugin_classes(*loader())
            for cls in classes:
                cls.validate_class()
        except BaseException as exc:  # noqa: BLE001 - any import-time failure is a load error, even SystemExit
            if isinstance(exc, KeyboardInterrupt):
                raise
            errors.append(LoadError(source, ref, _error_text(exc)))
            return
        if not classes:
            errors.append(LoadError(source, ref, "no plugin class found (subclass BasePlugin and set `name`)"))
        for cls in classes:
            if cls.name in names:
                other = names[cls.name]
                errors.append(LoadError(source, ref, f"plugin name {cls.name!r} is already provided by "
                                                     f"{other.source} {other.ref}; skipped"))
                continue
            item = Found(cls, source, ref)
            names[cls.name] = item
            found.append(item)

    if builtins:
        for module in BUILTIN_MODULES:
            add("builtin", module, lambda m=module: (importlib.import_module(m),))
    for path in dotted_paths:
        add("setting", path, lambda p=path: (_import_dotted(p),))
    if entry_points:
        try:
            eps = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
        except Exception as exc:  # noqa: BLE001 - broken distribution metadata must not stop discovery
            eps = []
            errors.append(LoadError("entry_point", ENTRY_POINT_GROUP, _error_text(exc)))
        for ep in eps:
            add("entry_point", ep.name, lambda e=ep: (e.load(),))
    for path in local_candidates(plugins_dir):
        add("dir", str(path), lambda p=path: (import_local_file(p),))
    return found, errors


def load_plugin_class(source: str, ref: str, name: str) -> type[BasePlugin]:
    """Import only what one plugin needs (per-plugin workers never import the others)."""
    import importlib.metadata  # lazily: it costs a noticeable part of a worker's start

    if source == "builtin" or source == "setting":
        obj = importlib.import_module(ref) if source == "builtin" else _import_dotted(ref)
    elif source == "entry_point":
        matches = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == ref]
        if not matches:
            raise LookupError(f"entry point {ref!r} is no longer installed")
        obj = matches[0].load()
    elif source == "dir":
        obj = import_local_file(Path(ref))
    else:
        raise LookupError(f"unknown plugin source {source!r}")
    for cls in _plugin_classes(obj):
        if cls.name == name:
            cls.validate_class()
            return cls
    raise LookupError(f"{source} {ref} no longer provides a plugin named {name!r}")


# --- platform-side naming (no imports of plugin code) -------------------------------------------

@dataclass(frozen=True)
class Unit:
    source: str   # builtin | setting | entry_point | dir
    ref: str
    name: str     # chosen by the platform from the location

    def to_dict(self) -> dict:
        return {"source": self.source, "ref": self.ref, "name": self.name}


def setting_name(entry: str) -> tuple[str, str]:
    """'crm=acme.plugins.crm.CrmPlugin' -> ('crm', path); 'acme.plugins.crm.CrmPlugin' -> ('crm', path);
    'acme.plugins.hr' -> ('hr', path). A trailing capitalised component is the class, not the name."""
    name, sep, path = entry.partition("=")
    if sep:
        return name.strip(), path.strip()
    parts = entry.strip().split(".")
    if len(parts) > 1 and parts[-1][:1].isupper():
        parts = parts[:-1]
    return parts[-1], entry.strip()


def entry_points_listed(extra_paths: list[str] | None = None) -> list:
    """The group's entry points, read from distribution metadata only (nothing is imported)."""
    import importlib.metadata

    seen, out = set(), []
    dists = importlib.metadata.distributions(path=list(extra_paths or []) + sys.path) if extra_paths \
        else importlib.metadata.distributions()
    for dist in dists:
        for ep in dist.entry_points:
            if ep.group == ENTRY_POINT_GROUP and ep.name not in seen:
                seen.add(ep.name)
                out.append(ep)
    return out


def candidates(*, plugins_dir: str | None, dotted_paths: list[str], entry_points: bool = True,
               builtins: bool = True, extra_paths: list[str] | None = None) -> tuple[list[Unit], list[LoadError]]:
    """Every plugin location, named by the platform; first one wins on a name clash (built-ins, settings,
    entry points, the directory), the others are reported."""
    units: list[Unit] = []
    errors: list[LoadError] = []
    taken: dict[str, Unit] = {}

    def add(source: str, ref: str, name: str) -> None:
        if not NAME_RE.match(name or ""):
            errors.append(LoadError(source, ref, f"{name!r} is not a valid plugin name ({NAME_RE.pattern}); "
                                                 "plugins are named after their module"))
            return
        if name in taken:
            other = taken[name]
            errors.append(LoadError(source, ref, f"plugin name {name!r} is already provided by "
                                                 f"{other.source} {other.ref}; skipped"))
            return
        unit = Unit(source, ref, name)
        taken[name] = unit
        units.append(unit)

    if builtins:
        for module in BUILTIN_MODULES:
            add("builtin", module, module.rsplit(".", 1)[-1])
    for entry in dotted_paths:
        name, path = setting_name(entry)
        add("setting", path, name)
    if entry_points:
        try:
            for ep in entry_points_listed(extra_paths):
                add("entry_point", ep.name, ep.name)
        except Exception as exc:  # noqa: BLE001 - broken distribution metadata must not stop discovery
            errors.append(LoadError("entry_point", ENTRY_POINT_GROUP, _error_text(exc)))
    for path in local_candidates(plugins_dir):
        add("dir", str(path), path.stem if path.is_file() else path.name)
    return units, errors


def module_root(dotted: str, search: list[str]) -> Path | None:
    """Where the top-level package of a dotted path lives (found without executing it), to bind it
    read-only into the sandbox; None when it is not found (the worker then reports the import error)."""
    from importlib.machinery import PathFinder

    top = dotted.split(".")[0].split(":")[0]
    spec = PathFinder.find_spec(top, search)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        locations = list(spec.submodule_search_locations)
        return Path(locations[0]) if locations else None
    return Path(spec.origin) if spec.origin else None


# --- worker-side description ---------------------------------------------------------------------

def describe_unit(source: str, ref: str, name: str) -> dict:
    """Import one location (inside a sandbox worker) and describe the plugin named `name` there."""
    import importlib.metadata  # lazily: it costs a noticeable part of a worker's start

    out = {"source": source, "ref": ref, "name": name, "plugin": None, "errors": []}
    try:
        if source == "builtin":
            obj = importlib.import_module(ref)
        elif source == "setting":
            obj = _import_dotted(ref)
        elif source == "entry_point":
            matches = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == ref]
            if not matches:
                raise LookupError(f"entry point {ref!r} is not installed")
            obj = matches[0].load()
        elif source == "dir":
            obj = import_local_file(Path(ref))
        else:
            raise LookupError(f"unknown plugin source {source!r}")
        classes = _plugin_classes(obj)
    except BaseException as exc:  # noqa: BLE001 - any import-time failure is a load error, even SystemExit
        if isinstance(exc, KeyboardInterrupt):
            raise
        out["errors"].append(_error_text(exc))
        return out
    mine = [c for c in classes if c.name == name]
    others = sorted(c.name for c in classes if c.name != name)
    if others:
        out["errors"].append(f"declares plugin name(s) {others}; a module provides only the plugin named after "
                             f"its location ({name!r}), so these were ignored")
    if not mine:
        if not classes:
            out["errors"].append("no plugin class found (subclass BasePlugin and set `name`)")
        return out
    try:
        mine[0].validate_class()
    except Exception as exc:  # noqa: BLE001
        out["errors"].append(_error_text(exc))
        return out
    out["plugin"] = mine[0].describe()
    return out
