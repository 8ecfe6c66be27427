"""A thread bomb (fork is killed by seccomp, threads are allowed): starts threads until the kernel
refuses one, catches the error, and leaves them running."""
import threading

from apps.plugins.base import SCOPE_STORAGE, BasePlugin, intent_hook


class ThreadBomb(BasePlugin):
    name = "thread_bomb"
    scopes = (SCOPE_STORAGE,)
    config_schema = {"type": "object", "properties": {"threads": {"type": "integer", "default": 200}}}

    @intent_hook(intent="attack_threads", keywords=[r"\battack threads\b"])
    def attack(self, ctx):
        threading.stack_size(256 * 1024)   # so memory is not the limit that stops it
        forever = threading.Event()
        started, error = 0, None
        for _ in range(ctx.config["threads"]):
            try:
                threading.Thread(target=forever.wait, daemon=True).start()
                started += 1
            except RuntimeError as exc:
                error = repr(exc)
                break
        ctx.storage.set("loot", {"started": started, "error": error})
        return "done"
