"""Issue 10 finding 8: `restore_conversations` deserialised any model in the archive file (a crafted archive
created a superuser) and archives were not signed. Now archives are signed with ARCHIVE_SIGNING_KEY, the
whole file is verified before the first write, and only conversation rows are ever written."""
from __future__ import annotations

import gzip
import hashlib
import hmac
import json

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError

from apps.conversations.models import Conversation, Message
from tests.monitoring.test_conversation_archive import make_conversation, run

pytestmark = pytest.mark.django_db

KEY = "test-archive-signing-key-" + "s" * 40
SUPERUSER_ROW = {"model": "auth.user", "pk": 4242, "fields": {
    "password": "md5$x$0b1f8c4a5d", "last_login": None, "is_superuser": True, "username": "mallory",
    "first_name": "", "last_name": "", "email": "m@example.com", "is_staff": True, "is_active": True,
    "date_joined": "2024-01-01T00:00:00+00:00", "groups": [], "user_permissions": []}}


@pytest.fixture
def archive_root(settings, tmp_path):
    settings.ARCHIVE_ROOT = tmp_path / "archive"
    settings.ARCHIVE_S3_BUCKET = ""
    settings.ARCHIVE_SIGNING_KEY = KEY
    return settings.ARCHIVE_ROOT


def read_lines(path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
        return list(fh)


def write_archive(path, lines: list[str], *, key: str | None = KEY) -> None:
    """Write `lines` (JSON strings with newlines) and, when `key` is given, a trailer signed with it."""
    body = "".join(lines)
    with gzip.open(path, "wt", encoding="utf-8", newline="") as fh:
        fh.write(body)
        if key is not None:
            fh.write(json.dumps({"signature": hmac.new(key.encode(), body.encode(), hashlib.sha256).hexdigest()}) + "\n")


def header(count: int) -> str:
    return json.dumps({"format": "kotaemon-conversations", "version": 2, "count": count,
                       "signature": "hmac-sha256", "key_id": "x"}) + "\n"


def crafted_line(owner_id: int) -> str:
    """A conversation line that also carries a superuser row (the reported attack)."""
    return json.dumps({"session_id": "evil", "pk": 9001, "digest": "0", "relinks": [], "objects": [
        SUPERUSER_ROW,
        {"model": "conversations.conversation", "pk": 9001, "fields": {
            "session_id": "evil", "owner": owner_id, "title": "", "archived": False,
            "created_at": "2024-01-01T00:00:00+00:00", "updated_at": "2024-01-01T00:00:00+00:00"}}]}) + "\n"


def no_mallory() -> bool:
    return not get_user_model().objects.filter(username="mallory").exists()


def test_unsigned_crafted_archive_is_refused_before_any_write(archive_root, user):
    archive_root.mkdir(parents=True)
    write_archive(archive_root / "evil.jsonl.gz", [header(1), crafted_line(user.pk)], key=None)
    with pytest.raises(CommandError, match=r"\[archive_unsigned\]"):
        run("restore_conversations", "evil.jsonl.gz")
    assert no_mallory() and not Conversation.objects.filter(session_id="evil").exists()


def test_archive_signed_with_another_key_is_refused(archive_root, user):
    archive_root.mkdir(parents=True)
    write_archive(archive_root / "evil.jsonl.gz", [header(1), crafted_line(user.pk)], key="guessed-key")
    with pytest.raises(CommandError, match=r"\[archive_signature_invalid\]"):
        run("restore_conversations", "evil.jsonl.gz")
    assert no_mallory()


def test_even_a_validly_signed_archive_writes_only_conversation_rows(archive_root, user):
    """Defence in depth: whoever holds the key still cannot create users through a restore."""
    make_conversation(user, "legit", age_days=100)
    run("archive_conversations", "--older-than", "90d")
    [archive] = list(archive_root.glob("*.jsonl.gz"))
    lines = read_lines(archive)[:-1]  # drop the trailer, add the crafted line, re-sign with the real key
    lines[0] = header(2)
    write_archive(archive, lines + [crafted_line(user.pk)])
    with pytest.raises(CommandError, match="1 conversation\\(s\\) could not be restored"):
        run("restore_conversations", archive.name)
    assert no_mallory()
    assert Conversation.objects.filter(session_id="legit").exists()  # the honest line came back
    assert not Conversation.objects.filter(session_id="evil").exists()


def test_tampered_archive_is_refused_and_rows_are_never_overwritten(archive_root, user, other_user):
    make_conversation(user, "tamper", age_days=100)
    run("archive_conversations", "--older-than", "90d")
    [archive] = list(archive_root.glob("*.jsonl.gz"))
    lines = read_lines(archive)
    tampered = [line.replace("question 0 of tamper?", "question 0 of tamper, edited?") for line in lines]
    write_archive(archive, tampered[:-1], key=None)
    with open(archive, "ab") as fh:  # keep the original signature: it no longer matches
        fh.write(gzip.compress(lines[-1].encode()))
    with pytest.raises(CommandError, match=r"\[archive_signature_invalid\]"):
        run("restore_conversations", archive.name)
    assert not Conversation.objects.filter(session_id="tamper").exists()

    # A signed line whose message id is taken by a live row would overwrite it: refused.
    record = json.loads(lines[1])
    live = Message.objects.create(conversation=make_conversation(other_user, "live", age_days=1), role="user",
                                  content="live row")
    for obj in record["objects"]:
        if obj["model"] == "conversations.message":
            obj["pk"] = live.pk
            break
    write_archive(archive, [lines[0], json.dumps(record) + "\n"])
    with pytest.raises(CommandError, match="could not be restored"):
        run("restore_conversations", archive.name)
    assert Message.objects.get(pk=live.pk).content == "live row"


def test_without_a_signing_key_nothing_is_archived_or_restored(archive_root, settings, user):
    settings.ARCHIVE_SIGNING_KEY = ""
    make_conversation(user, "keyless", age_days=100)
    with pytest.raises(CommandError, match=r"\[archive_signing_key_missing\]"):
        run("archive_conversations", "--older-than", "90d")
    assert Conversation.objects.filter(session_id="keyless").exists()
