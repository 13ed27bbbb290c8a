"""`report --ramp routes.yaml`: what the ramp would have done on past traffic, and what the
ramps in the log did.

The replay runs the controller's rule (ramp.py) over the log's request lines in time
order, one arm at a time. Each step is its own experiment, as live: a fresh
`LiveVerdict` at the step's split, fed the lines as the running proxy feeds it (the same
`observe`, so the same requests count), and read every `EVERY_REQUESTS` lines or
`EVERY_SECONDS` of log time. The past traffic was split as it was, not at the step's
percentage: the lines are thinned at random (seeded) so that the arm's share of them is
the step's, otherwise a 5% step replayed on 50/50 traffic would decide ten times sooner
than it would have live. Ejections are not replayed.

The timeline of real `ramp` and `ramp_reset` events is printed as it was logged, with each
line's config version and file: several proxies each decide on their own traffic, and
their decisions show side by side.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import orjson

from proxy.accesslog import RequestRecord
from proxy.config import Config, Ramp, load_config
from proxy.errors import ConfigError
from proxy.liveverdict import LiveVerdict
from proxy.logread import UsageError, expand_logs, stdin_as_file
from proxy.ramp import Action, Decision, decide, step_verdict
from proxy.ramp_control import EVERY_REQUESTS, EVERY_SECONDS, with_split
from proxy.routing import FallbackCause, Reason

REPLAY = "replay"  # the config version every replayed line is given
_FIELDS = {f for f in RequestRecord.__slots__ if f not in ("reason", "fallback_cause")}


@dataclass
class Step:
    step: int  # from 1
    split: float
    start: float  # log time, seconds since the epoch
    end: float
    lines: int = 0  # request lines read in the step (after thinning)
    decision: Decision | None = None


@dataclass
class Replay:
    arm: str
    ramp: Ramp
    arm_share: float  # of the experiment lines, arm / (arm + baseline), in the log
    steps: list[Step] = field(default_factory=list)


@dataclass(frozen=True)
class Line:
    time: float
    record: RequestRecord


def read(files: Sequence[str]) -> tuple[list[Line], list[dict[str, Any]]]:
    """The request lines in time order, and the `ramp` / `ramp_reset` events (with their
    file), from the log files."""
    lines: list[Line] = []
    events: list[dict[str, Any]] = []
    for name in files:
        try:
            with open(name, "rb") as handle:
                for raw in handle:
                    _take(raw, name, lines, events)
        except OSError as exc:
            raise UsageError(f"{name}: cannot read ({exc.strerror})") from None
    lines.sort(key=lambda line: line.time)
    events.sort(key=lambda event: str(event.get("timestamp")))
    return lines, events


def _take(raw: bytes, name: str, lines: list[Line], events: list[dict[str, Any]]) -> None:
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return
    if not isinstance(line, dict):
        return
    event = line.get("event")
    if event in ("ramp", "ramp_reset"):
        events.append({**line, "file": name})
    elif event == "request":
        record = _record(line)
        when = _seconds(line.get("timestamp"))
        if record is not None and when is not None:
            lines.append(Line(when, record))


def _record(line: dict[str, Any]) -> RequestRecord | None:
    try:
        reason = Reason(line["reason"]) if line.get("reason") else None
        cause = FallbackCause(line["fallback_cause"]) if line.get("fallback_cause") else None
        known = {k: v for k, v in line.items() if k in _FIELDS}
        known["config_version"] = REPLAY
        return RequestRecord(**known, reason=reason, fallback_cause=cause)
    except (ValueError, TypeError, KeyError):
        return None  # not a line this version of the proxy wrote


def _seconds(stamp: Any) -> float | None:
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def replay(config: Config, lines: Sequence[Line], seed: int = 0) -> list[Replay]:
    """Every ramp of `config`, replayed on `lines`."""
    rng = np.random.default_rng(seed)
    return [_replay(config, arm, ramp, lines, rng) for arm, ramp in config.ramp.items()]


def _replay(
    config: Config, arm: str, ramp: Ramp, lines: Sequence[Line], rng: np.random.Generator
) -> Replay:
    baseline = config.baseline
    share = _share(lines, arm, baseline)
    result = Replay(arm, ramp, share)
    if not lines:
        return result
    index, step = 0, 0
    while index < len(lines):
        pct = float(ramp.steps[step])
        live = LiveVerdict(with_split(config, {arm: pct}), REPLAY)
        keep = dict(zip((arm, baseline), _keep(share, pct), strict=True))
        current = Step(step + 1, pct, lines[index].time, lines[index].time)
        result.steps.append(current)
        last_look, pending = lines[index].time, 0
        decision = None
        while index < len(lines):
            line = lines[index]
            index += 1
            if not _kept(line.record, keep, rng):
                continue
            live.observe(line.record)
            current.lines += 1
            current.end = line.time
            pending += 1
            if pending >= EVERY_REQUESTS or line.time - last_look >= EVERY_SECONDS:
                pending, last_look = 0, line.time
                planned = len(live.experiment.arms)
                verdict = step_verdict(ramp, live.states, baseline, arm, planned)
                decision = decide(ramp, step, current.start, line.time, verdict, arm)
                if decision.action is not Action.HOLD:
                    break
        if decision is None or decision.action is Action.HOLD:  # the log ended first
            planned = len(live.experiment.arms)
            verdict = step_verdict(ramp, live.states, baseline, arm, planned)
            decision = decide(ramp, step, current.start, current.end, verdict, arm)
        current.decision = decision
        if decision.action is not Action.PROMOTE:
            break
        step += 1
    return result


def _share(lines: Sequence[Line], arm: str, baseline: str) -> float:
    counts = {arm: 0, baseline: 0}
    for line in lines:
        r = line.record
        if r.backend in counts and r.reason is not None and r.reason.is_experiment:
            counts[r.backend] += 1
    total = counts[arm] + counts[baseline]
    return counts[arm] / total if total else 0.0


def _keep(share: float, pct: float) -> tuple[float, float]:
    """The chance to keep an arm line and a baseline line, so that the arm's share of the
    kept lines is `pct`%."""
    if share <= 0.0 or share >= 1.0:
        return 1.0, 1.0  # one side has nothing: thinning cannot help
    if pct >= 100.0:
        return 1.0, 0.0
    ratio = (pct / (100.0 - pct)) / (share / (1.0 - share))
    return (ratio, 1.0) if ratio < 1.0 else (1.0, 1.0 / ratio)


def _kept(record: RequestRecord, keep: dict[str, float], rng: np.random.Generator) -> bool:
    chance = keep.get(record.backend or "", 0.0)
    return chance >= 1.0 or (chance > 0.0 and bool(rng.random() < chance))


# --- output ------------------------------------------------------------------------------------


def document(replays: Sequence[Replay], events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "replay": {r.arm: _replay_json(r) for r in replays},
        "events": [_event_json(e) for e in events],
    }


def _replay_json(r: Replay) -> dict[str, Any]:
    return {
        "steps": list(r.ramp.steps),
        "min_requests": r.ramp.min_requests,
        "promote_when": r.ramp.promote_when.value,
        "margin": r.ramp.margin,
        "arm_share_in_log": r.arm_share,
        "timeline": [
            {
                "step": s.step,
                "split": s.split,
                "start": _iso(s.start),
                "end": _iso(s.end),
                "lines": s.lines,
                "action": s.decision.action.value if s.decision else None,
                "reason": s.decision.reason if s.decision else None,
            }
            for s in r.steps
        ],
    }


_EVENT_KEYS = ("timestamp", "file", "config_version", "backend", "action", "step", "steps",
               "split", "split_applied", "dry_run", "reason", "backends", "source")  # fmt: skip


def _event_json(event: dict[str, Any]) -> dict[str, Any]:
    return {"event": event.get("event"), **{k: event.get(k) for k in _EVENT_KEYS if k in event}}


def text(replays: Sequence[Replay], events: Sequence[dict[str, Any]], files: int) -> str:
    out: list[str] = []
    for r in replays:
        ramp = r.ramp
        out.append(
            f"Ramp replay: {r.arm} (steps {', '.join(f'{s:g}' for s in ramp.steps)}%;"
            f" min_requests {ramp.min_requests}; promote_when {ramp.promote_when.value};"
            f" margin {ramp.margin:g}). In the log it had {r.arm_share:.1%} of the"
            " experiment's lines; each step is thinned to its own share."
        )
        if not r.steps:
            out.append("  no request lines")
        for s in r.steps:
            d = s.decision
            action = d.action.value if d else "-"
            what = "log ended; " if d and d.action is Action.HOLD else ""
            out.append(
                f"  step {s.step} ({s.split:g}%)  {_clock(s.start)} - {_clock(s.end)}"
                f"  {s.lines:>7,} lines  {action:<8}  {what}{d.reason if d else ''}"
            )
        out.append("")
    out.append("Ramp events in the log:" if events else "Ramp events in the log: none")
    for e in events:
        where = f"  [{e['file']}]" if files > 1 else ""
        if e.get("event") == "ramp_reset":
            out.append(
                f"  {e.get('timestamp')}  config {e.get('config_version')}  reset"
                f" {', '.join(e.get('backends') or [])} ({e.get('source')}){where}"
            )
            continue
        dry = " (dry run)" if e.get("dry_run") else ""
        out.append(
            f"  {e.get('timestamp')}  config {e.get('config_version')}  {e.get('backend')}"
            f"  {e.get('action')}{dry} at step {e.get('step')}/{e.get('steps')}"
            f" -> {e.get('split')}%  {e.get('reason')}{where}"
        )
    return "\n".join(out) + "\n"


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


def _clock(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def main(logs: Sequence[str], routes: str, *, as_json: bool, seed: int) -> int:
    """The `report --ramp` command: 0, or 2 with a message for bad input."""
    try:
        config = load_config(routes)
        if not config.ramp:
            raise ConfigError(f"{routes}: no `ramp` block to replay")
        files = expand_logs(logs)
        with stdin_as_file(files) as readable:
            lines, events = read(readable)
    except (ConfigError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    replays = replay(config, lines, seed)
    if as_json:
        print(json.dumps(document(replays, events), indent=2, allow_nan=False))
    else:
        sys.stdout.write(text(replays, events, len(files)))
    return 0
