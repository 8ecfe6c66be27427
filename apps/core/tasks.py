from celery import shared_task


@shared_task(name="core.ping")
def ping(value: str = "pong") -> dict:
    """Liveness probe for workers: returns what it was given and which worker ran it."""
    import os
    import socket

    return {"value": value, "host": socket.gethostname(), "pid": os.getpid()}
