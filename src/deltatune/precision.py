"""The precision a run computes in: bf16 where the device multiplies bf16 matrices natively,
fp32 elsewhere, unless the user says otherwise.

``auto`` picks bf16 on a CUDA device that supports it and on a CPU whose instruction set has
bf16 dot products (AVX512-BF16, or AMX's bf16 tiles), read from the CPU itself
(:func:`cpu_features`): torch's capability string reports such a CPU only as "AVX512". On any
other device ``auto`` is fp32, because there a bf16 product is emulated and slower than fp32.

In bf16 (or fp16) the frozen base is stored and computed in that dtype; the deltas' parameters
and the optimizer state stay fp32 (each config's ``param_dtype="auto"``), each delta computes
in its layer's dtype, and the loss is taken in fp32.
"""

from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

from .config import check_choice
from .errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: CPU features whose bf16 dot products make bf16 matrix products faster than fp32 ones
NATIVE_BF16_FEATURES = ("avx512_bf16", "amx_bf16")


def parse_cpuinfo(text: str) -> frozenset[str]:
    """The features of the first processor in a /proc/cpuinfo text ("flags" on x86, "Features" on Arm)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@lru_cache(maxsize=None)
def cpu_features() -> frozenset[str]:
    """The CPU's instruction-set features as the operating system reports them (Linux's
    /proc/cpuinfo flags, macOS's sysctl hw.optional names); empty where neither is available."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        return parse_cpuinfo(cpuinfo.read_text(errors="replace"))
    if platform.system() == "Darwin":
        try:
            listed = subprocess.run(["sysctl", "hw.optional"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return frozenset()
        # "hw.optional.arm.FEAT_BF16: 1" -> "arm.feat_bf16"
        return frozenset(name.removeprefix("hw.optional.").lower() for name, _, value in
                         (line.partition(": ") for line in listed.splitlines()) if value.strip() == "1")
    return frozenset()


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively (so faster than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        features = cpu_features()
        return any(f in features for f in NATIVE_BF16_FEATURES) or "arm.feat_bf16" in features
    return False


def resolve(precision: str, device: torch.device | str) -> str:
    """``precision`` (one of :data:`PRECISIONS`) as the concrete one a run on ``device`` uses."""
    check_choice("precision", precision, PRECISIONS)
    device = torch.device(device)
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision='fp16' trains only on a CUDA device (this run is on {device.type}); "
                          "use bf16 or fp32")
    return precision


def describe(precision: str, device: torch.device | str) -> str:
    """One line saying what ``precision`` means on ``device``, for the run's log."""
    device = torch.device(device)
    if precision == "fp32":
        return f"precision fp32 on {device.type}" + (" (no native bf16 matrix products here)" if not native_bf16(device) else "")
    where = ", ".join(f for f in NATIVE_BF16_FEATURES if f in cpu_features()) if device.type == "cpu" else device.type
    return f"precision {precision}: the base in {precision}, the deltas and optimizer state in fp32 ({where})"
