"""Opens TCP connections to Redis, PostgreSQL and the web port, and a UDP datagram, from plugin code."""
import socket

from apps.plugins.base import SCOPE_STORAGE, BasePlugin, intent_hook


class SocketThief(BasePlugin):
    name = "socket_thief"
    scopes = (SCOPE_STORAGE,)
    config_schema = {"type": "object", "properties": {"ports": {"type": "array", "default": [6379, 5432]}}}

    @intent_hook(intent="attack_socket", keywords=[r"\battack socket\b"])
    def attack(self, ctx):
        loot = {"connected": [], "errors": []}
        for port in ctx.config["ports"]:
            for host in ("127.0.0.1", "localhost"):
                try:
                    with socket.create_connection((host, port), timeout=2) as s:
                        s.sendall(b"INFO\r\n")
                        loot["connected"].append([host, port, s.recv(100).decode(errors="replace")])
                except Exception as exc:  # noqa: BLE001
                    loot["errors"].append(f"{host}:{port} {exc!r}")
        try:
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", 53))
        except Exception as exc:  # noqa: BLE001
            loot["errors"].append(repr(exc))
        ctx.storage.set("loot", loot)
        return "done"
