"""`nvidia-smi` sampling of one GPU's SM clock, power and temperature beside a measurement.

A power-capped H100/H200 lowers its SM clock under sustained load, and by how much depends on what
runs (overlapped GEMMs and attention draw more than either alone), so a timing is read beside the
clock it ran at. No torch at import time.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from typing import Any


class GpuMonitor:
    """`nvidia-smi` sampling SM clock (MHz), power (W) and temperature (C) of one GPU every 200 ms,
    in a process of its own (nothing in the serving loop); `stop(windows)` ends it and returns the
    medians per named wall-clock window, or None when nvidia-smi is not there."""

    FIELDS = ("sm_clock_mhz", "power_w", "temperature_c")

    def __init__(self, device) -> None:
        import torch

        self.proc = None
        self.out = tempfile.TemporaryFile(mode="w+")
        try:
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            which = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
            # line-buffered: a sample written to a file must not sit in nvidia-smi's buffer at the end
            line = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
            query = "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu"
            self.proc = subprocess.Popen(
                [*line, "nvidia-smi", "-i", which, query, "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=self.out, stderr=subprocess.DEVNULL, text=True)
        except Exception:  # a diagnostic only: no nvidia-smi, no device uuid -> no samples
            self.proc = None

    def stop(self, windows: dict[str, tuple[float, float]]) -> dict[str, Any] | None:
        if self.proc is None:
            if not self.out.closed:
                self.out.close()
            return None
        proc, self.proc = self.proc, None
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self.out.seek(0)
        text = self.out.read()
        self.out.close()
        return self.parse(text, windows)

    @classmethod
    def parse(cls, text: str, windows: dict[str, tuple[float, float]]) -> dict[str, Any]:
        """Medians of the nvidia-smi lines (`timestamp, clock, power, temperature`) in each window."""
        from datetime import datetime as dt

        samples = []
        for line in text.splitlines():
            parts = [p.strip() for p in line.split(",")]
            try:
                t = dt.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()  # local time, as time.time()
            except ValueError:
                continue
            samples.append((t, *(_number(p) for p in (parts + [""] * 3)[1:4])))
        out: dict[str, Any] = {}
        for name, (a, b) in windows.items():
            inside = [x for x in samples if a <= x[0] <= b]
            out[name] = {"samples": len(inside)}
            for i, f in enumerate(cls.FIELDS):
                v = sorted(x[i + 1] for x in inside if x[i + 1] is not None)
                out[name][f] = v[len(v) // 2] if v else None
        return out


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None
