"""Bounded HTTP load test of the Serve endpoint (loopback only; stops after N requests or a deadline).

    python bench/serve_load.py RUN_DIR [--requests 2000] [--concurrency 16] [--port 8011]

Starts a local Ray + Serve on 127.0.0.1, sends PNGs of the run's test split to POST /v1/predict from
``concurrency`` client threads, and prints p50/p99 latency, throughput and the error count as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def run_load(url: str, payloads: list[bytes], requests: int = 2000, concurrency: int = 16,
             deadline_s: float = 300.0) -> dict:
    """Send ``requests`` POSTs (cycling through ``payloads``) with ``concurrency`` workers; never past the deadline."""
    import httpx

    if not url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        raise ValueError("load tests target loopback only")
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    stop = time.monotonic() + deadline_s

    def worker() -> None:
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < stop:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    r = client.post(url, content=payloads[i % len(payloads)], headers={"content-type": "image/png"})
                    ok = r.status_code == 200 and "class_id" in r.json()
                    err = None if ok else f"{r.status_code}: {r.text[:200]}"
                except Exception as e:  # noqa: BLE001 — counted, reported
                    err = f"{type(e).__name__}: {e}"
                with lock:
                    lat.append(time.perf_counter() - t0)
                    if err:
                        errors.append(err)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        for _ in range(concurrency):
            ex.submit(worker)
    wall = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0] if lat else 0.0] * 99
    return {"requests": len(lat), "errors": len(errors), "first_errors": errors[:3], "concurrency": concurrency,
            "wall_s": round(wall, 2), "throughput_rps": round(len(lat) / wall, 1),
            "p50_ms": round(q[49] * 1000, 1), "p99_ms": round(q[98] * 1000, 1)}


def main() -> None:
    import pyarrow.parquet as pq
    import ray
    from ray import serve

    from raydebias.data.transforms import encode_png, pixels_from_column
    from raydebias.serve.app import build

    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--port", type=int, default=8011)
    a = p.parse_args()
    t = pq.read_table(f"{a.run_dir}/stages/data/test.parquet").slice(0, 200)
    payloads = [encode_png(x) for x in pixels_from_column(t.column("pixels").to_pylist(), 32)]
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=200_000_000)
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    results = {}
    # Baseline in the same run: the same app with batching off (max_batch_size=1).
    for name, batch in (("unbatched (max_batch_size=1)", 1), ("batched (max_batch_size=32)", 32)):
        serve.run(build({"run_dir": a.run_dir, "max_batch_size": batch}), name="raydebias", route_prefix="/")
        run_load(f"http://127.0.0.1:{a.port}/v1/predict", payloads, 100, a.concurrency)  # warm-up
        results[name] = run_load(f"http://127.0.0.1:{a.port}/v1/predict", payloads, a.requests, a.concurrency)
        serve.delete("raydebias")
        print(name, json.dumps(results[name]), flush=True)
    base, new = results["unbatched (max_batch_size=1)"], results["batched (max_batch_size=32)"]
    print(json.dumps({"throughput_ratio_batched_vs_unbatched": round(new["throughput_rps"] / base["throughput_rps"], 2),
                      "p99_ratio_batched_vs_unbatched": round(new["p99_ms"] / base["p99_ms"], 2)}))
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
