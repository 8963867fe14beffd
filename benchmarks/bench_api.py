"""Load test of the REST API: p50/p99 latency and throughput of GET /searches/{id} and .../trials.

Starts its own `spsa-nas serve` (SQLite, Ray in-process) in a temporary directory, creates a user,
submits a small search that runs during the measurement, then measures:
  - closed loop: `concurrency` clients back to back, for each level in --concurrency;
  - open loop: requests sent at a fixed --rate (default 100/s), the target being p99 < 50 ms.
Prints one JSON document. Usage: python benchmarks/bench_api.py [--seconds 10] [--rate 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from cli_args import positive

from service.testing import Server, add_user

SEARCH = {
    "space": "quick",
    "dataset": {"name": "digits", "train_subset": 300},
    "trials": 50,
    "train": {"epochs": 1, "batch_size": 32},
    "latency": {"repeats": 5, "warmup": 1},
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summarise(latencies_s: list[float], errors: int, wall_s: float) -> dict[str, Any]:
    ms = [x * 1000 for x in latencies_s]
    return {
        "requests": len(ms),
        "errors": errors,
        "throughput_rps": round(len(ms) / wall_s, 1),
        "p50_ms": round(percentile(ms, 50), 2),
        "p90_ms": round(percentile(ms, 90), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(max(ms), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
    }


async def closed_loop(
    client: httpx.AsyncClient, path: str, concurrency: int, seconds: float
) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            response = await client.get(path)
            latencies.append(time.perf_counter() - start)
            errors += response.status_code != 200

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"concurrency": concurrency, **summarise(latencies, errors, time.perf_counter() - start)}


async def open_loop(client: httpx.AsyncClient, path: str, rate: float, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0

    async def one() -> None:
        nonlocal errors
        start = time.perf_counter()
        response = await client.get(path)
        latencies.append(time.perf_counter() - start)
        errors += response.status_code != 200

    tasks = []
    begin = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = begin + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return {"rate_rps": rate, **summarise(latencies, errors, time.perf_counter() - begin)}


async def measure(
    url: str, token: str, search_id: str, levels: list[int], seconds: float, rate: float
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=max(levels) + 8, max_keepalive_connections=max(levels) + 8)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, limits=limits, timeout=30
    ) as client:
        results: dict[str, Any] = {}
        for name, path in (
            ("search", f"/api/v1/searches/{search_id}"),
            ("trials", f"/api/v1/searches/{search_id}/trials"),
        ):
            for _ in range(20):  # warm-up
                await client.get(path)
            results[name] = {
                "closed_loop": [await closed_loop(client, path, c, seconds) for c in levels],
                "open_loop": await open_loop(client, path, rate, seconds),
            }
        status = (await client.get(f"/api/v1/searches/{search_id}")).json()
        results["search_during_benchmark"] = {"status": status["status"], "progress": status["progress"]}
        return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=positive, default=10.0, help="per measurement")
    parser.add_argument("--concurrency", default="1,4,16", help="closed-loop client counts")
    parser.add_argument("--rate", type=positive, default=100.0, help="open-loop requests per second")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        data_dir = Path(tmp) / "data"
        token = add_user(data_dir, "bench")
        server = Server(data_dir).start()
        try:
            created = httpx.post(
                f"{server.url}/api/v1/searches",
                json=SEARCH,
                headers={"Authorization": f"Bearer {token}"},
                timeout=60,
            ).json()
            search_id = created["id"]
            deadline = time.monotonic() + 300  # measure while trials are being run and told
            while time.monotonic() < deadline:
                body = httpx.get(
                    f"{server.url}/api/v1/searches/{search_id}", headers={"Authorization": f"Bearer {token}"}
                ).json()
                if body["progress"]["finished"] + body["progress"]["failed"] >= 2:
                    break
                time.sleep(1)
            results = asyncio.run(measure(server.url, token, search_id, levels, args.seconds, args.rate))
        finally:
            server.stop()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    target = results["search"]["open_loop"]["p99_ms"] < 50 and results["trials"]["open_loop"]["p99_ms"] < 50
    print(
        json.dumps(
            {
                "benchmark": "bench_api",
                "commit": commit,
                "host": platform.node(),
                "cpus": os.cpu_count(),
                "seconds_per_measurement": args.seconds,
                "target": f"p99 < 50 ms at {args.rate:g} rps",
                "target_met": target,
                **results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
