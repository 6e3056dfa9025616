"""What this CPU does with int8 dot products.

Why: ONNX Runtime's u8 x s8 kernels on x86 CPUs without VNNI (plain AVX2 / AVX-512) add pairs of
products in saturating int16 before widening, so a U8S8 model can lose accuracy there that it keeps
on a VNNI, AMX or ARM dot-product CPU (OpenVINO documents the same "saturation issue"). The exporter
picks its int8 scheme from this, the SDK refuses a U8S8 variant gated on an exact CPU when it runs on
one that saturates, and the int8 catalogue scan keeps 7-bit codes there.
"""

from __future__ import annotations

import functools
import platform

EXACT_INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def _is_arm() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The ``flags`` line of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").partition(":")[2].split())
    except OSError:
        return frozenset()


def int8_dot_exact() -> bool:
    """True where a u8 x s8 dot product accumulates in int32 without saturating (when unsure: False)."""
    if _is_arm():
        return True
    return bool(EXACT_INT8_FLAGS & cpu_flags())


def int8_dot_note() -> str:
    """A few words for logs and manifests: which kind of int8 dot product this CPU has."""
    if _is_arm():
        return "ARM (int32 dot products)"
    found = sorted(EXACT_INT8_FLAGS & cpu_flags())
    return f"x86 with {', '.join(found)}" if found else "x86 without VNNI (u8 x s8 saturates in int16)"
