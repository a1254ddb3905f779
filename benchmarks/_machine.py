"""Facts about the machine a benchmark ran on (recorded beside every result)."""
from __future__ import annotations

import datetime
import os
import platform
import sys


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "load_average_1m_at_start": os.getloadavg()[0],
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
