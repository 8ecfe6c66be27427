"""The websocket path end to end: routing, origin check, session and API-key auth."""
import asyncio
import json

import pytest
from channels.testing import WebsocketCommunicator

from apps.core.services import api_key_create

pytestmark = pytest.mark.django_db(transaction=True)


def application():
    from kotaemon_site.asgi import application

    return application


def headers(**extra):
    base = [(b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1")]
    return base + [(k.encode(), v.encode()) for k, v in extra.items()]


async def test_anonymous_is_refused(user):
    comm = WebsocketCommunicator(application(), "/ws/echo/", headers=headers())
    connected, code = await comm.connect()
    assert not connected and code == 4401


async def test_foreign_origin_is_refused(user):
    issued = await asyncio.to_thread(api_key_create, user=user)
    comm = WebsocketCommunicator(application(), "/ws/echo/", headers=[
        (b"origin", b"http://evil.example.com"), (b"authorization", f"Bearer {issued.raw_key}".encode())])
    connected, _ = await comm.connect()
    assert not connected


async def test_api_key_echo_and_malformed_frames(user):
    issued = await asyncio.to_thread(api_key_create, user=user)
    comm = WebsocketCommunicator(application(), "/ws/echo/", headers=headers(authorization=f"Bearer {issued.raw_key}"))
    connected, _ = await comm.connect()
    assert connected
    await comm.send_to(text_data=json.dumps({"hello": "world"}))
    assert json.loads(await comm.receive_from()) == {"type": "echo", "user": "alice", "payload": {"hello": "world"}}
    await comm.send_to(text_data="{oops")
    assert json.loads(await comm.receive_from())["code"] == "malformed_json"
    await comm.send_to(bytes_data=b"\x00\x01")
    assert json.loads(await comm.receive_from())["code"] == "bad_frame"
    await comm.send_to(text_data=json.dumps({"still": "alive"}))
    assert json.loads(await comm.receive_from())["payload"] == {"still": "alive"}
    await comm.disconnect()


@pytest.mark.slow
def test_real_client_against_running_server(user):
    """A real ASGI server process and the `websockets` client, with a session cookie from a real login."""
    import httpx
    from websockets.sync.client import connect

    from tests.helpers import asgi_server

    issued = api_key_create(user=user)
    with asgi_server() as (addr, _proc):
        with connect(f"ws://{addr}/ws/echo/", additional_headers={"Authorization": f"Bearer {issued.raw_key}"},
                     origin=f"http://{addr}") as ws:
            ws.send(json.dumps({"n": 1}))
            assert json.loads(ws.recv(timeout=10))["payload"] == {"n": 1}
        # Session-cookie path: sign in through the login form like a browser would.
        with httpx.Client(base_url=f"http://{addr}") as http:
            page = http.get("/accounts/login/")
            csrf = http.cookies["csrftoken"]
            http.post("/accounts/login/", data={"username": "alice", "password": "pw-alice-123",
                                                "csrfmiddlewaretoken": csrf, "next": "/api/v1/me/"},
                      headers={"Referer": f"http://{addr}/accounts/login/"})
            assert page.status_code == 200
            cookie = "; ".join(f"{k}={v}" for k, v in http.cookies.items())
            assert http.get("/api/v1/me/").json()["username"] == "alice"
        with connect(f"ws://{addr}/ws/echo/", additional_headers={"Cookie": cookie}, origin=f"http://{addr}") as ws:
            ws.send(json.dumps({"via": "cookie"}))
            assert json.loads(ws.recv(timeout=10))["user"] == "alice"
