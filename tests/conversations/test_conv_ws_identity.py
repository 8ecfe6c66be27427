"""Issue 10 findings 4 and 7: websocket Origin rules and the per-turn identity re-check.

4: an API-key client without an Origin header (the `websockets` package's default) was refused with 403.
7: an open socket kept the identity it had at connect: a revoked key, a deactivated user or a removed
group still chatted until reconnect.
"""
from __future__ import annotations

import asyncio
import json

import pytest
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import Group

from apps.core.services import api_key_create, api_key_revoke
from tests.conversations.conv_support import build_knowledge_base

pytestmark = pytest.mark.django_db(transaction=True)


def application():
    from kotaemon_site.asgi import application

    return application


async def open_socket(path, headers):
    comm = WebsocketCommunicator(application(), path, headers=headers)
    connected, code = await comm.connect()
    return comm, connected, code


async def next_final(comm, timeout=60):
    while True:
        frame = json.loads(await comm.receive_from(timeout=timeout))
        if frame["type"] in ("answer", "error"):
            return frame


async def say(comm, text, **extra):
    await comm.send_to(text_data=json.dumps({"type": "message", "message": text, **extra}))
    return await next_final(comm)


async def test_api_key_client_without_origin_connects(user):
    issued = await asyncio.to_thread(api_key_create, user=user)
    # Exactly what `websockets.connect(url, additional_headers={"Authorization": ...})` sends: no Origin.
    headers = [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {issued.raw_key}".encode())]
    comm, connected, _ = await open_socket("/ws/echo/", headers)
    assert connected
    await comm.send_to(text_data=json.dumps({"hello": 1}))
    assert json.loads(await comm.receive_from())["user"] == "alice"
    await comm.disconnect()
    comm, connected, _ = await open_socket("/ws/chat/ws-no-origin-01/", headers)
    assert connected
    await comm.disconnect()


async def test_cookie_sessions_still_need_a_matching_origin(user, client):
    await asyncio.to_thread(client.force_login, user)
    cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
    for origin in (None, b"http://evil.example.com"):
        headers = [(b"host", b"127.0.0.1"), (b"cookie", cookie)] + ([(b"origin", origin)] if origin else [])
        _comm, connected, _ = await open_socket("/ws/echo/", headers)
        assert not connected, origin
    # A key client that does send an Origin is held to it too.
    issued = await asyncio.to_thread(api_key_create, user=user)
    _comm, connected, _ = await open_socket("/ws/echo/", [(b"origin", b"http://evil.example.com"), (
        b"authorization", f"Bearer {issued.raw_key}".encode())])
    assert not connected
    comm, connected, _ = await open_socket("/ws/echo/", [(b"host", b"127.0.0.1"), (b"origin", b"http://127.0.0.1"),
                                                         (b"cookie", cookie)])
    assert connected
    await comm.disconnect()


async def test_revoked_key_gets_an_error_frame_and_the_socket_closes(user, kb):
    issued = await asyncio.to_thread(api_key_create, user=user)
    comm, connected, _ = await open_socket("/ws/chat/ws-revoke-0001/", [
        (b"authorization", f"Bearer {issued.raw_key}".encode())])
    assert connected
    assert (await say(comm, "How do I request a refund?"))["type"] == "answer"
    await asyncio.to_thread(api_key_revoke, user=user, key_id=issued.api_key.pk)
    frame = await say(comm, "and how long does that take?")
    assert frame["type"] == "error" and frame["code"] == "api_key_revoked"
    assert (await comm.receive_output(timeout=5))["type"] == "websocket.close"


async def test_deactivated_user_is_cut_off_on_the_next_turn(user, kb, client):
    await asyncio.to_thread(client.force_login, user)
    cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
    comm, connected, _ = await open_socket("/ws/chat/ws-deactivate-01/", [
        (b"host", b"127.0.0.1"), (b"origin", b"http://127.0.0.1"), (b"cookie", cookie)])
    assert connected
    assert (await say(comm, "How do I request a refund?"))["type"] == "answer"

    def deactivate():
        user.is_active = False
        user.save()

    await asyncio.to_thread(deactivate)
    frame = await say(comm, "and how long does that take?")
    assert frame["type"] == "error" and frame["code"] in ("user_inactive", "session_ended")
    assert (await comm.receive_output(timeout=5))["type"] == "websocket.close"


async def test_removed_group_loses_its_knowledge_base_on_the_next_turn(user, other_user):
    def setup():
        team = Group.objects.create(name="support-team")
        other_user.groups.add(team)
        kb = build_knowledge_base(user, slug="team-only")
        kb.allowed_groups.add(team)
        return team, kb, api_key_create(user=other_user)

    team, kb, issued = await asyncio.to_thread(setup)
    comm, connected, _ = await open_socket("/ws/chat/ws-groups-0001/", [
        (b"authorization", f"Bearer {issued.raw_key}".encode())])
    assert connected
    first = await say(comm, "How do I request a refund?", knowledge_bases=[kb.slug])
    assert first["type"] == "answer" and first["citations"]
    await asyncio.to_thread(other_user.groups.remove, team)
    frame = await say(comm, "How do I request a refund?", knowledge_bases=[kb.slug])
    assert frame["type"] == "error" and frame["code"] == "knowledge_base_not_found"
    await comm.disconnect()
