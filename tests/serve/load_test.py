#!/usr/bin/env python3
"""Load test of `qwen-edit serve` (or of a load balancer in front of several): CLIENTS concurrent clients send
REQUESTS OpenAI-style multipart edits in all, within a time limit. Reports p50/p99 latency, throughput, status
counts, and the server overhead per request (client latency minus the edit's own time and its queue wait,
measured one request at a time first). Fails (exit 1) when a request is lost, a response is neither an image nor
a JSON error, a 5xx comes back, or the overhead's median exceeds --max-overhead-ms.

    python3 tests/serve/load_test.py --url http://127.0.0.1:8000 --clients 16 --requests 200 [--json out.json]
"""

import argparse
import base64
import concurrent.futures as cf
import json
import pathlib
import statistics
import sys
import time

import requests

ROOT = pathlib.Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "crates/qwen-image-pipeline/assets/sample.png"


def edit(session, url, image, steps, seed):
    """One edit; (status, seconds, JSON body or None, Retry-After)."""
    files = {"image": ("sample.png", image, "image/png")}
    data = {"prompt": "Make it purple", "steps": str(steps), "seed": str(seed), "response_format": "b64_json"}
    start = time.perf_counter()
    r = session.post(f"{url}/v1/images/edits", files=files, data=data, timeout=300)
    seconds = time.perf_counter() - start
    try:
        body = r.json()
    except ValueError:
        body = None
    return r.status_code, seconds, body, r.headers.get("Retry-After")


def check_body(status, body):
    """An image for 200, a JSON error otherwise."""
    if status == 200:
        return bool(body and body["data"] and base64.b64decode(body["data"][0]["b64_json"])[:4] == b"\x89PNG")
    return bool(body and body.get("error", {}).get("message"))


def percentile(values, p):
    values = sorted(values)
    k = max(0, min(len(values) - 1, round(p / 100 * (len(values) - 1))))
    return values[k]


def overhead(url, image, steps, count):
    """Overhead per request in ms, sequentially: the server's (its time for the request − the edit's time − the
    queue wait), and the client's view (latency − edit − queue: also the Python client and the loopback)."""
    s = requests.Session()
    edit(s, url, image, steps, 0)  # warm-up
    server, client = [], []
    for i in range(count):
        status, seconds, body, _ = edit(s, url, image, steps, i)
        assert status == 200, (status, body)
        q = body["qwen"][0]
        server.append((q["server_seconds"] - q["edit_seconds"] - q["queued_seconds"]) * 1000)
        client.append((seconds - q["edit_seconds"] - q["queued_seconds"]) * 1000)
    return server, client


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--time-limit", type=float, default=600, help="seconds for the whole load phase")
    ap.add_argument("--overhead-requests", type=int, default=20)
    ap.add_argument("--max-overhead-ms", type=float, default=5.0)
    ap.add_argument("--allow-429", action="store_true", help="count 429s as answered (a small queue)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    image = SAMPLE.read_bytes()

    over, client_over = overhead(args.url, image, args.steps, args.overhead_requests) if args.overhead_requests else ([], [])

    sessions = [requests.Session() for _ in range(args.clients)]
    results = []
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(args.clients) as pool:
        futures = [
            pool.submit(edit, sessions[i % args.clients], args.url, image, args.steps, i) for i in range(args.requests)
        ]
        for f in cf.as_completed(futures, timeout=args.time_limit):
            try:
                results.append(f.result())
            except Exception as e:  # a lost request: no HTTP answer
                results.append((0, 0.0, {"error": {"message": repr(e)}}, None))
    wall = time.perf_counter() - start

    statuses = {}
    for status, *_ in results:
        statuses[status] = statuses.get(status, 0) + 1
    ok_latencies = [s for status, s, _, _ in results if status == 200]
    lost = args.requests - len(results) + statuses.get(0, 0)
    malformed = sum(1 for status, _, body, _ in results if status and not check_body(status, body))
    server_errors = sum(n for s, n in statuses.items() if s >= 500)
    refused_without_retry = sum(1 for status, _, _, ra in results if status == 429 and not ra)
    report = {
        "clients": args.clients,
        "requests": args.requests,
        "steps": args.steps,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "lost": lost,
        "malformed": malformed,
        "wall_seconds": round(wall, 2),
        "throughput_per_s": round(len(ok_latencies) / wall, 2) if wall else 0,
        "p50_ms": round(percentile(ok_latencies, 50) * 1000, 1) if ok_latencies else None,
        "p99_ms": round(percentile(ok_latencies, 99) * 1000, 1) if ok_latencies else None,
        "overhead_p50_ms": round(statistics.median(over), 2) if over else None,
        "overhead_p99_ms": round(percentile(over, 99), 2) if over else None,
        "client_overhead_p50_ms": round(statistics.median(client_over), 2) if client_over else None,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2))
    problems = []
    if lost:
        problems.append(f"{lost} requests lost")
    if malformed:
        problems.append(f"{malformed} responses neither an image nor a JSON error")
    if server_errors:
        problems.append(f"{server_errors} 5xx responses")
    if statuses.get(429) and not args.allow_429:
        problems.append(f"{statuses[429]} 429 responses")
    if refused_without_retry:
        problems.append(f"{refused_without_retry} 429s without Retry-After")
    if over and statistics.median(over) > args.max_overhead_ms:
        problems.append(f"server overhead {statistics.median(over):.2f} ms > {args.max_overhead_ms} ms")
    if problems:
        print("FAIL: " + "; ".join(problems), file=sys.stderr)
        sys.exit(1)
    print("OK")


if __name__ == "__main__":
    main()
