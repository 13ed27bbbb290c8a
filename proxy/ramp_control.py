"""The ramp on the running proxy: reads the live verdict, applies the rule's decisions
(ramp.py) as new splits, and says what it did and why (the log, /healthz, /metrics).

What is true at each moment: `file` is the config as read from disk; `effective()` is
that config with each live ramp's split in place of the arm's `routing.split` (the
baseline gets the rest), and is what the runtime serves. A change of split is applied as
a hot reload applies one: a new config version, in-flight requests finish under the old.

When it decides. Not on every request: a decision reads the verdict (a few dozen µs),
and one a second is as good as one a request for a rule whose evidence moves by one
request at a time. A finished request calls `tick()`, which costs a counter and a clock
read; every `EVERY_REQUESTS` requests or `EVERY_SECONDS` seconds, whichever comes first,
the rule runs for every arm still ramping. No traffic, no decision: the rule has nothing
new to read (an ejected arm's traffic goes to its fallback, so requests still finish).

What resets an arm's ramp: `POST /admin/ramp/reset`, or a reload whose `ramp.<name>`
block differs from the running one. A reload with the same block keeps the step, the
rollback and the step's clock, whatever else it changes; the ramp's split then still
wins over the file's `routing.split` for that arm.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.accesslog import AccessLog
from proxy.config import Config, Ramp
from proxy.errors import BadRequestError
from proxy.health import HealthBoard
from proxy.liveverdict import LiveVerdict
from proxy.ramp import Action, Decision, Evidence, decide, step_verdict
from proxy.sequential import ArmState

EVERY_REQUESTS = 50  # one evaluation, ~50 µs measured: at most 1 µs a request
EVERY_SECONDS = 1.0


@dataclass
class ArmRamp:
    """One arm's ramp: where it stands and what was last decided."""

    name: str
    config: Ramp
    since: float  # the step's start, on the controller's clock
    step_since: datetime = field(default_factory=lambda: datetime.now(UTC))  # for people
    step: int = 0
    rolled_back: bool = False
    complete: bool = False
    last: Decision | None = None  # the latest evaluation, logged or not
    last_at: datetime | None = None
    overdue_logged: bool = False  # the step's overdue hold was logged

    @property
    def deciding(self) -> bool:
        return not (self.rolled_back or self.complete)

    @property
    def split(self) -> float:
        return 0.0 if self.rolled_back else float(self.config.steps[self.step])

    @property
    def state(self) -> str:
        return "rolled_back" if self.rolled_back else "complete" if self.complete else "ramping"


def first_steps(file: Config) -> Config:
    """The config a proxy starts with: each live ramp at its first step."""
    return with_split(file, {n: float(r.steps[0]) for n, r in file.ramp.items() if not r.dry_run})


def _effective(file: Config, arms: Mapping[str, ArmRamp]) -> Config:
    return with_split(file, {n: a.split for n, a in arms.items() if not a.config.dry_run})


def with_split(config: Config, arms: Mapping[str, float]) -> Config:
    """`config` with these arms' split percentages, the baseline taking the rest."""
    if not arms:
        return config
    baseline = config.baseline
    split = {n: p for n, p in config.routing.split.items() if n not in arms and n != baseline}
    split.update(arms)
    split[baseline] = round(100.0 - sum(split.values()), 9)
    routing = config.routing.model_copy(update={"split": split})
    return config.model_copy(update={"routing": routing})


class RampController:
    def __init__(
        self,
        file: Config,
        verdict: LiveVerdict,
        health: HealthBoard,
        log: AccessLog,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.file = file
        self._verdict = verdict
        self._health = health
        self._log = log
        self._clock = clock
        self.arms = {name: ArmRamp(name, r, clock()) for name, r in file.ramp.items()}
        self.decisions: Counter[tuple[str, str]] = Counter()  # logged, by (arm, action)
        self._apply: Callable[[], str | None] = lambda: None
        self._version: Callable[[], str] = lambda: verdict.version
        self._pending = 0
        self._last = clock()
        self._deciding = any(arm.deciding for arm in self.arms.values())

    def bind(self, apply: Callable[[], str | None], version: Callable[[], str]) -> None:
        """`apply()` puts `effective()` in effect, returning its config version (None: it
        could not be applied, and said why); `version()` is the one in effect."""
        self._apply, self._version = apply, version

    def effective(self) -> Config:
        return _effective(self.file, self.arms)

    # --- the per-request path ----------------------------------------------------------

    def tick(self) -> None:
        """A request finished: decide if it is time."""
        if not self._deciding:
            return
        self._pending += 1
        now = self._clock()
        if self._pending >= EVERY_REQUESTS or now - self._last >= EVERY_SECONDS:
            self._pending, self._last = 0, now
            self.evaluate(now)

    # --- deciding ------------------------------------------------------------------------

    def evaluate(self, now: float | None = None) -> list[Decision]:
        """Run the rule for every arm still ramping; act on what it says."""
        now = self._clock() if now is None else now
        acted: list[tuple[ArmRamp, Decision]] = []
        for arm in self.arms.values():
            if not arm.deciding:
                continue
            decision = self._decide(arm, now)
            arm.last, arm.last_at = decision, datetime.now(UTC)
            if decision.action is Action.HOLD:
                if decision.overdue and not arm.overdue_logged:
                    arm.overdue_logged = True
                    acted.append((arm, decision))
                continue
            acted.append((arm, decision))
            if decision.action is Action.PROMOTE:
                arm.step, arm.since, arm.overdue_logged = arm.step + 1, now, False
                arm.step_since = datetime.now(UTC)
            elif decision.action is Action.ROLLBACK:
                arm.rolled_back = True
            else:
                arm.complete = True
        self._deciding = any(arm.deciding for arm in self.arms.values())
        self._act(acted)
        return [decision for _, decision in acted]

    def _decide(self, arm: ArmRamp, now: float) -> Decision:
        verdict = self._verdict
        baseline = verdict.experiment.baseline
        states: dict[str, ArmState] = {
            baseline: verdict.states[baseline],
            arm.name: verdict.states.get(arm.name) or ArmState(),
        }
        planned = len(verdict.experiment.arms)
        ejected_for = None
        # An arm is ejected when every one of its replicas is: since the last of them went.
        replicas = list(self._health.backends.get(arm.name, {}).values())
        ejected = [r.ejected_at for r in replicas if not r.healthy and r.ejected_at is not None]
        if replicas and len(ejected) == len(replicas):
            ejected_for = now - max(*ejected, arm.since)  # within this step
        step = step_verdict(arm.config, states, baseline, arm.name, planned)
        return decide(arm.config, arm.step, arm.since, now, step, arm.name, ejected_for)

    def _act(self, acted: list[tuple[ArmRamp, Decision]]) -> None:
        moved = {a.name for a, d in acted if d.action in (Action.PROMOTE, Action.ROLLBACK)}
        live = [a for a, _ in acted if a.name in moved and not a.config.dry_run]
        dry = [a for a, d in acted if a.config.dry_run and d.action is Action.PROMOTE]
        previous = self._version()
        version = self._apply() if live else None
        if dry and not live:  # no split change, but the next step is its own experiment
            self._verdict.reset("ramp dry run: " + ", ".join(f"{a.name} promoted" for a in dry))
            self._log.event("verdict_reset", reason=self._verdict.reason)
        for arm, decision in acted:
            changed = version is not None and arm in live
            self.decisions[arm.name, decision.action.value] += 1
            self._log.event(
                "ramp",
                backend=arm.name,
                action=decision.action.value,
                step=decision.step + 1,
                steps=len(arm.config.steps),
                split=decision.split,
                split_applied=self._applied(arm.name),
                split_file=float(self.file.routing.split.get(arm.name, 0.0)),
                dry_run=arm.config.dry_run,
                overdue=decision.overdue,
                reason=decision.reason,
                evidence=_evidence(decision.evidence),
                previous=previous if changed else None,
            )

    def _applied(self, name: str) -> float:
        arm = self.arms[name]
        if arm.config.dry_run:
            return float(self.file.routing.split.get(name, 0.0))
        return arm.split

    # --- operators: reload and reset -----------------------------------------------------

    def effective_for(self, file: Config) -> Config:
        """What `follow(file)` would put in effect, changing nothing."""
        return _effective(file, self._arms_for(file)[0])

    def follow(self, file: Config) -> list[str]:
        """A reload read `file`: keep each arm whose ramp block is unchanged, start again
        those whose block changed or is new, drop those gone. The names started again."""
        self.arms, fresh = self._arms_for(file)
        self.file = file
        self._deciding = any(arm.deciding for arm in self.arms.values())
        return fresh

    def _arms_for(self, file: Config) -> tuple[dict[str, ArmRamp], list[str]]:
        now = self._clock()
        arms, fresh = {}, []
        for name, ramp in file.ramp.items():
            arm = self.arms.get(name)
            if arm is not None and arm.config == ramp:
                arms[name] = arm
            else:
                arms[name] = ArmRamp(name, ramp, now)
                fresh.append(name)
        return arms, fresh

    def reset(self, name: str | None, source: str) -> list[str]:
        """Start ramps again at their first step: one arm's, or every one's. Raises
        `BadRequestError` for a name with no ramp."""
        if name is not None and name not in self.arms:
            ramped = ", ".join(self.arms) or "none"
            raise BadRequestError(
                f"backend {name!r} has no ramp (ramped: {ramped})", param="backend", code="no_ramp"
            )
        names = [name] if name is not None else list(self.arms)
        if not names:
            raise BadRequestError("no ramp is configured", code="no_ramp")
        now = self._clock()
        for n in names:
            self.arms[n] = ArmRamp(n, self.arms[n].config, now)
        self._deciding = True
        previous = self._version()
        self._apply()
        self._log.event("ramp_reset", backends=names, source=source, previous=previous)
        return names

    # --- what an operator reads -----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Per ramped arm, for /healthz: the step, the splits (applied and the file's), the
        last decision and why."""
        return {name: self._status(arm) for name, arm in self.arms.items()}

    def _status(self, arm: ArmRamp) -> dict[str, Any]:
        last = arm.last
        return {
            "state": arm.state,
            "step": arm.step + 1,
            "steps": list(arm.config.steps),
            "split_applied": self._applied(arm.name),
            "split_file": float(self.file.routing.split.get(arm.name, 0.0)),
            "dry_run": arm.config.dry_run,
            "rolled_back": arm.rolled_back,
            "step_since": arm.step_since.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "last_decision": None
            if last is None
            else {
                "action": last.action.value,
                "reason": last.reason,
                "overdue": last.overdue,
                "at": arm.last_at.isoformat(timespec="seconds").replace("+00:00", "Z")
                if arm.last_at
                else None,
                "evidence": _evidence(last.evidence),
            },
        }

    def collector(self, split: Callable[[], Config]) -> Collector:
        return _RampCollector(self, split)


def _evidence(evidence: Evidence | None) -> dict[str, Any] | None:
    if evidence is None:
        return None
    return {
        "metric": evidence.metric.value,
        "value": evidence.value,
        "low": evidence.low,
        "high": evidence.high,
        "n": {"arm": evidence.n, "baseline": evidence.n_baseline},
    }


class _RampCollector(Collector):
    """/metrics: the split in effect per backend, each ramp's step, its decisions."""

    def __init__(self, ramps: RampController, config: Callable[[], Config]):
        self._ramps = ramps
        self._config = config

    def collect(self) -> Iterator[Metric]:
        split = GaugeMetricFamily(
            "specproxy_split_percent",
            "The split in effect per backend: the file's, or a ramp's step",
            labels=["backend"],
        )
        for name, pct in self._config().weights():
            split.add_metric([name], pct)
        step = GaugeMetricFamily(
            "specproxy_ramp_step",
            "The ramp's step (from 1); 0 when rolled back",
            labels=["backend"],
        )
        decisions = CounterMetricFamily(
            "specproxy_ramp_decisions",
            "Ramp decisions logged, by action",
            labels=["backend", "action"],
        )
        for name, arm in self._ramps.arms.items():
            step.add_metric([name], 0 if arm.rolled_back else arm.step + 1)
            for action in Action:
                decisions.add_metric([name, action.value], self._ramps.decisions[name, action])
        yield from (split, step, decisions)
