"""How fedlit writes quantities for people: one unit family per kind of figure.

Bytes take binary prefixes (KiB, MiB, GiB: what memory and tensor sizes are counted in), FLOPs
decimal ones (GFLOP, TFLOP: how compute is quoted), durations clock time. The files keep raw
numbers; the console, the comparison table and the figures go through these functions, so a
figure never appears in two families at once.
"""

from __future__ import annotations

import math

GB = 10**9  # summary.json's comm_gb and `fedlit compare`'s "comm GB"
TFLOP = 10**12  # summary.json's train_tflops and `fedlit compare`'s "TFLOPs"
BYTE_UNITS = ("B", "KiB", "MiB", "GiB")
FLOP_UNITS = ((1e18, "EFLOP"), (1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"))


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': communication reads better in binary units than as raw counts."""
    step = 0
    while abs(n) >= 1024 and step < len(BYTE_UNITS) - 1:
        n, step = n / 1024, step + 1
    return f"{n:.0f} B" if step == 0 else f"{n:.1f} {BYTE_UNITS[step]}"


def human_flops(n: float) -> str:
    """21865392000 -> '21.9 GFLOP' (decimal prefixes, as FLOP counts are quoted)."""
    for scale, unit in FLOP_UNITS:
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} FLOP"


def human_duration(seconds: float) -> str:
    """12.34 -> '12.3 s', 754 -> '12:34', 5025 -> '1:23:45': seconds while short, clock time
    once minutes matter (the form of the console's elapsed and ETA columns)."""
    if not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
