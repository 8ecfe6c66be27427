import os


def prepare_process(kind: str) -> None:
    """Thread setup for a command process (`worker` for batch encoding, `web` for single queries).

    OpenMP threads sleep at barriers instead of spinning: on a shared 2-core machine, spinning torch
    and FAISS threads turned a ~20 ms query encode into 80-970 ms (measured with 2 threads under load).
    Only effective before torch is first imported, which no command does before this call.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if _own_process():
        quiet_logging()
    from apps.core.runtime import configure_process

    configure_process(kind=kind)


def _own_process() -> bool:
    """The command is the process (`manage.py ...`), not called from code or tests with call_command:
    log levels are process-wide, and lowering them must not outlive the command in someone else's process."""
    import sys

    return os.path.basename(sys.argv[0] if sys.argv else "") in ("manage.py", "django-admin")


# Libraries that log at INFO on every start (FAISS's loader, the model loader, HTTP clients, jieba).
_CHATTY = ("faiss", "faiss.loader", "sentence_transformers", "httpx", "httpcore", "jieba", "celery", "urllib3",
           "transformers", "apps")


def quiet_logging() -> None:
    """On a terminal a command's own progress bar and summary are the output: log lines drop to warnings in
    short text form and library warnings are silenced. Servers keep JSON logs (they never call this), and an
    operator who sets LOG_FORMAT or LOG_LEVEL for a command gets exactly those logs."""
    import logging
    import sys
    import warnings

    if os.environ.get("LOG_FORMAT") or os.environ.get("LOG_LEVEL") or not sys.stderr.isatty():
        if not os.environ.get("LOG_FORMAT") and not os.environ.get("LOG_LEVEL"):
            for name in _CHATTY:  # piped: still JSON, but no per-start chatter before the summary
                logging.getLogger(name).setLevel(logging.WARNING)
        return
    formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    for logger in (logging.getLogger(), logging.getLogger("django")):
        logger.setLevel(logging.WARNING)
        for handler in logger.handlers:
            handler.setFormatter(formatter)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.simplefilter("ignore", category)
