"""routes.yaml -> a typed, frozen `Config`.

The file is parsed once at startup. Every problem becomes one `ConfigError` whose message
names the key path and what is wrong (`routing.split: percentages add up to 90, not 100`),
never a traceback from deep inside pydantic or yaml.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import orjson
import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from proxy.errors import ConfigError

# Names end up in log lines, headers and URLs: keep them plain.
BackendName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=64)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Listen(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)


class Timeouts(_Frozen):
    """Seconds, per backend. There is no total timeout: a long healthy stream is never cut off.

    - connect:     to open a TCP connection.
    - first_token: from sending the request to the first generated token of a stream, or to
                   the whole answer of a non-stream request (mlx_lm.server sends it all at
                   once, at the end). Prefill of a long prompt on a CPU can take minutes.
    - idle:        the longest silence between two chunks once a stream has started.
    """

    connect: float = Field(default=5.0, gt=0)
    first_token: float = Field(default=600.0, gt=0)
    idle: float = Field(default=60.0, gt=0)


class Health(_Frozen):
    """Outlier ejection and active probing of a backend's `GET /health`."""

    eject_after: int = Field(default=3, ge=1)  # consecutive failures (a refusal counts all)
    probe_interval: float = Field(default=2.0, gt=0)  # seconds between probes
    probe_timeout: float = Field(default=2.0, gt=0)
    # An ejected backend stays out at least this long before a passing probe readmits it,
    # so one that answers /health but fails requests does not flap on every probe.
    min_eject: float = Field(default=5.0, ge=0)


class Launch(_Frozen):
    """How the proxy starts a backend itself: an mlx_lm.server for `model` (with a draft model
    when `draft_model` is set), or any OpenAI-compatible server given as `command`, whose
    arguments may use {host}, {port} and {python} (this Python, to reach its packages)."""

    model: str | None = None
    draft_model: str | None = None
    num_draft_tokens: int | None = Field(default=None, ge=1)
    extra_args: list[str] = []
    command: list[str] | None = Field(default=None, min_length=1)
    env: dict[str, str] = {}
    # CPU loading of a large model can take minutes; a tiny one, seconds.
    startup_timeout: float = Field(default=600.0, gt=0)
    log: Path | None = None  # default: logs/backends/<name>.log (<name>-<i>.log for replicas)
    # Servers to start, on consecutive ports from the backend's `url`: its replicas.
    replicas: int = Field(default=1, ge=1, le=64)

    @model_validator(mode="after")
    def _one_way_to_start(self) -> Launch:
        if self.model is None and self.command is None:
            raise ValueError("needs `model` (an mlx_lm.server) or `command` (any server)")
        if self.model is not None and self.command is not None:
            raise ValueError("give either `model` or `command`, not both")
        if self.command is not None and (self.draft_model or self.num_draft_tokens):
            raise ValueError("draft_model and num_draft_tokens go with `model`, not `command`")
        if self.num_draft_tokens is not None and self.draft_model is None:
            raise ValueError("num_draft_tokens needs a draft_model")
        return self


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    # Backends are local servers: the pool speaks plain HTTP only.
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"must be an http:// URL like http://127.0.0.1:8080, not {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        # The proxy appends the client's path (/v1/chat/completions) itself.
        raise ValueError(f"must be just scheme, host and port, not {url!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"bad port in {url!r}") from exc
    return url.rstrip("/")


class Replica(_Frozen):
    """One server of a backend's fleet: see replicas.py."""

    url: str

    _check_url = field_validator("url")(_check_url)


class Backend(_Frozen):
    """One arm of the experiment: one server (`url`), or a fleet of them (`replicas`, or
    `launch.replicas` started on consecutive ports from `url`)."""

    url: str | None = None
    replicas: list[Replica] | None = Field(default=None, min_length=1)
    # What goes in the upstream body's `model` field. mlx_lm.server tries to load any model
    # name it does not know, so by default we send the name of the model it was started with.
    model: str = "default_model"
    timeouts: Timeouts = Timeouts()
    # Where its split and sticky traffic goes while it is unhealthy or full, and where a
    # request that fails before any byte reached the client is retried. Unset: the
    # baseline (none for the baseline itself); `null`: nowhere.
    fallback: BackendName | None = None
    max_in_flight: int | None = Field(default=None, ge=1)  # unset: no limit
    max_queue: int = Field(default=16, ge=0)  # requests that may wait for a slot
    queue_timeout: float = Field(default=30.0, gt=0)  # seconds one may wait
    health: Health = Health()
    launch: Launch | None = None

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str | None) -> str | None:
        return None if url is None else _check_url(url)

    @model_validator(mode="after")
    def _one_way_to_address(self) -> Backend:
        if self.url is None and self.replicas is None:
            raise ValueError("needs `url` (one server) or `replicas` (a list of `url:`)")
        if self.url is not None and self.replicas is not None:
            raise ValueError("give either `url` or `replicas`, not both")
        if self.launch is not None and self.replicas is not None:
            raise ValueError(
                "a launched backend gives `url` and `launch.replicas` (started on consecutive"
                " ports from `url`), not a `replicas` list"
            )
        urls = self.urls
        if len(set(urls)) != len(urls):
            twice = next(url for url in urls if urls.count(url) > 1)
            raise ValueError(f"replicas: {twice} is listed twice")
        if self.launch is not None and self.launch.replicas > 1:
            last = port_of(self.urls[0]) + self.launch.replicas - 1
            if last > 65535:
                raise ValueError(f"launch.replicas: the last one's port would be {last}")
        return self

    @property
    def host(self) -> str:
        """The first replica's host (the only one's, for a backend of one server)."""
        return host_of(self.urls[0])

    @property
    def port(self) -> int:
        """The first replica's port."""
        return port_of(self.urls[0])

    @property
    def urls(self) -> tuple[str, ...]:
        """Every replica's URL, in config order (a launched backend's: consecutive ports)."""
        if self.replicas is not None:
            return tuple(replica.url for replica in self.replicas)
        assert self.url is not None
        count = self.launch.replicas if self.launch is not None else 1
        if count == 1:
            return (self.url,)
        netloc = urlsplit(self.url).netloc
        host = netloc.rsplit(":", 1)[0] if netloc.endswith(f":{port_of(self.url)}") else netloc
        first = port_of(self.url)
        return tuple(f"http://{host}:{first + i}" for i in range(count))


def host_of(url: str) -> str:
    return urlsplit(url).hostname or "127.0.0.1"


def port_of(url: str) -> int:
    return urlsplit(url).port or 80


# Headers the proxy needs for itself or must forward untouched: not usable for routing.
_RESERVED_HEADERS = frozenset(
    {
        "authorization",
        "host",
        "content-length",
        "content-type",
        "x-request-id",
        "connection",
        "transfer-encoding",
        "te",
        "upgrade",
        "keep-alive",
        "trailer",
        "expect",
    }
)
HeaderName = Annotated[str, Field(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$", max_length=128)]


class Routing(_Frozen):
    # The reference arm: every backend's default fallback. Unset: the backend named
    # "baseline", else the first one listed.
    baseline: BackendName | None = None
    header: HeaderName = "X-Backend"
    sticky_header: HeaderName | None = None
    # Strict: YAML's `true` or "50" is a mistake here, not a percentage.
    split: dict[
        BackendName, Annotated[float, Field(strict=True)] | Annotated[int, Field(strict=True)]
    ]

    @field_validator("header", "sticky_header")
    @classmethod
    def _check_header(cls, name: str | None) -> str | None:
        if name is not None and name.lower() in _RESERVED_HEADERS:
            raise ValueError(f"{name} is a header the proxy must forward or set itself")
        return name

    @model_validator(mode="after")
    def _distinct_headers(self) -> Routing:
        if self.sticky_header and self.sticky_header.lower() == self.header.lower():
            raise ValueError("sticky_header must differ from header")
        return self

    @field_validator("split")
    @classmethod
    def _check_split(cls, split: dict[str, float | int]) -> dict[str, float | int]:
        for name, weight in split.items():
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"{name}: percentage must be between 0 and 100, not {weight}")
        total = sum(split.values())
        if not math.isclose(total, 100.0, abs_tol=1e-6):
            raise ValueError(f"percentages add up to {total:g}, not 100")
        return split


class Logging(_Frozen):
    path: Path | None = Path("logs/requests.jsonl")
    stdout: bool = True
    # The environment variable holding the key of the sessions' hashes (see sessions.py).
    # Unset: a key file beside the log file, made on the first start.
    session_key_env: str | None = None


class Limits(_Frozen):
    """What one client or one backend may make the proxy hold. Defaults are generous for
    LLM traffic and small against a hostile peer."""

    # The client's request body. (Chunked trailers count against the server's 64 KiB head cap.)
    max_body_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    # Seconds from the end of a request's head for its whole body to arrive: a client
    # that announces a body and never sends it would hold its connection forever.
    body_timeout: float = Field(default=30.0, gt=0)
    # Seconds a client may leave the next chunk of its answer unaccepted (it stopped
    # reading) before the proxy drops it: it holds a backend slot all that time.
    write_timeout: float = Field(default=60.0, gt=0)
    # A client's x-request-id longer than this (or not printable ASCII) is replaced by a
    # generated one: it is echoed, forwarded and written to every log line.
    max_request_id_length: int = Field(default=200, ge=16, le=4096)
    # A backend's answer: the status line and headers, and a non-stream body, which the
    # proxy reads whole (a stream's events pass through and are not counted).
    max_response_head_bytes: int = Field(default=64 * 1024, ge=1024)
    max_response_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # Open connections to one backend, idle and busy; a request waits (within its connect
    # timeout) for one to be free.
    max_connections_per_backend: int = Field(default=1024, ge=1)


class Auth(_Frozen):
    """Client API keys (`Authorization: Bearer <key>`), and an admin token for /admin/*.
    Keys come from the file or from environment variables (comma-separated), which
    auth.resolve_keys reads. SecretStr keeps them out of reprs and logs."""

    api_keys: list[SecretStr] = []
    api_keys_env: str | None = None
    admin_token: SecretStr | None = None
    admin_token_env: str | None = None

    @field_validator("api_keys")
    @classmethod
    def _no_empty_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        if any(not key.get_secret_value().strip() for key in keys):
            raise ValueError("an API key must not be empty")
        return keys

    @field_validator("admin_token")
    @classmethod
    def _no_empty_token(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and not token.get_secret_value().strip():
            raise ValueError("the admin token must not be empty")
        return token


class Shutdown(_Frozen):
    # On SIGTERM: stop accepting, let in-flight requests finish for up to this long.
    grace_seconds: float = Field(default=30.0, ge=0)


class Shadow(_Frozen):
    """Mirror a sample of greedy requests served by `from` to `to`, after the client has its
    answer, and compare the two completions."""

    source: BackendName = Field(alias="from")
    target: BackendName = Field(alias="to")
    sample: float = Field(default=0.05, ge=0, le=1)
    # Shadows never queue: one is dropped when the target already has this many requests.
    max_in_flight: int = Field(default=1, ge=1)


class PromoteWhen(StrEnum):
    NOT_WORSE = "not_worse"  # decode speed non-inferior within the margin
    BETTER = "better"  # decode speed significantly faster


class RampGuardrail(StrEnum):
    """The guardrails a ramp may roll back on: `proxy.sequential.GUARDRAILS`, by name."""

    ERROR_RATE = "error_rate"
    TTFT_MS = "ttft_ms"
    LATENCY_MS = "latency_ms"


class Ramp(_Frozen):
    """Grow one backend's split step by step while the live verdict says it is no worse,
    and cut it to 0 when it hurts (see ramp.py for the rule, ramp_control.py for acting)."""

    # Its split percentage at each step; the baseline gets the rest. Strict: YAML's `true`
    # is not a percentage.
    steps: list[Annotated[float, Field(strict=True)] | Annotated[int, Field(strict=True)]] = Field(
        min_length=1
    )
    min_requests: int = Field(default=200, ge=10)  # per arm within a step, to promote
    promote_when: PromoteWhen = PromoteWhen.NOT_WORSE
    margin: float = Field(default=0.05, gt=0, lt=0.5)  # not_worse: at most 5% slower
    rollback_when: list[RampGuardrail] = list(RampGuardrail)
    max_step_minutes: float = Field(default=60.0, gt=0)  # undecided this long: say so
    dry_run: bool = False  # decide and log, change no split

    @field_validator("steps")
    @classmethod
    def _check_steps(cls, steps: list[float | int]) -> list[float | int]:
        for step in steps:
            if not (math.isfinite(step) and 1 <= step <= 100):
                raise ValueError(f"each step must be a percentage from 1 to 100, not {step}")
        for before, after in itertools.pairwise(steps):
            if after <= before:
                raise ValueError(f"steps must increase strictly: {after:g} follows {before:g}")
        return steps

    @field_validator("rollback_when")
    @classmethod
    def _no_repeats(cls, names: list[RampGuardrail]) -> list[RampGuardrail]:
        if len(set(names)) != len(names):
            raise ValueError("a guardrail is named twice")
        return names


class Config(_Frozen):
    listen: Listen = Listen()
    model: str = Field(min_length=1)
    backends: dict[BackendName, Backend] = Field(min_length=1)
    routing: Routing
    logging: Logging = Logging()
    limits: Limits = Limits()
    shadow: Shadow | None = None
    auth: Auth = Auth()
    shutdown: Shutdown = Shutdown()
    ramp: dict[BackendName, Ramp] = {}

    @model_validator(mode="after")
    def _fallbacks_name_backends(self) -> Config:
        if self.routing.baseline is not None and self.routing.baseline not in self.backends:
            raise ValueError(f"routing.baseline: unknown backend {self.routing.baseline}")
        for name, backend in self.backends.items():
            if backend.fallback is None:
                continue
            if backend.fallback not in self.backends:
                raise ValueError(f"backends.{name}.fallback: unknown backend {backend.fallback}")
            if backend.fallback == name:
                raise ValueError(f"backends.{name}.fallback: a backend cannot be its own fallback")
        return self

    @property
    def baseline(self) -> str:
        if self.routing.baseline is not None:
            return self.routing.baseline
        return "baseline" if "baseline" in self.backends else next(iter(self.backends))

    def fallback_of(self, name: str) -> str | None:
        """Where `name`'s traffic goes when it cannot serve (one hop: never chained)."""
        backend = self.backends[name]
        if "fallback" in backend.model_fields_set:
            return backend.fallback
        return None if name == self.baseline else self.baseline

    def version(self) -> str:
        """A short hash of the effective config, on every log line: a report never mixes
        two splits unknowingly. Secrets are left out (a short hash of a key is a leak)."""
        data = self.model_dump(mode="json", by_alias=True, exclude={"auth"})
        data["auth"] = bool(self.auth.api_keys or self.auth.api_keys_env)
        return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]

    @model_validator(mode="after")
    def _shadow_names_backends(self) -> Config:
        if self.shadow is not None:
            for key, name in (("from", self.shadow.source), ("to", self.shadow.target)):
                if name not in self.backends:
                    raise ValueError(f"shadow.{key}: unknown backend {name}")
            if self.shadow.source == self.shadow.target:
                raise ValueError("shadow: `from` and `to` must be different backends")
        return self

    @model_validator(mode="after")
    def _split_names_backends(self) -> Config:
        unknown = sorted(set(self.routing.split) - set(self.backends))
        if unknown:
            raise ValueError(
                f"routing.split: unknown backend {', '.join(unknown)}"
                f" (backends are: {', '.join(self.backends)})"
            )
        return self

    @model_validator(mode="after")
    def _ramps_name_arms(self) -> Config:
        for name in self.ramp:
            if name not in self.backends:
                raise ValueError(f"ramp.{name}: unknown backend {name}")
            if name == self.baseline:
                raise ValueError(f"ramp.{name}: the baseline cannot be ramped (it gets the rest)")
        # At every ramp's last step the baseline must keep a share >= 0.
        others = sum(
            pct
            for name, pct in self.routing.split.items()
            if name != self.baseline and name not in self.ramp
        )
        top = others + sum(ramp.steps[-1] for ramp in self.ramp.values())
        if top > 100 + 1e-6:
            raise ValueError(
                f"ramp: the last steps ({top - others:g}%) and the other arms' split"
                f" ({others:g}%) add up to {top:g}%, over 100: nothing left for the baseline"
            )
        return self

    def weights(self) -> list[tuple[str, float]]:
        """Every backend with its split percentage (0 when the split leaves it out)."""
        return [(name, float(self.routing.split.get(name, 0.0))) for name in self.backends]


def load_config(path: str | Path) -> Config:
    """Read and validate routes.yaml; raise `ConfigError` with one readable message."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # safe_load, but strict about keys
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, source=str(path))


def parse_config(data: Any, *, source: str = "config") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {_kind(data)}")
    try:
        return Config.model_validate(data)
    except pydantic.ValidationError as exc:
        problems = dict.fromkeys(_describe(e) for e in exc.errors())  # unique, in order
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


def _describe(error: Any) -> str:
    """One pydantic error as `key.path: problem`."""
    loc = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "string_pattern_mismatch" and error["loc"][-1] == "[key]":
        loc = ".".join(str(part) for part in error["loc"][:-2])
        message = f"{error['input']!r} is not a usable name (letters, digits, _ . - only)"
    elif error["type"] == "string_pattern_mismatch":
        message = f"{error['input']!r} is not a valid header name"
    elif error["type"] in ("float_type", "int_type") and error["loc"][-1] in ("float", "int"):
        loc = ".".join(str(part) for part in error["loc"][:-1])  # not one per number type
        message = f"percentage must be a number, not {error['input']!r}"
    elif error["type"] == "missing":
        message = "required key is missing"
    if not loc:  # a model-level check names its own path
        return message
    return f"{loc}: {message}"


def _kind(value: Any) -> str:
    return "an empty file" if value is None else type(value).__name__


# Subclassing Any is an error when types-PyYAML (a dev dependency) is not installed.
class _StrictLoader(yaml.SafeLoader):  # type: ignore[misc, unused-ignore]
    """`yaml.safe_load`'s loader, except that a key given twice in one mapping is an error.
    safe_load keeps the last one silently, and the user then sees an error about the wrong
    block. Merge keys (`<<`) may still override: they are not checked."""

    def construct_document(self, node: yaml.Node) -> Any:
        _refuse_duplicate_keys(node, (), set())
        return super().construct_document(node)


def _refuse_duplicate_keys(node: yaml.Node, path: tuple[str, ...], seen: set[int]) -> None:
    if id(node) in seen:  # an alias: checked once, where its anchor is
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_duplicate_keys(item, (*path, str(index)), seen)
    elif isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], yaml.Node] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):  # a list or mapping: safe_load refuses it
                continue
            # `a` and `"a"` are the same key; `1` and `"1"` are not (the tag tells them apart).
            earlier = first.setdefault((key.tag, key.value), key)
            if earlier is not key and key.tag != "tag:yaml.org,2002:merge":
                line = earlier.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    problem=f"{'.'.join((*path, key.value))} is given twice (first on line {line})",
                    problem_mark=key.start_mark,
                )
            _refuse_duplicate_keys(value, (*path, key.value), seen)
