from __future__ import annotations

import textwrap

from django.core.management.base import CommandError
from django.utils.translation import gettext, gettext_lazy

from apps.core.management.base import Command as ProjectCommand
from apps.core.errors import ApplicationError
from ._process import prepare_process

from ._operator import operator_user
from ._output import table


class Command(ProjectCommand):
    help = gettext_lazy("Search knowledge bases the way users do and print the ranked chunks with each stage's "
                        "scores.")

    def add_arguments(self, parser):
        parser.add_argument("query")
        parser.add_argument("--kb", action="append", help=gettext("Knowledge base slug or id (repeatable; default: all)"))
        parser.add_argument("--mode", default="hybrid", choices=["hybrid", "dense", "bm25"])
        parser.add_argument("--top-k", type=int, default=5)
        parser.add_argument("--user", help=gettext("Search with this user's access (default: everything)"))

    def handle(self, *args, query, kb, mode, top_k, user, **options):
        from apps.knowledge.selectors import chunks_retrieve

        prepare_process("web")
        try:
            results = chunks_retrieve(user=operator_user(user), query=query, knowledge_bases=kb, top_k=top_k, mode=mode)
        except ApplicationError as exc:
            raise CommandError(gettext("%(code)s: %(message)s") % {"code": exc.code, "message": exc.message})
        if not results:
            self.stdout.write(gettext("No results."))
            return
        rows = []
        for rank, r in enumerate(results, start=1):
            where = " > ".join(r.heading_path) + (f" (p. {r.page})" if r.page else "")
            rows.append([rank, f"{r.knowledge_base_slug}/{r.document_title}"[:50], where[:40],
                         _fmt(r.scores.get("dense")), _fmt(r.scores.get("bm25")), _fmt(r.scores.get("fused")),
                         _fmt(r.score), f"v{r.index_version}"])
        self.stdout.write(table(["#", gettext("document"), gettext("where"), gettext("dense"), "bm25", gettext("fused"),
                                 gettext("score"), gettext("index")], rows))
        for rank, r in enumerate(results, start=1):
            self.stdout.write(f"\n[{rank}] {r.url}\n" + textwrap.indent(textwrap.shorten(r.text, 400), "    "))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
