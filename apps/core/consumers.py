"""A trivial authenticated echo consumer proving the websocket path end to end."""
from __future__ import annotations

import json

from channels.generic.websocket import AsyncWebsocketConsumer

MAX_FRAME_BYTES = 64 * 1024


class EchoConsumer(AsyncWebsocketConsumer):
    # No channel layer per connection: nothing is ever sent to one socket through the layer (cluster
    # events go through apps.core.cluster), and with channels-redis every idle socket would otherwise
    # hold a blocking Redis receive that must be cancelled on disconnect (connection churn, stuck teardown).
    channel_layer_alias = None

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        await self.accept()

    async def receive(self, text_data=None, bytes_data=None):
        if text_data is None or len(text_data) > MAX_FRAME_BYTES:
            await self.send_json({"type": "error", "code": "bad_frame", "message": "Send one JSON text frame up to 64 KiB."})
            return
        try:
            payload = json.loads(text_data)
        except ValueError:
            await self.send_json({"type": "error", "code": "malformed_json", "message": "The frame is not valid JSON."})
            return
        await self.send_json({"type": "echo", "user": self.scope["user"].get_username(), "payload": payload})

    async def send_json(self, content: dict) -> None:
        await self.send(text_data=json.dumps(content))
