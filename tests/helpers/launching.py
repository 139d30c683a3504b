"""The 2-process CPU launch the multi-process tests share (gloo through `accelerate launch`)."""

from __future__ import annotations

import socket
import sys


def accelerate_launch(*args: str, processes: int = 2) -> list[str]:
    """Command line: ``accelerate launch`` of ``args`` (a script and its arguments, or ``-m module ...``) on
    ``processes`` CPU processes of this machine, on a free port so tests can run side by side."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        *args,
    ]  # fmt: skip
