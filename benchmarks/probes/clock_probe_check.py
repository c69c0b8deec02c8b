"""Does the %clock64 probe (nfsearch.profiler.clock) read the clock nvidia-smi reports?

Three sustained loads of 2 s each (idle, a 1 GiB copy, back-to-back bf16 GEMMs), nvidia-smi
sampling the SM clock every 200 ms (nfsearch.gpu_monitor); the probe reads the clock right after
each load on its stream. Prints one line per load: nvidia-smi median over the last second, probe.
Run on an H200 at 2026-11-21 14:2x UTC (benchmarks/RESULTS.md): idle 1980 / 2050 MHz, copy 1980 /
1983 MHz, GEMMs 1515 / 1411 MHz.
    python benchmarks/probes/clock_probe_check.py
"""

from __future__ import annotations

import time

import torch
from nfsearch.gpu_monitor import GpuMonitor
from nfsearch.profiler.clock import ClockProbe


def main() -> None:
    dev = torch.device("cuda", 0)
    probe, stream = ClockProbe(dev), torch.cuda.Stream(dev)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    src = torch.empty(1 << 29, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    loads = {"idle": lambda: torch.cuda._sleep(1_000_000), "copy": lambda: dst.copy_(src),
             "gemm": lambda: a @ a}
    mon = GpuMonitor(dev)
    windows, probed = {}, {}
    for name, fn in loads.items():
        t0 = time.time()
        with torch.cuda.stream(stream):
            while time.time() - t0 < 2.0:
                for _ in range(8):
                    fn()
                stream.synchronize()
        windows[name] = (t0 + 1.0, time.time())
        probed[name] = probe.mhz(stream)
    smi = mon.stop(windows) or {}
    for name in loads:
        print(f"{name:5s} nvidia-smi {smi.get(name, {}).get('sm_clock_mhz')} MHz, "
              f"probe {probed[name]:.0f} MHz")


if __name__ == "__main__":
    main()
