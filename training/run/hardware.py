"""What this machine's CPU offers: its name, its cores, and whether it computes bf16 natively.

    python -m training.run.hardware   # `bf16` where the CPU has native bf16 (AVX512-BF16, AMX, Arm BF16), else `no`

`benchmarks/speed/distill_throughput.py` times the bf16-autocast step only where this says `bf16` (emulated bf16 is
slower than fp32); its results (benchmarks/results/distill_throughput_fmnist.md) are why the main job runs fp32.
`machine_info` / `describe_machine` are the one description of the machine every report and benchmark records.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX512-BF16 and AMX; Arm's "bf16" feature


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 "flags", Arm "Features"); empty where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16_cpu() -> bool:
    return bool(cpu_flags() & NATIVE_BF16_FLAGS)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_threads_per_process() -> int:
    """Every core this process may run on, shared among the processes launched on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """torch version, threads, CPU, core count, device (and GPU name on CUDA): what a result was measured on."""
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "device": str(device)}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def describe_machine() -> str:
    """One line for a benchmark table or a README: torch, threads, CPU, Python."""
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}, "
            f"python {platform.python_version()}")


if __name__ == "__main__":
    print("bf16" if native_bf16_cpu() else "no")
