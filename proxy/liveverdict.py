"""The A/B verdict of the traffic seen since the experiment started, for `GET /verdict`.

The statistics are `proxy.sequential`'s: confidence sequences, valid however often they
are read, so watching this endpoint until it says `better` is a valid test. Memory is one
`ArmState` per compared backend, each O(1) per request up to its cap of tracked sessions.

What counts, for which arm and as what, is the report's rule too (`proxy.itt`, intention
to treat): a request counts for the arm it was assigned to at random, a move off that arm
by failover is the arm's error, only the backend's errors are errors (a client that
stopped reading or left, and a shutdown cancellation, count for nothing), and only under
a config version of this experiment. TTFT is a stream's only: a non-stream answer's first
byte is its last.

An experiment is a baseline, a split over a set of backends (the assignment
probabilities), what each compared arm is (its url or replicas, model and launch), and
the sticky header (the unit of assignment). A reload that changes any of them starts a
new one (the earlier data were drawn under other probabilities, or measured other
servers); a reload that changes anything else keeps it, and the new config version's
requests count with the old ones.

The sample ratio check in the document is sequential too (`sequential.sample_ratios`):
valid however often `/verdict` is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from proxy.accesslog import RequestRecord
from proxy.config import Config
from proxy.itt import Outcome, assigned
from proxy.sequential import SESSION_CAP, ArmState, Observation, Verdict, decide
from proxy.verdict_json import experiment_json

ALPHA = 0.05  # for the whole family: every arm, the primary metric and each guardrail
MARGIN = 0.05  # not_worse: decode speed at most 5% below the baseline's


@dataclass(frozen=True)
class Experiment:
    """Who is compared with whom, at which assignment probabilities, by what unit."""

    baseline: str
    split: tuple[tuple[str, float], ...]  # every backend by name, 0 when out of the split
    # What each compared arm is, as JSON text: url or replicas, model, launch. Limits,
    # timeouts and health settings are how the proxy treats the arm, not the arm.
    servers: tuple[tuple[str, str], ...] = ()
    sticky_header: str | None = None  # lowercase: header names are case-insensitive

    @classmethod
    def of(cls, config: Config) -> Experiment:
        split = tuple(sorted(config.weights()))
        compared = {config.baseline} | {name for name, pct in split if pct > 0}
        servers = tuple(
            (name, _definition(config, name)) for name in sorted(compared & config.backends.keys())
        )
        header = config.routing.sticky_header
        return cls(config.baseline, split, servers, header.lower() if header else None)

    @property
    def arms(self) -> tuple[str, ...]:
        """The planned arms: every backend with a share of the split, but the baseline."""
        return tuple(name for name, pct in self.split if pct > 0 and name != self.baseline)

    @property
    def expected_pct(self) -> dict[str, float]:
        return dict(self.split)


def _definition(config: Config, name: str) -> str:
    fields = {"url", "replicas", "model", "launch"}
    return json.dumps(config.backends[name].model_dump(mode="json", include=fields), sort_keys=True)


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
        counted = assigned(
            record.reason,
            record.backend,
            record.fallback_from,
            error=record.error,
            status=record.status,
            client_disconnected=record.client_disconnected,
            behind_shadow=record.behind_shadow,
        )
        if counted is None or record.config_version not in self.versions:
            return
        arm, outcome = counted
        state = self.states.get(arm)
        if state is None:
            return
        if outcome is Outcome.FAILED:
            state.observe(Observation(True, session=record.session))
        else:
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
        self._start(
            experiment, version, "reload changed the split, baseline, backends or sticky header"
        )
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
