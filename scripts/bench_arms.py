"""Benchmark the proxy's backends ("arms") against each other on one fixed prompt set.

Every prompt goes through the proxy to every arm, forced with the `X-Backend` header, as a
greedy stream (`temperature: 0`, `stream: true`, `max_tokens`, usage included). The report
gives, per arm, latency, TTFT and decode speed, the ratio of its median decode speed to the
baseline's, and how many of its outputs equal the baseline's text for the same prompt.

Why sequential and in rotation: a backend with a draft model serves one request at a time, and
all arms share the machine's CPUs, so concurrent requests would measure contention, not the
arms. Requests go one at a time: for each round, for each prompt, each arm in turn, the arm
order rotating by one from one (round, prompt) to the next, so slow drift of the machine (heat,
other load) hits every arm alike. Warm-up requests per arm (not counted) come first.

Figures, all measured by this client with `time.perf_counter()` (so they include the proxy):
- latency: request sent -> end of the stream (`[DONE]`);
- TTFT: request sent -> first chunk carrying generated content;
- decode tok/s: (completion_tokens - 1) / (last content chunk - first content chunk): decode
  without prefill, what a draft model changes; completion_tokens from the usage chunk;
- match: the text equals the baseline's first output for that prompt, else the position of the
  first differing character is kept (so the baseline's own figure is its repeatability).

    python scripts/bench_arms.py --url http://127.0.0.1:8000
    python scripts/bench_arms.py --backends baseline,spec2 --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

DEFAULT_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "List five fruits that are red.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in a few paragraphs how a hash table works and why lookups are fast on average.",
    "Translate 'good morning, how are you?' into Spanish and German.",
    "Give three tips for writing clear commit messages.",
    "Write a SQL query that counts orders per customer, highest count first.",
    "Why is the sky blue? Explain it to a ten-year-old.",
)
GREEDY_STREAM = {"stream": True, "temperature": 0, "stream_options": {"include_usage": True}}
CONNECT_TIMEOUT_S = 10.0
HEALTH_TIMEOUT_S = 10.0
BAR_WIDTH = 30
Step = tuple[str, int, int, str]  # phase ("warmup" or "measure"), round, prompt, backend


@dataclass(slots=True)
class Sample:
    """One request: what was asked, and what the client measured."""

    phase: str  # "warmup" or "measure"
    round: int
    prompt: int
    backend: str
    served_by: str | None = None  # the x-backend response header
    status: int | None = None
    error: str | None = None
    ttft_ms: float | None = None
    latency_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    decode_tps: float | None = None
    text: str = ""
    matches_baseline: bool | None = None
    diverges_at: int | None = None


class DeadlineReached(Exception):
    """The time limit passed while a request was running."""


def discover(client: httpx.Client, url: str) -> tuple[str, list[str]]:
    """The proxy's public model name and its backends, in routes.yaml order."""
    try:
        response = client.get(f"{url}/healthz", timeout=HEALTH_TIMEOUT_S)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise SystemExit(f"error: no proxy at {url}: {exc}") from exc
    body = response.json()
    return body["model"], list(body["backends"])


def load_prompts(path: Path | None) -> list[str]:
    """A JSON list of strings, or a text file with one prompt per non-empty line."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        prompts = json.loads(text)
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise SystemExit(f"error: {path}: expected a JSON list of strings")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"error: {path}: no prompts")
    return prompts


def schedule(backends: list[str], n_prompts: int, rounds: int, warmup: int) -> list[Step]:
    """The run order: `warmup` uncounted requests per arm, then the rounds, in which the arm
    order rotates by one from each (round, prompt) to the next."""
    plan = [("warmup", i, i % n_prompts, b) for i in range(warmup) for b in backends]
    for rnd in range(rounds):
        for prompt in range(n_prompts):
            shift = (rnd * n_prompts + prompt) % len(backends)
            plan += [("measure", rnd, prompt, b) for b in backends[shift:] + backends[:shift]]
    return plan


def request_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """A greedy streaming chat completion that reports its token usage."""
    messages = [{"role": "user", "content": prompt}]
    return {"model": model, "messages": messages, "max_tokens": max_tokens, **GREEDY_STREAM}


def read_stream(response: httpx.Response, sample: Sample, deadline: float) -> list[float]:
    """Collect the text and usage of an SSE stream into `sample`; return each content chunk's
    arrival time. Sets `sample.error` on an error event or a stream without `[DONE]`."""
    arrivals: list[float] = []
    for line in response.iter_lines():
        now = time.perf_counter()
        if time.monotonic() > deadline:
            raise DeadlineReached
        if not line.startswith("data:"):
            continue  # blank separators and `: keepalive` comments
        if (data := line[5:].strip()) == "[DONE]":
            return arrivals
        event = json.loads(data)
        if "error" in event:
            sample.error = f"stream error: {event['error']}"
            return arrivals
        if usage := event.get("usage"):
            sample.prompt_tokens = usage.get("prompt_tokens")
            sample.completion_tokens = usage.get("completion_tokens")
        for choice in event.get("choices") or []:
            if content := (choice.get("delta") or {}).get("content"):
                sample.text += content
                arrivals.append(now)
    sample.error = "stream ended without [DONE]"
    return arrivals


def run_request(
    client: httpx.Client, url: str, body: dict[str, Any], sample: Sample, deadline: float
) -> None:
    """Send one streaming request and fill in `sample`; raise DeadlineReached past `deadline`."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlineReached
    timeout = httpx.Timeout(remaining, connect=min(remaining, CONNECT_TIMEOUT_S))
    headers = {"X-Backend": sample.backend}
    started = time.perf_counter()
    try:
        with client.stream("POST", url, json=body, headers=headers, timeout=timeout) as response:
            sample.status = response.status_code
            sample.served_by = response.headers.get("x-backend")
            if response.status_code != 200:
                sample.error = f"HTTP {response.status_code}: {response.read()[:200]!r}"
                return
            arrivals = read_stream(response, sample, deadline)
    except httpx.HTTPError as exc:
        if isinstance(exc, httpx.TimeoutException) and time.monotonic() >= deadline - 1.0:
            raise DeadlineReached from exc  # the timeout was the time left
        sample.error = f"{type(exc).__name__}: {exc}"
        return
    sample.latency_ms = (time.perf_counter() - started) * 1000
    if sample.error is None and sample.served_by != sample.backend:
        sample.error = f"served by {sample.served_by!r}"
    if arrivals:
        sample.ttft_ms = (arrivals[0] - started) * 1000
        tokens = sample.completion_tokens or 0
        if tokens >= 2 and arrivals[-1] > arrivals[0]:
            sample.decode_tps = (tokens - 1) / (arrivals[-1] - arrivals[0])


def progress(done: int, total: int, started: float, label: str) -> None:
    """A one-line progress bar on stderr."""
    filled = BAR_WIDTH * done // max(total, 1)
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    elapsed = time.monotonic() - started
    sys.stderr.write(f"\r[{bar}] {done}/{total} {elapsed:6.1f}s  {label:<32.32}")
    sys.stderr.flush()


def first_divergence(reference: str, text: str) -> int | None:
    """The first character position where the two differ; None if they are equal."""
    if reference == text:
        return None
    shorter = min(len(reference), len(text))
    return next((i for i in range(shorter) if reference[i] != text[i]), shorter)


def check_outputs(samples: list[Sample], baseline: str) -> None:
    """Mark each successful sample as matching the baseline's first output for its prompt."""
    reference: dict[int, str] = {}
    for s in samples:
        if s.backend == baseline and s.error is None:
            reference.setdefault(s.prompt, s.text)
    for s in samples:
        if s.error is None and s.prompt in reference:
            s.diverges_at = first_divergence(reference[s.prompt], s.text)
            s.matches_baseline = s.diverges_at is None


def divergence_table(
    samples: list[Sample], backends: list[str], n_prompts: int
) -> list[dict[str, str | None]]:
    """Per prompt and arm: "same", "@<earliest divergence>", or None when nothing compared."""
    rows = []
    for prompt in range(n_prompts):
        row: dict[str, str | None] = {}
        for b in backends:
            checked = [s for s in samples if s.prompt == prompt and s.backend == b]
            checked = [s for s in checked if s.matches_baseline is not None]
            diverged = [s.diverges_at for s in checked if s.diverges_at is not None]
            row[b] = None if not checked else f"@{min(diverged)}" if diverged else "same"
        rows.append(row)
    return rows


def summarise(
    samples: list[Sample], backends: list[str], baseline: str
) -> dict[str, dict[str, Any]]:
    """Per backend: counts, latency, TTFT, decode speed and output match figures."""
    summary: dict[str, dict[str, Any]] = {}
    for b in backends:
        mine = [s for s in samples if s.backend == b]
        good = [s for s in mine if s.error is None]
        compared = [s for s in good if s.matches_baseline is not None]
        figures: dict[str, Any] = {"n": len(good), "errors": len(mine) - len(good)}
        for key in ("latency_ms", "ttft_ms", "decode_tps"):
            values = [v for s in good if (v := getattr(s, key)) is not None]
            figures[f"{key}_mean"] = statistics.fmean(values) if values else None
            figures[f"{key}_p50"] = statistics.median(values) if values else None
        figures["matching_baseline"] = sum(bool(s.matches_baseline) for s in compared)
        figures["compared"] = len(compared)
        summary[b] = figures
    base = summary.get(baseline, {}).get("decode_tps_p50")
    for figures in summary.values():
        own = figures["decode_tps_p50"]
        figures["decode_tps_p50_vs_baseline"] = own / base if own and base else None
    return summary


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else format(value, spec) + unit


def print_report(result: dict[str, Any]) -> None:
    """The summary table, the per-prompt divergence table and the run's caveats, to stdout."""
    cfg = result["config"]
    print(f"model {cfg['model']} via {cfg['url']}, baseline {cfg['baseline']}, ", end="")
    print(f"{len(cfg['prompts'])} prompts x {cfg['rounds']} rounds, max_tokens {cfg['max_tokens']}")
    print(f"{result['measured']}/{result['planned']} requests in {result['elapsed_s']:.1f} s")
    if result["cut_short"]:
        print(f"CUT SHORT ({result['cut_short']}): figures cover only the requests measured")
    head = f"{'backend':<14}{'n':>4}{'err':>5}{'lat mean':>10}{'lat p50':>9}{'ttft p50':>10}"
    print(f"\n{head}{'tok/s mean':>12}{'tok/s p50':>11}{'vs base':>9}  outputs matching baseline")
    for name, f in result["summary"].items():
        print(
            f"{name:<14.14}{f['n']:>4}{f['errors']:>5}{_fmt(f['latency_ms_mean'], '.0f'):>10}"
            f"{_fmt(f['latency_ms_p50'], '.0f'):>9}{_fmt(f['ttft_ms_p50'], '.0f'):>10}"
            f"{_fmt(f['decode_tps_mean'], '.1f'):>12}{_fmt(f['decode_tps_p50'], '.1f'):>11}"
            f"{_fmt(f['decode_tps_p50_vs_baseline'], '.2f', 'x'):>9}  "
            f"{f['matching_baseline']}/{f['compared']}"
        )
    print("(ms; tok/s: decode after the first token; the baseline's match: its repeatability)")
    backends = list(result["summary"])
    print(f"\n{'greedy output vs baseline':<40}" + "".join(f"{b:>12.12}" for b in backends))
    for prompt, row in zip(cfg["prompts"], result["divergence"], strict=True):
        cells = "".join(f"{row[b] or '-':>12}" for b in backends)
        print(f"{prompt[:38]:<40}{cells}")
    print("(same = every output equal to the baseline's; @N = first differing character)")
    errors = [s for s in result["samples"] if s["error"] and s["phase"] == "measure"]
    for s in errors[:5]:
        print(f"error: {s['backend']} round {s['round']} prompt {s['prompt']}: {s['error']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the proxy's base URL")
    ap.add_argument("--backends", help="comma-separated arms (default: all, from /healthz)")
    ap.add_argument("--baseline", help="the arm to compare with (default: the first)")
    ap.add_argument("--prompts", type=Path, help="JSON list of strings, or one prompt a line")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="uncounted requests per arm first")
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds, warm-up included")
    ap.add_argument("--json", type=Path, help="write every figure and sample here")
    args = ap.parse_args(argv)
    if min(args.max_tokens, args.rounds) < 1 or args.warmup < 0 or args.time_limit <= 0:
        ap.error("--max-tokens and --rounds must be >= 1, --warmup >= 0, --time-limit > 0")
    return args


def pick_backends(args: argparse.Namespace, available: list[str]) -> tuple[list[str], str]:
    """The arms to run, in order, and the baseline among them."""
    backends = list(dict.fromkeys(args.backends.split(","))) if args.backends else available
    baseline = args.baseline or backends[0]
    if unknown := sorted(set(backends) - set(available)):
        raise SystemExit(f"error: unknown backends {unknown}; the proxy has {available}")
    if baseline not in backends:
        raise SystemExit(f"error: the baseline {baseline!r} is not among {backends}")
    return backends, baseline


def run_plan(
    client: httpx.Client, endpoint: str, bodies: list[dict[str, Any]], plan: list[Step],
    started: float, deadline: float,
) -> tuple[list[Sample], str | None]:  # fmt: skip
    """Run the steps one at a time; return the samples and why the run was cut short, if so."""
    samples: list[Sample] = []
    for done, (phase, rnd, prompt, backend) in enumerate(plan):
        progress(done, len(plan), started, f"{phase} {backend} p{prompt}")
        sample = Sample(phase, rnd, prompt, backend)
        try:
            run_request(client, endpoint, bodies[prompt], sample, deadline)
        except DeadlineReached:
            return samples, f"time limit of {deadline - started:g} s reached"
        except KeyboardInterrupt:
            return samples, "interrupted"
        samples.append(sample)
    progress(len(plan), len(plan), started, "done")
    return samples, None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    url = args.url.rstrip("/")
    prompts = load_prompts(args.prompts)
    started = time.monotonic()
    with httpx.Client(trust_env=False) as client:  # an HTTP_PROXY must not catch loopback
        model, available = discover(client, url)
        backends, baseline = pick_backends(args, available)
        bodies = [request_body(model, prompt, args.max_tokens) for prompt in prompts]
        plan = schedule(backends, len(prompts), args.rounds, args.warmup)
        endpoint = f"{url}/v1/chat/completions"
        deadline = started + args.time_limit
        samples, cut_short = run_plan(client, endpoint, bodies, plan, started, deadline)
    sys.stderr.write("\n")
    measured = [s for s in samples if s.phase == "measure"]
    check_outputs(measured, baseline)
    config = {"url": url, "model": model, "backends": backends, "baseline": baseline}
    config |= {k: vars(args)[k] for k in ("max_tokens", "rounds", "warmup", "time_limit")}
    result = {
        "config": config | {"prompts": prompts},
        "planned": args.rounds * len(prompts) * len(backends),
        "measured": len(measured),
        "cut_short": cut_short,
        "elapsed_s": time.monotonic() - started,
        "summary": summarise(measured, backends, baseline),
        "divergence": divergence_table(measured, backends, len(prompts)),
        "samples": [asdict(s) for s in samples],
    }
    print_report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 0 if any(s.error is None for s in measured) else 1


if __name__ == "__main__":
    sys.exit(main())
