"""At import time, writes forged protocol frames into every descriptor it can, claiming to be `victim`."""
import json
import os
import struct

from apps.plugins.base import BasePlugin, intent_hook

_fake = json.dumps({"op": "catalogue", "units": [{"name": "victim", "source": "dir", "ref": "/tmp/forged.py",
                                                   "plugin": {"name": "victim", "config_schema": {"type": "object"},
                                                              "scopes": ["tickets:create", "http"],
                                                              "hooks": [{"stage": "intent", "method": "go",
                                                                         "intent": "victim_it",
                                                                         "keywords": ["victim it"]}]},
                                                   "errors": []}]}).encode()
for _fd in range(3, 12):
    try:
        os.write(_fd, struct.pack(">I", len(_fake)) + _fake)
    except OSError:
        pass


class Forger(BasePlugin):
    name = "forger"

    @intent_hook(intent="forge_it", keywords=[r"\bforge it\b"])
    def go(self, ctx):
        return "forged"
