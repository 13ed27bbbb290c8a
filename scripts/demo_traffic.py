"""Send ordinary traffic through the proxy, as clients would, for the report to judge.

No routing header: the A/B split decides.

    python scripts/demo_traffic.py [--url http://127.0.0.1:8000] [--requests 40]
        [--concurrency 1] [--max-tokens 32] [--stream-share 0.5] [--seed 0]

Requests are greedy (temperature 0), so a `shadow` block in routes.yaml can check them.
A share of them stream (the decode speed is only measured on streams). Then:

    python -m proxy report logs/requests.jsonl --html report.html
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from collections import Counter

import openai

PROMPTS = [
    "What is the capital of France?",
    "List three primary colours.",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "Give me a short tip for writing clear emails.",
    "Translate 'good morning' into Spanish.",
    "What does HTTP stand for?",
    "Name two planets that are larger than Earth.",
]


def send(client: openai.OpenAI, prompt: str, stream: bool, max_tokens: int) -> str:
    """One request; returns the backend that served it."""
    params = {
        "model": "smollm2-135m",
        "max_tokens": max_tokens,
        "temperature": 0,
        "messages": [{"role": "user", "content": prompt}],
    }
    if stream:
        with client.chat.completions.with_streaming_response.create(stream=True, **params) as raw:
            for _ in raw.parse():
                pass
            return raw.headers.get("x-backend", "?")
    raw = client.chat.completions.with_raw_response.create(**params)
    raw.parse()
    return raw.headers.get("x-backend", "?")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--stream-share", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    jobs = [(rng.choice(PROMPTS), rng.random() < args.stream_share) for _ in range(args.requests)]
    served: Counter[str] = Counter()
    lock = threading.Lock()
    client = openai.OpenAI(base_url=args.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    started = time.perf_counter()

    def worker() -> None:
        while True:
            with lock:
                if not jobs:
                    return
                prompt, stream = jobs.pop()
            try:
                backend = send(client, prompt, stream, args.max_tokens)
            except openai.APIError as exc:
                backend = f"error: {type(exc).__name__}"
            with lock:
                served[backend] += 1
                done = sum(served.values())
                print(f"\r{done}/{args.requests} {dict(served)}", end="", file=sys.stderr)

    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(
        f"\n{sum(served.values())} requests in {time.perf_counter() - started:.0f} s: "
        f"{dict(served)}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
