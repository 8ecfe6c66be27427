import os


def prepare_process(kind: str) -> None:
    """Thread setup for a command process (`worker` for batch encoding, `web` for single queries).

    OpenMP threads sleep at barriers instead of spinning: on a shared 2-core machine, spinning torch
    and FAISS threads turned a ~20 ms query encode into 80-970 ms (measured with 2 threads under load).
    Only effective before torch is first imported, which no command does before this call.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from apps.core.runtime import configure_process

    configure_process(kind=kind)
