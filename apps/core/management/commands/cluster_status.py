import json
import time

from django.core.management.base import CommandError
from django.utils.translation import gettext, gettext_lazy

from apps.core.management.base import Command as ProjectCommand
from apps.core.registry import instances_list

COLUMNS = ("instance", "kind", "host", "port", "pid", "up_s", "ready", "sub", "indexes", "plugins", "last_event",
           "beat_s")


def _indexes(value) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}:v{v}" for k, v in sorted(value.items())) or "-"
    return "-" if value is None else str(value)


def _last_event(value) -> str:
    if not value:
        return "-"
    version = "" if value.get("version") is None else f" v{value['version']}"
    return f"{value.get('type')}{version} {max(0.0, time.time() - float(value.get('received') or 0)):.0f}s ago"


def table_rows(records: list[dict]) -> list[tuple[str, ...]]:
    now = time.time()
    rows = []
    for r in records:
        rows.append((
            str(r.get("id")), str(r.get("kind")), str(r.get("host")), str(r.get("port") or "-"), str(r.get("pid")),
            f"{now - float(r.get('started') or now):.0f}", "yes" if r.get("ready") else "no",
            "yes" if r.get("subscribed") else "no", _indexes(r.get("indexes")),
            "-" if r.get("plugin_config_version") is None else str(r.get("plugin_config_version")),
            _last_event(r.get("last_event")), f"{r.get('age_seconds', 0):.1f}",
        ))
    return rows


def format_table(records: list[dict]) -> str:
    rows = [COLUMNS] + table_rows(records)
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)


class Command(ProjectCommand):
    help = (gettext_lazy("Show the live instances of this cluster (web servers and Celery workers) from their "
                         "heartbeats in Redis: id, host, port, pid, uptime, readiness, event subscription, index "
                         "versions held, plugin config version, last event applied, heartbeat age."))

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help=gettext("Print the records as JSON."))
        parser.add_argument("--wait-ready", type=int, default=0, metavar="N",
                            help=gettext("Wait until at least N web instances are ready (exit 1 after --timeout)."))
        parser.add_argument("--timeout", type=float, default=60.0)

    def handle(self, *args, json: bool, wait_ready: int, timeout: float, **options):
        deadline = time.monotonic() + timeout
        while True:
            try:
                records = instances_list()
            except Exception as exc:
                raise CommandError(gettext("The instance registry could not be read: %(error)s: %(exc)s")
                                   % {"error": exc.__class__.__name__, "exc": exc})
            ready = sum(1 for r in records if r.get("kind") == "web" and r.get("ready"))
            if ready >= wait_ready or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        if json:
            self.stdout.write(_json_dumps(records))
        elif records:
            self.stdout.write(format_table(records))
        else:
            self.stdout.write(gettext("No instance has reported a heartbeat."))
        if wait_ready and ready < wait_ready:
            raise CommandError(f"only {ready} of {wait_ready} web instances ready after {timeout:.0f}s")


def _json_dumps(records) -> str:
    return json.dumps(records, indent=2, default=str)
