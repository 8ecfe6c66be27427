"""manage.py plugins list | reload | test NAME "utterance" | evaluate-router [--data FILE] [--json]"""
from __future__ import annotations

import json
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import CommandError
from django.utils.translation import gettext, gettext_lazy

from apps.core.management.base import Command as ProjectCommand
from apps.core.errors import ApplicationError

DEFAULT_DATA = Path(settings.BASE_DIR) / "tests" / "plugins" / "data" / "router_heldout.json"


class Command(ProjectCommand):
    help = gettext_lazy("Plugins: list them (with load errors), reload modules everywhere, test one, evaluate the "
                        "intent router.")

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        listing = sub.add_parser("list", help="Plugins, status, intents and modules that failed to load")
        listing.add_argument("--json", action="store_true")
        sub.add_parser("reload", help="Discover modules again; every instance tears down and sets up its plugins")
        test = sub.add_parser("test", help="Route an utterance to the plugin's intents and run it in the sandbox")
        test.add_argument("name")
        test.add_argument("utterance")
        test.add_argument("--user", help=gettext("username to run as (default: the first active superuser)"))
        ev = sub.add_parser("evaluate-router", help="Accuracy of the intent router on a labelled utterance file")
        ev.add_argument("--data", default=str(DEFAULT_DATA))
        ev.add_argument("--json", action="store_true")

    def handle(self, *args, **opts):
        try:
            getattr(self, "_" + opts["action"].replace("-", "_"))(opts)
        except ApplicationError as exc:
            raise CommandError(gettext("%(code)s: %(message)s") % {"code": exc.code, "message": exc.message}) from None

    def _list(self, opts):
        from apps.plugins.selectors import plugin_list

        listing = plugin_list()
        if opts["json"]:
            self.stdout.write(json.dumps(listing, indent=2))
            return
        self.stdout.write(gettext("plugin config version %(version)s") % {"version": listing['version']})
        for p in listing["plugins"]:
            groups = ", ".join(p["allowed_groups"]) if p["allowed_groups"] is not None else "everyone"
            self.stdout.write(f"{p['name']:<18} {p['status']:<15} v{p['version'] or '?':<8} {p['source']:<12} "
                              f"intents: {', '.join(p['intents']) or '-'}; stages: {', '.join(p['stages']) or '-'}; "
                              f"scopes: {', '.join(p['scopes']) or '-'}; groups: {groups}")
            for problem in p["problems"]:
                self.stdout.write(gettext("    ! %(field)s: %(message)s")
                                  % {"field": problem['field'], "message": problem['message']})
        for error in listing["load_errors"]:
            self.stderr.write(gettext("LOAD ERROR %(source)s %(ref)s: %(error)s")
                              % {"source": error['source'], "ref": error['ref'], "error": error['error']})

    def _reload(self, opts):
        from apps.plugins.services import plugins_reload

        snap = plugins_reload()
        self.stdout.write(gettext("reloaded: plugin config version %(version)s, %(plugins)s plugin(s), %(load_errors)s load "
                                  "error(s); running instances apply it via plugin_config_updated (or within "
                                  "PLUGIN_VERSION_CHECK_SECONDS)")
                          % {"version": snap.version, "plugins": len(snap.plugins), "load_errors": len(snap.load_errors)})
        for error in snap.load_errors:
            self.stderr.write(gettext("LOAD ERROR %(source)s %(ref)s: %(error)s")
                              % {"source": error['source'], "ref": error['ref'], "error": error['error']})

    def _test(self, opts):
        from apps.plugins.services import plugin_test

        users = get_user_model().objects.filter(is_active=True)
        user = users.filter(username=opts["user"]).first() if opts.get("user") else \
            users.filter(is_superuser=True).order_by("pk").first()
        if user is None:
            raise CommandError(gettext("no such active user; pass --user USERNAME"))
        out = plugin_test(name=opts["name"], utterance=opts["utterance"], user=user)
        self.stdout.write(json.dumps(out, indent=2, default=str))
        if out["invocation"] is None:
            self.stderr.write(gettext("the utterance did not route to this plugin's intents (plain RAG would answer)"))
        elif out["invocation"]["outcome"] != "ok":
            raise CommandError(gettext("plugin call failed: %(outcome)s %(error_code)s: %(error_message)s")
                               % {"outcome": out['invocation']['outcome'], "error_code": out['invocation']['error_code'], "error_message": out['invocation']['error_message']})

    def _evaluate_router(self, opts):
        from apps.plugins.selectors import router_evaluation

        path = Path(opts["data"])
        if not path.is_file():
            raise CommandError(gettext("no such file: %(path)s") % {"path": path})
        try:
            labelled = json.loads(path.read_text())
        except ValueError as exc:
            raise CommandError(gettext("%(path)s is not JSON: %(exc)s") % {"path": path, "exc": exc}) from None
        report = router_evaluation(labelled)
        if opts["json"]:
            self.stdout.write(json.dumps(report, indent=2))
            return
        s = report["settings"]
        self.stdout.write(gettext("data: %(path)s (%(total)s utterances); intents: %(intents)s")
                          % {"path": path, "total": report['total'], "intents": ', '.join(report['intents'])})
        self.stdout.write(gettext("settings: threshold %(threshold)s, margin %(margin)s, top_k %(top_k)s, keyword bonus "
                                  "%(keyword_bonus)s")
                          % {"threshold": s['threshold'], "margin": s['margin'], "top_k": s['top_k'], "keyword_bonus": s['keyword_bonus']})
        self.stdout.write(f"accuracy {report['accuracy']:.3f}; in-scope accuracy {report['in_scope_accuracy']:.3f}; "
                          f"none precision {report['none_precision']:.3f}; none recall {report['none_recall']:.3f}")
        near = report["near_duplicates"]
        without = report["accuracy_without_near_duplicates"]
        self.stdout.write(f"near-duplicates of an example (cosine > 0.85): {len(near)}; accuracy without them "
                          f"{without:.3f}" if without is not None else "")
        labels = sorted(report["confusion"])
        predicted = sorted({p for row in report["confusion"].values() for p in row})
        self.stdout.write(gettext("confusion (rows: expected, columns: routed to)"))
        self.stdout.write(" " * 16 + "".join(f"{p[:14]:>15}" for p in predicted))
        for label in labels:
            row = report["confusion"][label]
            self.stdout.write(f"{label[:15]:<16}" + "".join(f"{row.get(p, 0):>15}" for p in predicted))
        for m in report["mistakes"]:
            self.stdout.write(gettext("  miss: %(utterance)r expected %(expected)s, got %(got)s")
                              % {"utterance": m['utterance'], "expected": m['expected'], "got": m['got']})
