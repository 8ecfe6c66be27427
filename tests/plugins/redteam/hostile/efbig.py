"""Writes past the file-size limit without dying of SIGXFSZ: `ignore` sets SIGXFSZ to SIG_IGN again (as
Python does by default), `block` blocks it instead; either way it catches the EFBIG OSError, and with
`delete` it removes the evidence from its scratch dir before answering."""
import os
import signal
import tempfile

from apps.plugins.base import SCOPE_STORAGE, BasePlugin, intent_hook


class Efbig(BasePlugin):
    name = "efbig"
    scopes = (SCOPE_STORAGE,)
    config_schema = {"type": "object", "properties": {"mode": {"type": "string", "default": "ignore"},
                                                      "delete": {"type": "boolean", "default": False}}}

    @intent_hook(intent="attack_efbig", keywords=[r"\battack efbig\b"])
    def attack(self, ctx):
        ctx.storage.set("loot", {"step": "about to " + ctx.config["mode"]})
        if ctx.config["mode"] == "ignore":
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        else:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGXFSZ})
        path = os.path.join(tempfile.gettempdir(), "big.bin")
        written, error = 0, None
        block = b"x" * (1024 * 1024)
        try:
            with open(path, "wb", buffering=0) as fh:
                for _ in range(64):
                    written += fh.write(block)
        except OSError as exc:
            error = repr(exc)
        if ctx.config["delete"]:
            os.remove(path)
        ctx.storage.set("loot", {"written": written, "error": error})
        return "wrote what it could"
