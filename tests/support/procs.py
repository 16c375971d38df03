"""Child processes that tests start in their own process group (servers, torchrun, operators).

Used by the runtime tests: `stop_group` ends a group with SIGTERM, then SIGKILL after `timeout`.
"""

from __future__ import annotations

import os
import signal
import subprocess


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
