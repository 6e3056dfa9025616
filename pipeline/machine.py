"""What machine a run was on: the CPU model (``lscpu``'s "Model name"), cores and load, for the report."""

from __future__ import annotations

import os
import platform
import subprocess


def cpu_model() -> str:
    """``lscpu``'s Model name, else /proc/cpuinfo's model name, else the platform's processor string."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_summary() -> dict:
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count() or 0,
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


__all__ = ["cpu_model", "machine_summary"]
