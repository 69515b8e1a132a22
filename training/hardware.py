"""What this machine's CPU offers: its name, its cores, and whether it computes bf16 natively.

    python -m training.hardware   # `bf16` where the CPU has native bf16 (AVX512-BF16, AMX, Arm BF16), else `no`

`benchmarks/distill_throughput.py` times the bf16-autocast step only where this says `bf16` (emulated bf16 is slower
than fp32). Measured there on a 2-core Xeon with AMX: bf16 autocast was slower than fp32 for the 32-px Fashion-MNIST
recipe, so the main job runs fp32; on such a CPU `accelerate launch --mixed_precision bf16` is one flag away.
"""

from __future__ import annotations

import os
import platform

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


if __name__ == "__main__":
    print("bf16" if native_bf16_cpu() else "no")
