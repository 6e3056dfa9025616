"""sdk.cpu: which CPUs have exact int8 dot products, and the exporter's ``auto`` ONNX Runtime scheme built on it."""

import platform

import pytest

import export.ort_quantize as oq
import sdk.cpu
from export.errors import ExportError
from export.ort_quantize import OrtInt8Options


@pytest.mark.parametrize("machine, flags, exact", [
    ("x86_64", {"avx2", "fma"}, False),  # AMD EPYC Zen 3, older Xeons: u8 x s8 saturates in int16
    ("x86_64", {"avx2", "avx512f", "avx512bw"}, False),  # AVX-512 without VNNI (Skylake-SP): saturates too
    ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, True),  # Cascade Lake, Zen 4
    ("x86_64", {"avx2", "avx_vnni"}, True),  # Alder Lake
    ("x86_64", {"amx_int8", "avx512_vnni"}, True),  # Sapphire Rapids
    ("x86_64", set(), False),  # no /proc/cpuinfo: when unsure, assume it saturates
    ("aarch64", set(), True),
])
def test_int8_dot_exact_follows_the_cpu_flags(monkeypatch, machine, flags, exact):
    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(sdk.cpu, "cpu_flags", lambda: frozenset(flags))
    assert sdk.cpu.int8_dot_exact() is exact
    assert ("saturates" in sdk.cpu.int8_dot_note()) is (not exact)


def test_cpu_flags_reads_this_machines_cpuinfo():
    flags = sdk.cpu.cpu_flags()
    try:
        line = next(l for l in open("/proc/cpuinfo") if l.startswith("flags"))
    except (OSError, StopIteration):
        assert flags == frozenset()
        return
    assert flags == frozenset(line.split(":", 1)[1].split()) and "fpu" in flags


@pytest.mark.parametrize("fields, text", [
    ({"model name": "AMD EPYC", "cpu family": "25", "model": "1", "flags": "fpu avx2 fma"},
     "AMD EPYC (family 25 model 1; AVX2; 2 cores)"),
    ({"model name": "AMD EPYC", "cpu family": "26", "model": "2", "flags": "avx2 avx512f avx512_vnni avx_vnni"},
     "AMD EPYC (family 26 model 2; AVX-512, VNNI; 2 cores)"),
    ({"model name": "Intel(R) Xeon(R) Platinum 8480+", "cpu family": "6", "model": "143",
      "flags": "avx2 avx512f avx512_vnni amx_tile amx_int8"},
     "Intel(R) Xeon(R) Platinum 8480+ (family 6 model 143; AVX-512, VNNI, AMX; 2 cores)"),
])
def test_cpu_description_tells_same_named_cpus_apart(monkeypatch, fields, text):
    """Two "AMD EPYC"s of different speed (and int8 behaviour) must read differently in a benchmark record."""
    monkeypatch.setattr(sdk.cpu, "_cpuinfo", lambda: fields)
    monkeypatch.setattr(sdk.cpu.os, "cpu_count", lambda: 2)
    assert sdk.cpu.cpu_description() == text


@pytest.mark.parametrize("exact, scheme", [(True, "u8s8"), (False, "s8s8")])
def test_auto_scheme_is_u8s8_only_where_it_cannot_saturate(monkeypatch, exact, scheme):
    monkeypatch.setattr(oq, "int8_dot_exact", lambda: exact)
    o = OrtInt8Options()
    assert o.scheme == scheme and o.scheme_chosen_for
    assert o.to_dict()["scheme"] == scheme  # what the manifest records
    assert OrtInt8Options(scheme="u8s8").scheme == "u8s8" and not OrtInt8Options(scheme="u8s8").scheme_chosen_for
    with pytest.raises(ExportError, match="unknown ONNX Runtime int8 scheme 'u4'.*auto"):
        OrtInt8Options(scheme="u4")
