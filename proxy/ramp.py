"""The ramp's decision rule: where one arm's ramp goes next, and why.

A ramp grows a backend's split through `steps` while the live verdict of the current
step's traffic says it is no worse, and cuts it to 0 when it hurts. Each step is its own
experiment (the split changed: the assignment probabilities did), so the verdict read at
a step is that step's, from the confidence sequences of `proxy.sequential`: valid however
often it is read, so deciding on every look is a valid test.

The rule, in order (the first that applies):

1. the arm has been ejected as unhealthy for longer than `max_step_minutes`: `rollback`
   (a failed step: it could not be measured, and it is not serving);
2. a guardrail of `rollback_when` shows harm: `rollback`. No `min_requests` wait: an
   interval that excludes "no harm" is already significant, so 20% errors roll back as
   soon as the error-rate interval leaves 0 (a few dozen requests);
3. the primary metric (decode tokens/s) is `worse`: `rollback`, for the same reason;
4. the primary meets `promote_when` and both arms have `min_requests` with a decode
   figure in this step: `promote` to the next step, or `complete` at the last;
5. otherwise `hold`; past `max_step_minutes` it still holds, and says so (`overdue`).

Pure: the caller passes the time, the ejection and the verdict. The controller
(ramp_control.py) and the log replay (ramp_replay.py) both decide with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from proxy.config import PromoteWhen, Ramp
from proxy.sequential import (
    ArmState,
    ArmVerdict,
    Guardrail,
    Interval,
    Metric,
    Primary,
    Verdict,
)
from proxy.sequential import decide as sequential_decide

ALPHA = 0.05  # as the live verdict's: the family of every arm, primary and guardrails


class Action(StrEnum):
    PROMOTE = "promote"
    HOLD = "hold"
    ROLLBACK = "rollback"
    COMPLETE = "complete"  # promoted at the last step: the ramp is over, the arm stays there


@dataclass(frozen=True)
class Evidence:
    """The interval that decided: a ratio arm / baseline for times, a difference of
    proportions for the error rate (None: too few requests for an interval)."""

    metric: Metric
    value: float | None
    low: float | None
    high: float | None
    n: int  # values on the arm's side
    n_baseline: int

    @classmethod
    def of(cls, interval: Interval) -> Evidence:
        i = interval
        return cls(i.metric, i.value, i.low, i.high, i.n, i.n_baseline)

    def describe(self) -> str:
        if self.value is None or self.low is None or self.high is None:
            return f"{self.metric.value}: no interval yet (n {self.n} vs {self.n_baseline})"
        kind = "difference" if self.metric is Metric.ERROR_RATE else "ratio"
        return (
            f"{self.metric.value} {kind} {self.value:.3g} [{self.low:.3g}, {self.high:.3g}]"
            f" (n {self.n} vs {self.n_baseline})"
        )


@dataclass(frozen=True)
class Decision:
    action: Action
    step: int  # the step it was decided at, from 0
    split: float  # the arm's split percentage after it
    reason: str
    evidence: Evidence | None  # None only when the arm had no verdict at all
    overdue: bool = False  # a hold past max_step_minutes


def step_verdict(
    ramp: Ramp, states: Mapping[str, ArmState], baseline: str, arm: str, planned_arms: int = 1
) -> Verdict:
    """The verdict of one arm's step, with the ramp's margin and guardrails. `states` hold
    at least the baseline and the arm; alpha is split over `planned_arms`, as the live
    verdict splits it over the split's arms."""
    return sequential_decide(
        {baseline: states[baseline], arm: states[arm]},
        baseline,
        alpha=ALPHA,
        margin=ramp.margin,
        guardrails=[Metric(name.value) for name in ramp.rollback_when],
        planned_arms=max(planned_arms, 1),
    )


def decide(
    ramp: Ramp,
    step: int,
    started: float,
    now: float,
    verdict: Verdict,
    arm: str,
    ejected_for: float | None = None,
) -> Decision:
    """What `arm`'s ramp does now, at `step` (from 0), begun at `started` (seconds, the
    same clock as `now`), given the verdict of this step's traffic and how long the arm
    has been ejected (None: it is healthy)."""
    window = ramp.max_step_minutes * 60.0
    arm_verdict = verdict.arms.get(arm)
    primary = Evidence.of(arm_verdict.primary.interval) if arm_verdict else None
    if ejected_for is not None and ejected_for > window:
        reason = f"ejected as unhealthy for {ejected_for:.0f} s, longer than a step ({window:g} s)"
        return Decision(Action.ROLLBACK, step, 0.0, reason, primary)
    if arm_verdict is None:
        return _hold(ramp, step, now - started, "no traffic on the arm in this step", None)
    harmed = _harm(ramp, arm_verdict)
    if harmed is not None:
        return Decision(Action.ROLLBACK, step, 0.0, f"harm: {harmed.describe()}", harmed)
    assert primary is not None
    outcome = arm_verdict.primary.outcome
    fewest = min(primary.n, primary.n_baseline)
    if outcome is Primary.WORSE and fewest >= ramp.min_requests:
        return Decision(Action.ROLLBACK, step, 0.0, f"worse: {primary.describe()}", primary)
    meets = outcome is Primary.BETTER or (
        outcome is Primary.NOT_WORSE and ramp.promote_when is PromoteWhen.NOT_WORSE
    )
    if meets and fewest >= ramp.min_requests:
        last = step + 1 >= len(ramp.steps)
        action = Action.COMPLETE if last else Action.PROMOTE
        split = float(ramp.steps[step if last else step + 1])
        return Decision(action, step, split, f"{outcome.value}: {primary.describe()}", primary)
    if meets:
        why = f"{outcome.value}, but {fewest} of {ramp.min_requests} requests on a side"
    else:
        wanted = ramp.promote_when.value
        why = f"{outcome.value}, not yet {wanted}: {primary.describe()}"
    return _hold(ramp, step, now - started, why, primary)


def _harm(ramp: Ramp, verdict: ArmVerdict) -> Evidence | None:
    for name in ramp.rollback_when:
        guard = verdict.guardrails.get(Metric(name.value))
        if guard is None or guard.outcome is not Guardrail.HARM:
            continue
        interval = guard.interval
        if interval.metric is Metric.ERROR_RATE or min(interval.n, interval.n_baseline) >= (
            ramp.min_requests
        ):
            return Evidence.of(interval)
    return None


def _hold(ramp: Ramp, step: int, elapsed: float, why: str, evidence: Evidence | None) -> Decision:
    split = float(ramp.steps[step])
    if elapsed > ramp.max_step_minutes * 60.0:
        why = f"undecided for {elapsed / 60:.0f} min, past max_step_minutes: {why}"
        return Decision(Action.HOLD, step, split, why, evidence, overdue=True)
    return Decision(Action.HOLD, step, split, why, evidence)
