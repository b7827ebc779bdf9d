"""Weights & Biases for a fit: one run per fit, created and fed by rank 0 only.

What goes to W&B: the resolved config (the run's config.yaml as a nested dict), every round's
metrics with `round` as the step (a superset of metrics.jsonl, which holds evaluated rounds
only), one grouped chart per per-layer metric (`layer/<name>/<metric>`: one curve per layer),
every PNG of run_dir/plots as an image, and the run summary.

wandb is imported only when a run is actually logged (mode online or offline), so a machine
without the package runs the default settings unchanged; see `resolve_mode` for the policy.
"""

from __future__ import annotations

import importlib.util
import math
import netrc
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import yaml

if TYPE_CHECKING:  # fedlit.plots reads layer_series from here without torch
    from fedlit.config import WandbConfig

LAYER_PREFIX = "layer/"
# WANDB_MODE values that wandb itself accepts, as the mode they mean.
ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline"}
ENV_MODES["disabled"] = "disabled"


def wandb_installed() -> bool:
    """True when `import wandb` would succeed (checked without importing it: it is slow)."""
    return importlib.util.find_spec("wandb") is not None


def has_api_key(environ: Mapping[str, str] = os.environ) -> bool:
    """An API key is configured: WANDB_API_KEY, or the netrc entry that `wandb login` writes."""
    if environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        entry = netrc.netrc(path).authenticators(host or "api.wandb.ai")
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_mode(config: WandbConfig, environ: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """(mode, reason): the mode a fit logs in, and why, for the startup panel.

    auto: WANDB_MODE when set (wandb's own switch), else online with an API key and offline
    without one, so that a run never fails for want of a network or an account; and disabled
    when wandb is not installed (an explicit online/offline is refused earlier, by the config).
    """
    if config.mode != "auto":
        return config.mode, "logger.wandb.mode"
    if not wandb_installed():
        return "disabled", "the wandb package is not installed"
    env_mode = ENV_MODES.get(environ.get("WANDB_MODE", "").lower())
    if env_mode is not None:
        return env_mode, "WANDB_MODE"
    if has_api_key(environ):
        return "online", "an API key is configured"
    return "offline", "no API key configured"


DEFAULT_PROJECT = "fedlit"


def resolve_names(
    config: WandbConfig, environ: Mapping[str, str] = os.environ
) -> tuple[str, str | None]:
    """(project, entity) of the W&B run: the config's when it sets them, else W&B's own
    environment variables (WANDB_PROJECT, WANDB_ENTITY, as a sweep agent or a cluster profile
    sets them), else the project `fedlit` and W&B's default entity."""
    project = config.project or environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
    entity = config.entity or environ.get("WANDB_ENTITY") or None
    return project, entity


def layer_series(
    history: list[dict[str, Any]],
) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """metric -> layer -> (rounds, values) from the `layer/<name>/<metric>` keys of `history`."""
    series: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for record in history:
        for key, value in record.items():
            if not key.startswith(LAYER_PREFIX) or not isinstance(value, (int, float)):
                continue
            layer, _, metric = key[len(LAYER_PREFIX) :].rpartition("/")
            if not layer or value is None or not math.isfinite(value):
                continue
            rounds, values = series.setdefault(metric, {}).setdefault(layer, ([], []))
            rounds.append(int(record["round"]))
            values.append(float(value))
    return series


class NoDashboard:
    """Stands in for the W&B run on other ranks and when W&B is disabled."""

    mode = "disabled"
    run_id: str | None = None
    location = ""

    def log_round(self, metrics: dict[str, Any]) -> None:
        pass

    def finish(
        self, summary: dict[str, Any], history: list[dict[str, Any]], plots_dir: Path
    ) -> None:
        pass

    def abort(self) -> None:
        pass


class WandbDashboard:
    """A live W&B run; `finish` (or `abort` on failure) must be called exactly once."""

    def __init__(
        self,
        config: WandbConfig,
        mode: str,
        run_dir: Path,
        resolved_config: dict[str, Any],
        quiet: bool,
    ) -> None:
        import wandb  # only here: importing wandb costs about a second and it may be missing

        self.wandb = wandb
        self.mode = mode
        Path(config.dir).mkdir(parents=True, exist_ok=True)
        project, entity = resolve_names(config)
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=config.name or run_dir.name,
            group=config.group,
            tags=list(config.tags) or None,
            notes=config.notes,
            dir=config.dir,
            id=config.id,
            resume="allow" if config.id else None,
            mode=mode,
            config=resolved_config,
            # Rich owns the terminal: W&B neither captures it nor prints its banners; the
            # console report prints one line saying where the run went.
            settings=wandb.Settings(silent=True, console="off", init_timeout=config.init_timeout),
        )
        self.run.define_metric("round")
        self.run.define_metric("*", step_metric="round")
        self.run_id: str = self.run.id
        self.run_path = Path(self.run.dir).parent  # wandb/<offline-)run-<time>-<id>
        self.location = self.run.url if mode == "online" else str(self.run_path)
        self.last_round = 0

    def log_round(self, metrics: dict[str, Any]) -> None:
        """One round's metrics at step `round` (rounds increase, as W&B steps must)."""
        self.last_round = int(metrics["round"])
        self.run.log(dict(metrics), step=self.last_round)

    def finish(
        self, summary: dict[str, Any], history: list[dict[str, Any]], plots_dir: Path
    ) -> None:
        """Grouped per-layer charts and the plots at the last round's step, then the summary."""
        media: dict[str, Any] = {}
        for metric, layers in layer_series(history).items():
            names = list(layers)  # the order layers first appear: the layer map's
            media[f"layer_charts/{metric}"] = self.wandb.plot.line_series(
                xs=[layers[n][0] for n in names],
                ys=[layers[n][1] for n in names],
                keys=names,
                title=f"{metric} per layer",
                xname="round",
            )
        for png in sorted(plots_dir.glob("*.png")):
            media[f"plots/{png.stem}"] = self.wandb.Image(str(png), caption=png.name)
        if media:
            self.run.log(media, step=self.last_round)
        self.run.summary.update(summary)
        self.run.finish(exit_code=0)

    def abort(self) -> None:
        """Mark the run failed (the fit raised) so the dashboard does not show it as running."""
        self.run.finish(exit_code=1)


Dashboard = WandbDashboard | NoDashboard


def open_dashboard(
    config: WandbConfig,
    run_dir: Path,
    config_yaml: str,
    quiet: bool,
    notify: Callable[[str], None],
) -> Dashboard:
    """The W&B run of this fit (call on rank 0 only), or a stand-in when W&B is off."""
    mode, reason = resolve_mode(config)
    if mode == "disabled":
        if reason != "logger.wandb.mode":
            notify(f"W&B logging off: {reason} (logger.wandb.mode auto)")
        return NoDashboard()
    resolved = yaml.safe_load(config_yaml) if config_yaml else None
    try:
        dashboard = WandbDashboard(config, mode, run_dir, resolved or {}, quiet)
    except Exception as error:  # wandb raises its own CommError/UsageError types
        if config.mode != "auto" or mode != "online":
            raise
        # auto never fails a run for the network: a key without a reachable server logs offline
        notify(f"W&B online start failed ({error}); logging offline instead")
        mode, reason = "offline", "online start failed"
        dashboard = WandbDashboard(config, mode, run_dir, resolved or {}, quiet)
    if mode == "offline":
        # the command on a line of its own, never folded, so that it can be copied whole
        notify(f"W&B offline run {dashboard.run_id} ({reason}); upload it later with:")
        notify(f"wandb sync {dashboard.location}")
    else:
        notify(f"W&B run {dashboard.run_id}: {dashboard.location}")
    return dashboard
