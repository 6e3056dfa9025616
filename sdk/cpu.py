"""What this CPU is and what it does with int8 dot products.

Why: ONNX Runtime's u8 x s8 kernels on x86 CPUs without VNNI (plain AVX2 / AVX-512) add pairs of
products in saturating int16 before widening, so a U8S8 model can lose accuracy there that it keeps
on a VNNI, AMX or ARM dot-product CPU (OpenVINO documents the same "saturation issue"). The exporter
picks its int8 scheme from this, the SDK refuses a U8S8 variant gated on an exact CPU when it runs on
one that saturates, and the int8 catalogue scan keeps 7-bit codes there.
"""

from __future__ import annotations

import functools
import os
import platform

EXACT_INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def _is_arm() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_flags() -> frozenset[str]:
    """The ``flags`` line of /proc/cpuinfo (empty where there is none)."""
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_description() -> str:
    """This CPU in one line for benchmark records, e.g. ``AMD EPYC (family 26 model 2; AVX-512, VNNI; 2 cores)``.

    Why more than the model name: cloud CPUs often report only "AMD EPYC", and two of them with the
    same name but different vector units give different speeds (and int8 accuracy)."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    flags = cpu_flags()
    units = ["AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""]
    units += ["VNNI" if flags & {"avx512_vnni", "avx_vnni"} else "", "AMX" if "amx_tile" in flags else ""]
    parts = [f"family {info['cpu family']} model {info['model']}"] if "cpu family" in info and "model" in info else []
    parts += [", ".join(u for u in units if u) or "", f"{os.cpu_count()} cores"]
    return f"{name} ({'; '.join(p for p in parts if p)})"


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
