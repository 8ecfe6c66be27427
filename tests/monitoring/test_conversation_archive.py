"""archive_conversations / restore_conversations: old conversations leave the hot database for a gzip
JSON Lines file (filesystem, or a real S3-compatible server) and come back identical: conversations,
messages, citations, plugin results and feedback, ids and timestamps included."""
from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import subprocess

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from apps.conversations.models import Conversation, Feedback, Message
from tests.helpers import free_port, wait_for_port

pytestmark = pytest.mark.django_db

CITATION = {"n": 1, "type": "chunk", "chunk_id": 17, "document_id": 3, "document_title": "Refunds",
            "heading": "Requesting a refund", "snippet": "Refunds are processed within 5 to 7 business days…",
            "url": "/sources/3/?chunk=17"}


def make_conversation(owner, session_id: str, *, age_days: float, turns: int = 2, feedback_by=()):
    conv = Conversation.objects.create(session_id=session_id, owner=owner, title=f"About {session_id} — ünïcode ✓")
    replies = []
    for i in range(turns):
        Message.objects.create(conversation=conv, role="user", content=f"question {i} of {session_id}?",
                               query=f"question {i}")
        replies.append(Message.objects.create(
            conversation=conv, role="assistant", content=f"Answer {i} [1].", citations=[dict(CITATION, n=1)],
            plugin_results=[{"title": "Order 42", "content": "shipped", "data": {"status": "shipped"}, "url": None}],
            generator="extractive", prompt_tokens=120 + i, completion_tokens=30, latency_ms=12.5 + i))
    for voter in feedback_by:
        Feedback.objects.create(message=replies[0], user=voter, rating="down", comment="missing the EU rules")
    stamp = timezone.now() - dt.timedelta(days=age_days)
    Conversation.objects.filter(pk=conv.pk).update(updated_at=stamp, created_at=stamp)
    Message.objects.filter(conversation=conv).update(created_at=stamp)
    return conv


def snapshot(session_ids):
    convs = Conversation.objects.filter(session_id__in=session_ids)
    return {
        "conversations": sorted(convs.values(), key=lambda r: r["id"]),
        "messages": sorted(Message.objects.filter(conversation__in=convs).values(), key=lambda r: r["id"]),
        "feedback": sorted(Feedback.objects.filter(message__conversation__in=convs).values(), key=lambda r: r["id"]),
    }


@pytest.fixture
def archive_root(settings, tmp_path):
    settings.ARCHIVE_ROOT = tmp_path / "archive"
    settings.ARCHIVE_S3_BUCKET = ""
    return settings.ARCHIVE_ROOT


def run(*args) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_round_trip_loses_nothing(archive_root, user, other_user):
    old = [make_conversation(user, "old-a", age_days=120, turns=3, feedback_by=[user, other_user]),
           make_conversation(other_user, "old-b", age_days=91, turns=1)]
    recent = make_conversation(user, "recent", age_days=10, feedback_by=[other_user])
    before = snapshot(["old-a", "old-b"])
    recent_before = snapshot(["recent"])
    assert len(before["messages"]) == 8 and len(before["feedback"]) == 2

    out, err = run("archive_conversations", "--older-than", "90d")
    assert "Archived 2 conversation(s)" in out and "removed 2 from the database" in out
    assert "100%" in err  # the progress bar ran to the end
    assert not Conversation.objects.filter(session_id__in=["old-a", "old-b"]).exists()
    assert not Message.objects.filter(conversation_id__in=[c.pk for c in old]).exists()
    assert Feedback.objects.filter(message__conversation=recent).count() == 1
    assert snapshot(["recent"]) == recent_before

    [archive] = list(archive_root.glob("*.jsonl.gz"))
    with gzip.open(archive, "rt", encoding="utf-8") as fh:
        lines = [json.loads(line) for line in fh]
    assert lines[0]["format"] == "kotaemon-conversations" and lines[0]["count"] == 2
    assert [line["session_id"] for line in lines[1:-1]] == ["old-a", "old-b"]
    assert set(lines[-1]) == {"signature"} and lines[0]["signature"] == "hmac-sha256"
    assert "ünïcode ✓" in lines[1]["objects"][0]["fields"]["title"]

    out, _ = run("restore_conversations", archive.name)
    assert "Restored 2 conversation(s) (12 rows); 0 already present" in out
    assert snapshot(["old-a", "old-b"]) == before  # every field of every row, ids and timestamps included

    out, _ = run("restore_conversations", str(archive))  # a local path works too, and it is idempotent
    assert "Restored 0 conversation(s)" in out and "2 already present" in out
    assert snapshot(["old-a", "old-b"]) == before

    # Ids handed out after the restore do not collide with restored rows.
    conv = Conversation.objects.create(session_id="after-restore", owner=user)
    assert Message.objects.create(conversation=conv, role="user", content="hi").pk > max(
        m["id"] for m in before["messages"])


def test_nothing_old_enough_and_dry_run(archive_root, user):
    make_conversation(user, "fresh", age_days=1)
    make_conversation(user, "stale", age_days=40)
    out, _ = run("archive_conversations", "--older-than", "90d")
    assert "Nothing to archive" in out
    out, _ = run("archive_conversations", "--older-than", "30d", "--dry-run")
    assert "1 conversation(s) would be archived" in out
    assert Conversation.objects.count() == 2 and not archive_root.exists()
    out, _ = run("archive_conversations", "--older-than", "2w")
    assert "Archived 1" in out and list(Conversation.objects.values_list("session_id", flat=True)) == ["fresh"]


def test_a_conversation_changed_meanwhile_is_kept(archive_root, user, other_user):
    from apps.monitoring.archive import _delete_if_unchanged, _record

    conv = make_conversation(user, "busy", age_days=100)
    digest = _record(Conversation.objects.get(pk=conv.pk))["digest"]
    reply = conv.messages.filter(role="assistant").first()
    Feedback.objects.create(message=reply, user=other_user, rating="up")  # lands after the line was written
    assert _delete_if_unchanged(conv.pk, digest) is None
    assert Conversation.objects.filter(pk=conv.pk).exists()
    assert _delete_if_unchanged(conv.pk, _record(Conversation.objects.get(pk=conv.pk))["digest"]) == "busy"
    assert not Conversation.objects.filter(pk=conv.pk).exists()


def test_hot_session_state_expires_by_ttl_and_is_dropped_on_archive(archive_root, user, settings):
    from apps.conversations.services import chat_turn
    from apps.conversations.session_store import get_session_store, session_store_reset

    session_store_reset()
    result = chat_turn(user=user, session_id=None, message="Anything about refunds?")
    store = get_session_store()
    assert store.ttl_seconds == settings.SESSION_STATE_TTL_SECONDS > 0
    assert store.get(result.session_id) is not None
    if hasattr(store, "client"):  # Redis: the key really carries the TTL
        ttl_ms = store.client.pttl(store.key(result.session_id))
        assert 0 < ttl_ms <= settings.SESSION_STATE_TTL_SECONDS * 1000
    Conversation.objects.filter(session_id=result.session_id).update(
        updated_at=timezone.now() - dt.timedelta(days=200))
    run("archive_conversations", "--older-than", "90d")
    store.invalidate_local(result.session_id)
    assert store.get(result.session_id) is None
    session_store_reset()


@pytest.mark.parametrize("age", ["abc", "0d", "90", "-5d", "10y"])
def test_bad_age_is_a_clear_error(archive_root, age):
    with pytest.raises(CommandError, match=r"Give an age like 90d.*\[invalid_age\]"):
        run("archive_conversations", f"--older-than={age}")


def test_restore_refuses_missing_foreign_and_unsafe_files(archive_root, tmp_path):
    with pytest.raises(CommandError, match=r"\[archive_not_found\]"):
        run("restore_conversations", "conversations-nope.jsonl.gz")
    with pytest.raises(CommandError, match=r"\[invalid_archive_name\]"):
        run("restore_conversations", "../elsewhere/secret.jsonl.gz")
    archive_root.mkdir(parents=True)
    with gzip.open(archive_root / "other.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"hello": "world"}) + "\n")
    with pytest.raises(CommandError, match=r"\[archive_unsigned\]"):
        run("restore_conversations", "other.jsonl.gz")
    (archive_root / "plain.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(CommandError, match=r"not a readable gzip.*\[archive_corrupt\]"):
        run("restore_conversations", "plain.jsonl.gz")
    out, _ = run("restore_conversations", "--list")
    assert out.split() == ["other.jsonl.gz", "plain.jsonl.gz"]


def test_restore_reports_conversations_whose_owner_is_gone(archive_root, django_user_model):
    ghost = django_user_model.objects.create_user(username="ghost", password="pw-ghost-123")
    make_conversation(ghost, "ghostly", age_days=100)
    run("archive_conversations", "--older-than", "90d")
    ghost.delete()
    [archive] = list(archive_root.glob("*.jsonl.gz"))
    with pytest.raises(CommandError, match="1 conversation\\(s\\) could not be restored"):
        run("restore_conversations", archive.name)
    assert archive.exists()


@pytest.mark.slow
def test_round_trip_through_a_real_s3_compatible_server(settings, tmp_path, user, other_user):
    """moto's S3 server in a process of its own, reached over HTTP with the real boto3 client."""
    import boto3

    port = free_port()
    server = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={"PATH": __import__("os").environ["PATH"]})
    try:
        wait_for_port(port, timeout=30, proc=server)
        endpoint = f"http://127.0.0.1:{port}"
        settings.ARCHIVE_S3_BUCKET, settings.ARCHIVE_S3_PREFIX = "kotaemon-archive", "conversations/"
        settings.ARCHIVE_S3_ENDPOINT_URL, settings.ARCHIVE_S3_REGION = endpoint, "us-east-1"
        settings.ARCHIVE_S3_ACCESS_KEY_ID, settings.ARCHIVE_S3_SECRET_ACCESS_KEY = "test-key-id", "test-secret-key"
        settings.ARCHIVE_ROOT = tmp_path / "unused"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test-key-id",
                          aws_secret_access_key="test-secret-key")
        s3.create_bucket(Bucket="kotaemon-archive")
        make_conversation(user, "s3-a", age_days=95, turns=2, feedback_by=[other_user])
        before = snapshot(["s3-a"])
        out, _ = run("archive_conversations", "--older-than", "90d")
        assert "to s3://kotaemon-archive/conversations/conversations-" in out
        assert not Conversation.objects.filter(session_id="s3-a").exists()
        [key] = [o["Key"] for o in s3.list_objects_v2(Bucket="kotaemon-archive")["Contents"]]
        assert key.startswith("conversations/") and key.endswith(".jsonl.gz")
        body = gzip.decompress(s3.get_object(Bucket="kotaemon-archive", Key=key)["Body"].read()).decode()
        assert '"session_id": "s3-a"' in body
        name = key.split("/", 1)[1]
        out, _ = run("restore_conversations", "--list")
        assert out.split() == [name]
        run("restore_conversations", name)
        assert snapshot(["s3-a"]) == before
        assert not (tmp_path / "unused").exists()
    finally:
        server.terminate()
        server.wait(timeout=10)
