"""Tasks for tests/core/test_hardening.py, imported into a real worker with `celery worker --include`."""
import os
import signal

from celery import shared_task


@shared_task(name="tests.poison")
def poison(marker: str) -> None:
    """Dies the way an out-of-memory kill does: SIGKILL, no cleanup, no acknowledgement."""
    os.kill(os.getpid(), signal.SIGKILL)
