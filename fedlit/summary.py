"""The run's summary (summary.json, the console's closing table, W&B's run summary), computed
from the metric history on every rank."""

from __future__ import annotations

from typing import Any

from fedlit.protocols import metric_suffix, parse_protocols


def summarize(
    history: list[dict[str, Any]],
    wall_seconds: float,
    costs: dict[str, Any],
    eval_bn: list[str],
    world_size: int,
    segments: int = 1,
) -> dict[str, Any]:
    """Best and final accuracy (of every eval_bn protocol), rounds, wall time (of every
    segment of a resumed run, and how many segments), costs."""
    evaluated = [m for m in history if "test/acc" in m]
    best = max(evaluated, key=lambda m: m["test/acc"])
    final = evaluated[-1]
    summary = {
        "best_test_acc": best["test/acc"],
        "best_round": best["round"],
        "final_test_acc": final["test/acc"],
        "final_test_loss": final["test/loss"],
        "rounds": history[-1]["round"],
        "wall_seconds": wall_seconds,
        "segments": segments,
        **costs,
        "world_size": world_size,
    }
    for key in ("personal/acc_local", "personal/acc_global"):
        if key in final:
            summary[f"final_{key.replace('/', '_')}"] = final[key]
    protocols = parse_protocols(eval_bn)
    summary["eval_bn"] = protocols[0].name
    for position, protocol in enumerate(protocols[1:], start=1):
        suffix = metric_suffix(position, protocol)
        summary[f"best_test_acc{suffix}"] = max(m[f"test/acc{suffix}"] for m in evaluated)
        summary[f"final_test_acc{suffix}"] = final[f"test/acc{suffix}"]
        summary[f"final_test_loss{suffix}"] = final[f"test/loss{suffix}"]
    return summary
