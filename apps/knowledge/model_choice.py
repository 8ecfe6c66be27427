"""The automatic embedding model of a knowledge base: chosen by the language of its documents (issue 11).

Measured (docs/benchmarks.md): multilingual-e5-small is not as good as all-MiniLM-L6-v2 on English everywhere
(SciFact subset nDCG@10 0.853 vs 0.874), and MiniLM cannot read Chinese (Debian zh set dense hit@3 0.19 vs
0.58). So a base created without a model (`embedding_model_auto`) gets one by its text:

- **before its first vectors**: ingestion parses a batch, then asks `embedding_model_resolve` with the batch's
  language mix (rag.language) before chunking and encoding; the first batch with enough text decides (under
  the base's row lock, so concurrent workers of one bulk upload all see the first decision) and every later
  document of the base is chunked and embedded with the decided model;
- **later uploads** that make the base clearly Chinese (rag.language.SWITCH_SHARE) switch it once from the
  English model to the multilingual one: a background re-embed and the usual zero-downtime swap. Never back.

An editor's explicit model (admin, REST) turns the automatic choice off and is never overridden.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from django.db import transaction
from django.db.models import Count, F, Sum
from django.utils import timezone

from .embeddings import MODEL_E5, MODEL_MINILM, model_catalog
from .models import Chunk, Document, KnowledgeBase
from .rag.language import MIN_TOKENS, LanguageMix, language_mix, multilingual_needed

logger = logging.getLogger(__name__)

BY_LANGUAGE = "language"
BY_EDITOR = "editor"
BY_SETTING = "setting"

_BACKFILL_BATCH = 200


def knowledge_base_language(*, knowledge_base: KnowledgeBase, exclude_document_ids: Sequence[int] = (),
                            measure: bool = True) -> tuple[LanguageMix, int]:
    """(summed language mix, document count) of the base's live ready documents. With `measure`, documents
    never measured (ingested before the counts existed) are measured from their stored text first; without,
    they count as nothing (under the base's row lock: writing documents there could deadlock with an ingest
    that holds its document's row and waits for the base's)."""
    live = Document.objects.filter(knowledge_base=knowledge_base, deleted_at__isnull=True,
                                   status=Document.Status.READY).exclude(pk__in=list(exclude_document_ids))
    unmeasured = list(live.filter(lang_tokens__isnull=True).values_list("pk", flat=True)) if measure else []
    for start in range(0, len(unmeasured), _BACKFILL_BATCH):
        for pk, text in Document.objects.filter(pk__in=unmeasured[start:start + _BACKFILL_BATCH]).values_list(
                "pk", "text"):
            mix = language_mix(text)
            Document.objects.filter(pk=pk).update(lang_tokens=mix.tokens, lang_cjk_tokens=mix.cjk)
    totals = live.aggregate(tokens=Sum("lang_tokens"), cjk=Sum("lang_cjk_tokens"), documents=Count("pk"))
    return LanguageMix(totals["tokens"] or 0, totals["cjk"] or 0), totals["documents"]


def _wanted(kb: KnowledgeBase, mix: LanguageMix) -> str:
    """The model the base should have with this mix (its current one when the evidence is too thin)."""
    if kb.embedding_model == MODEL_E5 or mix.tokens < MIN_TOKENS:
        return kb.embedding_model  # once multilingual, always multilingual: no flip-flop
    decided_english = kb.embedding_choice.get("by") == BY_LANGUAGE
    return MODEL_E5 if multilingual_needed(mix, embedded_with_english_model=decided_english) else MODEL_MINILM


def embedding_model_resolve(*, knowledge_base_id: int, incoming: Sequence[tuple[int, LanguageMix]] = ()) -> str:
    """The catalog key to chunk and embed the base's next documents with; decides or switches an automatic
    base's model on the way (see the module docstring). `incoming`: (document id, mix) of the documents about
    to be embedded, parsed but not yet stored (a re-ingested document is counted once, as it is now)."""
    kb = KnowledgeBase.objects.get(pk=knowledge_base_id)
    if not kb.embedding_model_auto or kb.embedding_model == MODEL_E5 or MODEL_E5 not in model_catalog():
        return kb.embedding_model
    batch = sum((mix for _, mix in incoming), LanguageMix())
    ids = [doc_id for doc_id, _ in incoming]
    stored, _ = knowledge_base_language(knowledge_base=kb, exclude_document_ids=ids)  # measures what is not yet
    if kb.embedding_choice.get("by") == BY_LANGUAGE and _wanted(kb, stored + batch) == kb.embedding_model:
        return kb.embedding_model  # decided English and staying so: the common case, without the row lock
    with transaction.atomic():
        # Decide under the base's row lock: concurrent ingests of one bulk upload queue here, the first
        # decides, the others read its decision (the lock is a write, so it also serialises SQLite).
        KnowledgeBase.objects.filter(pk=knowledge_base_id).update(last_index_version=F("last_index_version"))
        kb = KnowledgeBase.objects.get(pk=knowledge_base_id)
        if not kb.embedding_model_auto:
            return kb.embedding_model
        stored, documents = knowledge_base_language(knowledge_base=kb, exclude_document_ids=ids, measure=False)
        mix = stored + batch
        wanted = _wanted(kb, mix)
        if wanted == kb.embedding_model and kb.embedding_choice.get("by") == BY_LANGUAGE:
            return wanted
        if mix.tokens < MIN_TOKENS:
            return kb.embedding_model  # not decided yet: the next documents decide
        previous = kb.embedding_model
        choice = {"by": BY_LANGUAGE, "model": wanted, **mix.to_dict(), "documents": documents + len(incoming),
                  "at": timezone.now().isoformat()}
        # Vectors already made with the previous model (earlier documents, or too little text to decide on):
        # a switch, re-embedded in the background. Otherwise the first vectors are made with `wanted`.
        reembed = wanted != previous and Chunk.objects.filter(document__knowledge_base=kb,
                                                              superseded_at__isnull=True).exists()
        if reembed:
            choice["switched_from"] = previous
        kb.embedding_model, kb.embedding_choice = wanted, choice
        kb.save(update_fields=["embedding_model", "embedding_choice", "updated_at"])
        if reembed:
            from .services import knowledge_base_reembed

            knowledge_base_reembed(knowledge_base=kb)  # after commit: a background full build, then the swap
        logger.info("embedding model chosen by language", extra={
            "knowledge_base": kb.pk, "model": wanted, "previous": previous, "reembed": reembed,
            "cjk_share": choice["cjk_share"], "text_size": mix.tokens, "documents": choice["documents"]})
    return wanted


def embedding_choice_reason(knowledge_base: KnowledgeBase) -> str:
    """Why the base has its model, in the user's language (admin, REST `embedding_model_reason`)."""
    from django.utils.translation import gettext

    from .rag.language import SWITCH_SHARE

    kb, choice = knowledge_base, knowledge_base.embedding_choice or {}
    by = choice.get("by")
    if kb.embedding_model_auto and by != BY_LANGUAGE:
        return gettext("Automatic: not decided yet. The language of the first documents decides before they "
                       "are embedded (%(model)s until then).") % {"model": kb.embedding_model}
    if by == BY_LANGUAGE:
        values = {"share": f"{choice.get('cjk_share', 0):.0%}", "documents": choice.get("documents", 0),
                  "model": choice.get("model", kb.embedding_model), "previous": choice.get("switched_from", ""),
                  "switch": f"{SWITCH_SHARE:.0%}"}
        if choice.get("switched_from"):
            return gettext("Automatic: switched from %(previous)s to %(model)s (re-embedded in the background) when "
                           "%(share)s of the text of %(documents)s document(s) was Chinese, Japanese or Korean."
                           ) % values
        if choice.get("model") == MODEL_E5:
            return gettext("Automatic: %(share)s of the text of the first %(documents)s document(s) is Chinese, "
                           "Japanese or Korean, so the multilingual model.") % values
        return gettext("Automatic: %(share)s of the text of the first %(documents)s document(s) is Chinese, Japanese "
                       "or Korean, so the English model; it switches to the multilingual one once at least "
                       "%(switch)s of the base's text is.") % values
    if by == BY_EDITOR:
        return gettext("Chosen by an editor.")
    if by == BY_SETTING:
        return gettext("Set by EMBEDDING_DEFAULT_MODEL when the base was created.")
    return gettext("Chosen by an editor or before the automatic choice existed.")


def embedding_model_auto_enabled(*, knowledge_base: KnowledgeBase) -> None:
    """An editor turned the automatic choice (back) on: after commit, the documents already there decide (a
    switch to the multilingual model re-embeds in the background)."""
    kb_id = knowledge_base.pk
    transaction.on_commit(lambda: embedding_model_resolve(knowledge_base_id=kb_id))
