from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.utils.translation import gettext, gettext_lazy

from ._process import prepare_process

from ._output import progress, table


class Command(BaseCommand):
    help = gettext_lazy("Write a new index version from stored embeddings and activate it (nothing is re-encoded).")

    def add_arguments(self, parser):
        group = parser.add_mutually_exclusive_group(required=True)
        group.add_argument("--kb", action="append", help=gettext("Knowledge base slug (repeatable)"))
        group.add_argument("--all", action="store_true", help=gettext("Every knowledge base"))
        parser.add_argument("--if-changed", action="store_true",
                            help=gettext("Skip knowledge bases whose active index already covers their content"))
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args, kb, all, if_changed, no_progress, **options):
        from apps.knowledge.models import KnowledgeBase
        from apps.knowledge.services import index_rebuild

        prepare_process("worker")
        if all:
            kbs = list(KnowledgeBase.objects.order_by("slug"))
        else:
            kbs = list(KnowledgeBase.objects.filter(slug__in=kb).order_by("slug"))
            unknown = set(kb) - {k.slug for k in kbs}
            if unknown:
                raise CommandError(gettext("No knowledge base %(slugs)s.") % {"slugs": ', '.join(sorted(unknown))})
        rows = []
        bar = progress(len(kbs), "rebuilding", unit="kb", disable=no_progress)
        for knowledge_base in kbs:
            result = index_rebuild(knowledge_base_id=knowledge_base.pk, force=not if_changed)
            rows.append([knowledge_base.slug, result.status, f"v{result.version}" if result.version else "-",
                         result.document_count, result.chunk_count, result.encoded, f"{result.seconds:.2f}"])
            bar.update(1)
        bar.close()
        self.stdout.write(table(["knowledge base", "status", "version", "documents", "chunks", "encoded", "seconds"],
                                rows))
