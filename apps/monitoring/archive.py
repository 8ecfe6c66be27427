"""Conversation archiving: old conversations leave the hot database for compressed JSON Lines files,
and come back with `conversations_restore`.

File format (gzip, one JSON object per line):
  line 1: {"format": "kotaemon-conversations", "version": 2, "created_at", "cutoff", "instance", "count",
           "signature": "hmac-sha256", "key_id"}
  then one line per conversation: {"session_id", "digest", "objects": [...], "relinks": [...]}
  last line: {"signature": hex}: HMAC-SHA256 with ARCHIVE_SIGNING_KEY of every line before it (bytes)

Restore trusts nothing it has not verified: the whole file's signature is checked before anything is
written, and even then only conversation rows (conversations, their messages and feedback) are written,
each new (an existing id is never overwritten) and belonging to the conversation of its line. A file
crafted to create a user, a superuser or any other row fails before the first write.
`objects` are Django's serialized rows (model, pk, fields) of the conversation and of everything whose
deletion cascades from it (messages, feedback, and whatever other apps hang on them), parents first;
`relinks` are rows outside the conversation that pointed at it with SET_NULL, re-pointed on restore.

Nothing is lost: the file is written, read back and checked, and stored (filesystem or S3) before any
row is deleted; each conversation is then deleted only if, under a row lock, it still serializes to
exactly what was archived (a conversation touched meanwhile stays hot for the next run).
"""
from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

from django.apps import apps
from django.conf import settings
from django.contrib.admin.utils import NestedObjects
from django.core import serializers
from django.core.management.color import no_style
from django.core.serializers.json import DjangoJSONEncoder
from django.utils.duration import duration_iso_string
from django.db import DEFAULT_DB_ALIAS, connection, models, transaction
from django.utils import timezone
from django.utils.translation import gettext

from apps.core.errors import ApplicationError

logger = logging.getLogger(__name__)

FORMAT = "kotaemon-conversations"
VERSION = 2
# The only models a restore writes (app_label.model_name).
RESTORABLE_MODELS = frozenset({"conversations.conversation", "conversations.message", "conversations.feedback"})
_AGE_RE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$", re.I)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
Progress = Callable[[int], None]


class _LosslessEncoder(DjangoJSONEncoder):
    """DjangoJSONEncoder cuts datetimes to milliseconds; an archive must give back what it took."""

    def default(self, o):
        if isinstance(o, (dt.datetime, dt.time)):
            return o.isoformat()
        if isinstance(o, dt.timedelta):
            return duration_iso_string(o)
        return super().default(o)


def parse_age(text: str) -> dt.timedelta:
    """'90d', '12h', '2w', '30m', '45s' -> timedelta. Zero or malformed ages are refused."""
    match = _AGE_RE.match(str(text or ""))
    if not match or int(match.group(1)) <= 0:
        raise ApplicationError("invalid_age", gettext("Give an age like 90d, 12h, 2w, 30m or 45s (a positive number and "
                               "a unit)."), details={"value": str(text)[:40]})
    return dt.timedelta(**{_UNITS[match.group(2).lower()]: int(match.group(1))})


# --- signing ----------------------------------------------------------------------------------

def _signing_key() -> bytes:
    key = getattr(settings, "ARCHIVE_SIGNING_KEY", "")
    if not key:
        raise ApplicationError("archive_signing_key_missing",
                               gettext("Set ARCHIVE_SIGNING_KEY (a long random value, kept apart from SECRET_KEY) to write or "
                                       "restore conversation archives."))
    return key.encode("utf-8")


def signing_key_id() -> str:
    """A short, public fingerprint of the signing key: tells which key an archive needs, reveals nothing."""
    return hashlib.sha256(b"kotaemon-archive-key-id:" + _signing_key()).hexdigest()[:12]


def _signer():
    import hmac

    return hmac.new(_signing_key(), digestmod=hashlib.sha256)


def _verify_signature(handle: IO[bytes]) -> None:
    """Check the trailer signature over every line before it; raises archive_signature_invalid. Streams."""
    import hmac

    signer = _signer()
    previous: str | None = None
    try:
        with gzip.open(handle, "rt", encoding="utf-8", newline="") as text:
            for line in text:
                if previous is not None:
                    signer.update(previous.encode("utf-8"))
                previous = line
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ApplicationError("archive_corrupt", gettext("The archive is not a readable gzip JSON Lines file.")) from exc
    try:
        trailer = json.loads(previous or "")
    except ValueError:
        trailer = None
    if not isinstance(trailer, dict) or set(trailer) != {"signature"} or not isinstance(trailer["signature"], str):
        raise ApplicationError("archive_unsigned", gettext("The archive carries no signature; only archives written by archive_conversations with "
                                                           "this ARCHIVE_SIGNING_KEY can be restored."))
    if not hmac.compare_digest(signer.hexdigest(), trailer["signature"]):
        raise ApplicationError("archive_signature_invalid", gettext("The archive's signature does not match: it was altered, or signed with another "
                                                                    "ARCHIVE_SIGNING_KEY. Nothing was restored."))


# --- storage ----------------------------------------------------------------------------------

class ArchiveStorage:
    location: str

    def save(self, name: str, local_path: Path) -> str: ...
    def open(self, name: str) -> IO[bytes]: ...
    def size(self, name: str) -> int: ...
    def names(self) -> list[str]: ...


class FileArchiveStorage(ArchiveStorage):
    def __init__(self, root: Path):
        self.root = Path(root)
        self.location = str(self.root)

    def _path(self, name: str) -> Path:
        return self.root / _checked_name(name)

    def save(self, name: str, local_path: Path) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        target = self._path(name)
        if target.exists():
            raise ApplicationError("archive_exists", gettext("An archive named %(name)s already exists.")
                                                     % {"name": name})
        # Copy under a temporary name then rename: a crash never leaves a half file under the real name.
        partial = target.with_name(target.name + ".partial")
        with open(local_path, "rb") as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        partial.replace(target)
        return str(target)

    def open(self, name: str) -> IO[bytes]:
        path = self._path(name)
        if not path.is_file():
            raise ApplicationError("archive_not_found", gettext("No archive file %(name)s.")
                                                        % {"name": name}, status=404)
        return open(path, "rb")

    def size(self, name: str) -> int:
        return self._path(name).stat().st_size

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.glob("*.jsonl.gz")) if self.root.is_dir() else []


class S3ArchiveStorage(ArchiveStorage):
    """Any S3-compatible store (AWS, MinIO, Ceph...), configured by the ARCHIVE_S3_* settings."""

    def __init__(self, *, bucket: str, prefix: str = "", endpoint_url: str = "", region: str = "us-east-1",
                 access_key_id: str = "", secret_access_key: str = ""):
        import boto3

        self.bucket, self.prefix = bucket, prefix
        self.location = f"s3://{bucket}/{prefix}"
        credentials = {"aws_access_key_id": access_key_id, "aws_secret_access_key": secret_access_key} \
            if access_key_id else {}
        self.client = boto3.client("s3", endpoint_url=endpoint_url or None, region_name=region, **credentials)

    def _key(self, name: str) -> str:
        return f"{self.prefix}{_checked_name(name)}"

    def save(self, name: str, local_path: Path) -> str:
        from botocore.exceptions import ClientError

        key = self._key(name)
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            raise ApplicationError("archive_exists", gettext("An archive named %(name)s already exists.")
                                                     % {"name": name})
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise
        self.client.upload_file(str(local_path), self.bucket, key,
                                ExtraArgs={"ContentType": "application/gzip", "ContentEncoding": "identity"})
        return f"s3://{self.bucket}/{key}"

    def open(self, name: str) -> IO[bytes]:
        from botocore.exceptions import ClientError

        key = name[len(f"s3://{self.bucket}/"):] if name.startswith("s3://") else self._key(name)
        buffer = tempfile.TemporaryFile()
        try:
            self.client.download_fileobj(self.bucket, key, buffer)
        except ClientError as exc:
            buffer.close()
            raise ApplicationError("archive_not_found", gettext("No archive %(name)s in %(location)s.")
                                                        % {"name": name, "location": self.location}, status=404) from exc
        buffer.seek(0)
        return buffer

    def size(self, name: str) -> int:
        return int(self.client.head_object(Bucket=self.bucket, Key=self._key(name))["ContentLength"])

    def names(self) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        return sorted(obj["Key"][len(self.prefix):] for page in pages for obj in page.get("Contents", [])
                      if obj["Key"].endswith(".jsonl.gz"))


def _checked_name(name: str) -> str:
    base = str(name)
    if "/" in base or "\\" in base or not _SAFE_NAME_RE.match(base):
        raise ApplicationError("invalid_archive_name", gettext("Archive names are plain file names (letters, digits, . _ -)."),
                               details={"name": str(name)[:100]})
    return base


def archive_storage() -> ArchiveStorage:
    if getattr(settings, "ARCHIVE_S3_BUCKET", ""):
        return S3ArchiveStorage(
            bucket=settings.ARCHIVE_S3_BUCKET, prefix=settings.ARCHIVE_S3_PREFIX,
            endpoint_url=settings.ARCHIVE_S3_ENDPOINT_URL, region=settings.ARCHIVE_S3_REGION,
            access_key_id=settings.ARCHIVE_S3_ACCESS_KEY_ID, secret_access_key=settings.ARCHIVE_S3_SECRET_ACCESS_KEY,
        )
    return FileArchiveStorage(settings.ARCHIVE_ROOT)


# --- serialization ----------------------------------------------------------------------------

def _conversation_model():
    try:
        return apps.get_model("conversations", "Conversation")
    except LookupError as exc:
        raise ApplicationError("conversations_not_installed", gettext("The conversations app is not installed.")) from exc


def _collect(conversation) -> tuple[list[Any], list[dict[str, Any]]]:
    """The conversation and every row its deletion would remove (parents first), and SET_NULL links."""
    collector = NestedObjects(using=DEFAULT_DB_ALIAS)
    collector.collect([conversation])
    ordered: list[Any] = []
    for model in _parents_first(list(collector.data)):
        ordered.extend(sorted(collector.data[model], key=lambda obj: obj.pk))
    relinks = []
    for (field_obj, value), instance_lists in collector.field_updates.items():
        if value is not None:
            continue
        for instances in instance_lists:
            for obj in instances:
                target = getattr(obj, field_obj.attname)
                relinks.append({"model": obj._meta.label_lower, "pk": obj.pk, "field": field_obj.attname,
                                "value": target})
    return ordered, relinks


def _parents_first(models: list[type]) -> list[type]:
    """Order models so that each comes after the models its foreign keys point to (insert order)."""
    remaining, ordered = list(models), []
    while remaining:
        for model in remaining:
            parents = {f.related_model for f in model._meta.concrete_fields if f.is_relation and f.related_model}
            if not (parents & set(remaining)) - {model}:
                ordered.append(model)
                remaining.remove(model)
                break
        else:  # a cycle: keep the collector's order for the rest (nullable links are relinked anyway)
            ordered.extend(remaining)
            break
    return ordered


def _record(conversation) -> dict[str, Any]:
    objects, relinks = _collect(conversation)
    serialized = json.loads(json.dumps(serializers.serialize("python", objects), cls=_LosslessEncoder))
    canonical = json.dumps({"objects": serialized, "relinks": relinks}, sort_keys=True, cls=_LosslessEncoder)
    return {"session_id": conversation.session_id, "pk": conversation.pk,
            "digest": hashlib.sha256(canonical.encode()).hexdigest(), "objects": serialized, "relinks": relinks}


def _read_lines(handle: IO[bytes]) -> Iterator[dict[str, Any]]:
    number = 0
    try:
        with gzip.open(handle, "rt", encoding="utf-8") as text:
            for number, line in enumerate(text, 1):
                if line.strip():
                    yield json.loads(line)
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as exc:  # BadGzipFile is an OSError
        raise ApplicationError("archive_corrupt", gettext("The archive is not a readable gzip JSON Lines file "
                                                           "(line %(line)s: %(error)s).")
                                                  % {"line": number + 1, "error": exc.__class__.__name__}) from exc


@dataclass
class ArchiveResult:
    name: str | None
    location: str | None
    archived: int = 0
    deleted: int = 0
    kept_changed: list[str] = field(default_factory=list)
    candidates: int = 0
    objects: int = 0
    bytes: int = 0


def conversations_to_archive(*, older_than: dt.timedelta):
    """Conversations whose last activity is older than `older_than` (oldest first)."""
    Conversation = _conversation_model()
    cutoff = timezone.now() - older_than
    return Conversation.objects.filter(updated_at__lt=cutoff).order_by("updated_at", "pk"), cutoff


def conversations_archive(*, older_than: dt.timedelta, dry_run: bool = False, batch_size: int = 200,
                          progress: Progress | None = None, on_total: Callable[[int], None] | None = None,
                          storage: ArchiveStorage | None = None) -> ArchiveResult:
    """Move conversations idle for longer than `older_than` to one archive file, then out of the database."""
    queryset, cutoff = conversations_to_archive(older_than=older_than)
    ids = list(queryset.values_list("pk", flat=True))
    if on_total:
        on_total(len(ids))
    result = ArchiveResult(name=None, location=None, candidates=len(ids))
    if dry_run or not ids:
        return result
    storage = storage or archive_storage()
    Conversation = _conversation_model()
    signer = _signer()  # before any work: without a key nothing is archived
    name = f"conversations-{timezone.now():%Y%m%dT%H%M%S%f}-before-{cutoff:%Y%m%d}.jsonl.gz"
    digests: dict[int, str] = {}
    with tempfile.TemporaryDirectory(prefix="kotaemon-archive-") as tmp:
        local = Path(tmp) / name
        with gzip.open(local, "wt", encoding="utf-8", compresslevel=6, newline="") as out:
            def write(line: str) -> None:
                signer.update(line.encode("utf-8"))
                out.write(line)

            write(json.dumps({"format": FORMAT, "version": VERSION, "created_at": timezone.now().isoformat(),
                              "cutoff": cutoff.isoformat(), "instance": settings.INSTANCE_ID,
                              "count": len(ids), "signature": "hmac-sha256", "key_id": signing_key_id()}) + "\n")
            for start in range(0, len(ids), batch_size):
                for conversation in Conversation.objects.filter(pk__in=ids[start:start + batch_size]).order_by("pk"):
                    record = _record(conversation)
                    digests[conversation.pk] = record["digest"]
                    result.objects += len(record["objects"])
                    write(json.dumps(record, cls=_LosslessEncoder, ensure_ascii=False) + "\n")
            out.write(json.dumps({"signature": signer.hexdigest()}) + "\n")
        _verify(local, digests)
        result.bytes = local.stat().st_size
        result.location = storage.save(name, local)
        result.name = name
    if storage.size(name) != result.bytes:
        raise ApplicationError("archive_store_failed", gettext("The stored archive %(name)s does not have the size written; "
                                                                "nothing was deleted.")
                                                       % {"name": name})
    result.archived = len(digests)
    logger.info("conversations archived", extra={"archive": result.location, "conversations": result.archived,
                                                   "bytes": result.bytes})
    for pk, digest in digests.items():
        session_id = _delete_if_unchanged(pk, digest)
        if session_id is None:
            result.kept_changed.append(str(pk))
        else:
            result.deleted += 1
            _drop_hot_state(session_id)
        if progress:
            progress(1)
    return result


def _verify(local: Path, digests: dict[int, str]) -> None:
    """Read the file back: every conversation written must be there, whole, with its digest."""
    seen: dict[int, str] = {}
    with open(local, "rb") as handle:
        _verify_signature(handle)
        handle.seek(0)
        lines = _read_lines(handle)
        header = next(lines, None)
        if not header or header.get("format") != FORMAT:
            raise ApplicationError("archive_verify_failed", gettext("The archive written has no valid header; nothing was deleted."))
        for line in lines:
            if "session_id" not in line:  # the signature trailer
                continue
            canonical = json.dumps({"objects": line["objects"], "relinks": line["relinks"]}, sort_keys=True,
                                   cls=_LosslessEncoder)
            if hashlib.sha256(canonical.encode()).hexdigest() != line["digest"]:
                raise ApplicationError("archive_verify_failed", gettext("A line of the archive does not match its digest."))
            seen[int(line["pk"])] = line["digest"]
    if seen != digests:
        raise ApplicationError("archive_verify_failed", gettext("The archive read back differs from what was written; "
                               "nothing was deleted."))


def _delete_if_unchanged(pk: int, digest: str) -> str | None:
    """Delete one archived conversation if it still is exactly what was archived; its session id, else None."""
    Conversation = _conversation_model()
    with transaction.atomic():
        conversation = Conversation.objects.select_for_update().filter(pk=pk).first()
        if conversation is None:
            return None
        # Lock the messages too: feedback arriving now waits instead of slipping between check and delete.
        related = [rel for rel in Conversation._meta.related_objects if rel.on_delete.__name__ == "CASCADE"]
        for rel in related:
            list(rel.related_model._base_manager.select_for_update().filter(**{rel.field.name: conversation})
                 .values_list("pk", flat=True))
        if _record(conversation)["digest"] != digest:
            logger.info("conversation changed while archiving; kept", extra={"conversation_id": pk})
            return None
        session_id = conversation.session_id
        conversation.delete()
    return session_id


def _drop_hot_state(session_id: str) -> None:
    try:
        from apps.conversations.session_store import get_session_store
    except ImportError:
        return
    try:
        get_session_store().delete(session_id)
    except Exception:  # the state expires by its TTL anyway
        logger.warning("could not drop the hot session state of an archived conversation",
                       extra={"session_id": session_id})


@dataclass
class RestoreResult:
    restored: int = 0
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    objects: int = 0
    total: int = 0


def _checked_header(header: Any, name: str) -> dict[str, Any]:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ApplicationError("archive_corrupt", gettext("%(name)s is not a conversation archive.") % {"name": name})
    version = header.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise ApplicationError("archive_version_unsupported",
                               gettext("%(name)s was written by a newer version (format %(version)s).")
                               % {"name": name, "version": header.get('version')})
    if version < 2:
        raise ApplicationError("archive_unsigned", gettext("%(name)s is an unsigned (format 1) archive; restore accepts only signed archives.")
                                                   % {"name": name})
    return header


def archive_header(*, name: str, storage: ArchiveStorage | None = None) -> dict[str, Any]:
    storage = storage or archive_storage()
    with storage.open(name) as handle:
        header = next(_read_lines(handle), None)
    return _checked_header(header, name)


def _restorable(line: dict[str, Any]) -> list[Any]:
    """The line's rows as unsaved model instances, or ApplicationError: only conversation models, only new
    ids, only rows of this line's one conversation. Runs before anything of the line is written."""
    objects = line.get("objects")
    if not isinstance(objects, list) or not objects:
        raise ApplicationError("archive_invalid_line", gettext("A line holds no rows."))
    labels = {str(obj.get("model", "")).lower() if isinstance(obj, dict) else "" for obj in objects}
    foreign = sorted(labels - RESTORABLE_MODELS)
    if foreign:
        raise ApplicationError("archive_forbidden_model", gettext("The archive line holds rows that a conversation archive never contains."), details={"models": foreign})
    rows = [item.object for item in serializers.deserialize("python", objects)]
    conversations = [r for r in rows if r._meta.label_lower == "conversations.conversation"]
    if len(conversations) != 1 or conversations[0].session_id != line.get("session_id"):
        raise ApplicationError("archive_invalid_line", gettext("A line holds exactly its one conversation."))
    conversation = conversations[0]
    message_ids = {r.pk for r in rows if r._meta.label_lower == "conversations.message"}
    for row in rows:
        label = row._meta.label_lower
        if label == "conversations.message" and row.conversation_id != conversation.pk:
            raise ApplicationError("archive_invalid_line", gettext("A message belongs to another conversation."))
        if label == "conversations.feedback" and row.message_id not in message_ids:
            raise ApplicationError("archive_invalid_line", gettext("Feedback belongs to another conversation."))
        if row.pk is None or type(row)._base_manager.filter(pk=row.pk).exists():
            raise ApplicationError("archive_id_taken", gettext("A row of the archive would overwrite an existing row."),
                                   details={"model": label, "pk": row.pk})
    return rows


def conversations_restore(*, name: str, progress: Progress | None = None,
                          on_total: Callable[[int], None] | None = None,
                          storage: ArchiveStorage | None = None) -> RestoreResult:
    """Put the conversations of archive `name` back. Idempotent: ones already present are skipped."""
    storage = storage or archive_storage()
    Conversation = _conversation_model()
    touched: set[type] = set()
    with storage.open(name) as handle:
        _verify_signature(handle)  # the whole file, before the first write
        handle.seek(0)
        lines = _read_lines(handle)
        header = _checked_header(next(lines, None), name)
        result = RestoreResult(total=int(header.get("count", 0)))
        if on_total:
            on_total(result.total)
        for line in lines:
            if "session_id" not in line:  # the signature trailer
                continue
            session_id = line["session_id"]
            if Conversation.objects.filter(session_id=session_id).exists():
                result.skipped.append(session_id)
            else:
                try:
                    with transaction.atomic():
                        tables = set()
                        rows = _restorable(line)
                        for row in rows:
                            models.Model.save_base(row, raw=True, force_insert=True)
                            touched.add(type(row))
                            tables.add(row._meta.db_table)
                        _relink(line.get("relinks") or [], {(r._meta.label_lower, r.pk) for r in rows})
                        # Foreign keys are checked at commit by default; check now, so a conversation whose
                        # owner is gone fails alone instead of failing the whole restore later.
                        connection.check_constraints(table_names=sorted(tables))
                    result.restored += 1
                    result.objects += len(line["objects"])
                except Exception as exc:  # e.g. the owner was deleted since: report it, restore the rest
                    result.failed[session_id] = f"{exc.__class__.__name__}: {exc}"[:300]
            if progress:
                progress(1)
    _reset_sequences(touched)
    return result


def _relink(relinks: Iterable[dict[str, Any]], restored: set[tuple[str, Any]]) -> None:
    """Re-point SET_NULL links at the restored rows, and only that: the field must be a foreign key to a
    restorable model, still null, and the value one of the rows just restored."""
    for link in relinks:
        try:
            model = apps.get_model(link["model"])
            field_obj = model._meta.get_field(str(link["field"]).removesuffix("_id"))
        except Exception:  # unknown model or field: nothing of ours to re-point
            continue
        target = getattr(field_obj, "related_model", None)
        if target is None or target._meta.label_lower not in RESTORABLE_MODELS or \
                (target._meta.label_lower, link.get("value")) not in restored:
            continue
        model._base_manager.filter(pk=link["pk"], **{f"{field_obj.attname}__isnull": True}).update(
            **{field_obj.attname: link["value"]})


def _reset_sequences(models: set[type]) -> None:
    """Rows came back with their old ids; make sure the id sequences stay ahead of them."""
    if not models:
        return
    statements = connection.ops.sequence_reset_sql(no_style(), list(models))
    if statements:
        with connection.cursor() as cursor:
            for sql in statements:
                cursor.execute(sql)
