"""The A/B verdict of the traffic seen since the experiment started, for `GET /verdict`.

The statistics are `proxy.sequential`'s: confidence sequences, valid however often they
are read, so watching this endpoint until it says `better` is a valid test. Memory is one
`ArmState` per compared backend, each O(1) per request up to its cap of tracked sessions.

What counts is what the report counts as A/B data (`logread.Requests.comparable`):
requests routed at random (`Reason.is_experiment`: split or sticky, so not forced by
header and not moved by failover), not sent behind a shadow, and under a config version
of this experiment. A failed one counts for the error rate only; one whose client left
without an error counts for nothing (clients give up more on the slower arm). TTFT is
a stream's only: a non-stream answer's first byte is its last.

An experiment is a baseline and a split over a set of backends: the assignment
probabilities. A reload that changes any of them starts a new one (the earlier data were
drawn under other probabilities); a reload that changes anything else keeps it, and the
new config version's requests count with the old ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from proxy.accesslog import RequestRecord
from proxy.config import Config
from proxy.sequential import SESSION_CAP, ArmState, Observation, Verdict, decide
from proxy.verdict_json import experiment_json

ALPHA = 0.05  # for the whole family: every arm, the primary metric and each guardrail
MARGIN = 0.05  # not_worse: decode speed at most 5% below the baseline's


@dataclass(frozen=True)
class Experiment:
    """Who is compared with whom, at which assignment probabilities."""

    baseline: str
    split: tuple[tuple[str, float], ...]  # every backend by name, 0 when out of the split

    @classmethod
    def of(cls, config: Config) -> Experiment:
        return cls(config.baseline, tuple(sorted(config.weights())))

    @property
    def arms(self) -> tuple[str, ...]:
        """The planned arms: every backend with a share of the split, but the baseline."""
        return tuple(name for name, pct in self.split if pct > 0 and name != self.baseline)

    @property
    def expected_pct(self) -> dict[str, float]:
        return dict(self.split)


class LiveVerdict:
    def __init__(self, config: Config, version: str, *, session_cap: int = SESSION_CAP):
        self._session_cap = session_cap
        self._start(Experiment.of(config), version, "start")

    def _start(self, experiment: Experiment, version: str, reason: str) -> None:
        self.experiment = experiment
        self.since = datetime.now(UTC)
        self.reason = reason
        self.version = version  # the latest config version of this experiment
        self.versions = {version}  # every one whose requests count
        names = (experiment.baseline, *experiment.arms)
        self.states = {name: ArmState(session_cap=self._session_cap) for name in names}

    def observe(self, record: RequestRecord) -> None:
        reason, backend = record.reason, record.backend
        if reason is None or backend is None or not reason.is_experiment or record.behind_shadow:
            return
        state = self.states.get(backend)
        if state is None or record.config_version not in self.versions:
            return
        if record.error is not None or record.status != 200:
            if record.error is None and record.client_disconnected:
                return  # the client left, not the backend failing
            state.observe(Observation(True, session=record.session))
        elif not record.client_disconnected:
            ttft = record.ttft_ms if record.stream else None
            state.observe(
                Observation(False, record.decode_tps, ttft, record.latency_ms, record.session)
            )

    def follow(self, config: Config, version: str) -> bool:
        """A reload applied `config`: whether it started a new experiment."""
        experiment = Experiment.of(config)
        if experiment == self.experiment:
            self.version = version
            self.versions.add(version)
            return False
        self._start(experiment, version, "reload changed the split, baseline or backends")
        return True

    def reset(self, reason: str) -> None:
        """Start again under the same experiment: the data so far are dropped. Requests in
        flight now still count when they finish."""
        self._start(self.experiment, self.version, reason)

    def snapshot(self) -> Verdict:
        return decide(
            self.states,
            self.experiment.baseline,
            alpha=ALPHA,
            margin=MARGIN,
            planned_arms=len(self.experiment.arms) or None,
        )

    def document(self) -> dict[str, Any]:
        """`GET /verdict`: the verdict as the report gives it (verdict_json.py), and since
        when and why."""
        body = experiment_json(self.snapshot(), self.states, self.experiment.expected_pct)
        return {
            "schema": body.pop("schema"),
            "since": self.since.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "started_by": self.reason,
            "config_version": self.version,
            "config_versions": sorted(self.versions),
            **body,
        }
