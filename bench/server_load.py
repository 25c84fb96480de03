#!/usr/bin/env python3
"""Load test for an OpenAI-compatible server on loopback: wick server and mlx_lm.server side by side.

For each server it starts (on a free loopback port), it measures
  1. one client:   sequential greedy chat requests, generated tokens per second;
  2. 16 clients:   the same requests from 16 threads at once (continuous batching: ≥ 3× one client);
  3. 64 clients:   requests without pause for --duration seconds: errors, throughput, latency, and
                   the server's resident memory sampled every 2 s (flat = no growth after warm-up).
Everything is bounded: a fixed number of clients, a fixed duration, loopback only.

  bench/server_load.py --model models/SmolLM2-135M-Instruct [--wick target/release/wick]
                       [--mlx | --mlx-only] [--duration 120] [--max-tokens 48]
Each server is warmed up first (untimed: two requests alone, then 16 at once).
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

PROMPTS = [
    "Write one sentence about the number {i}.",
    "Name a fruit that starts with the letter {c}.",
    "Give a short tip for staying focused, number {i}.",
    "What is {i} plus {i}?",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid):
    """Resident memory of the process and its children, in MB."""
    total = 0
    pids = [pid]
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        pids += [int(p) for p in out.split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def request(port, k, max_tokens):
    i = k % 1000
    prompt = PROMPTS[k % len(PROMPTS)].format(i=i, c=chr(ord("a") + i % 26))
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            return None
        return json.loads(data)["usage"]["completion_tokens"]
    finally:
        conn.close()


def run_clients(port, clients, max_tokens, *, per_client=None, duration=None, sample=None):
    """Runs `clients` threads, each sending requests back to back; returns (tokens, errors, seconds, latencies)."""
    lock = threading.Lock()
    stats = {"tokens": 0, "errors": 0, "lat": []}
    stop_at = time.time() + duration if duration else None
    counter = iter(range(10**9))

    def client():
        n = 0
        while (per_client is None or n < per_client) and (stop_at is None or time.time() < stop_at):
            with lock:
                k = next(counter)
            tic = time.time()
            try:
                got = request(port, k, max_tokens)
            except OSError:
                got = None
            with lock:
                if got is None:
                    stats["errors"] += 1
                else:
                    stats["tokens"] += got
                    stats["lat"].append(time.time() - tic)
            n += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    tic = time.time()
    for t in threads:
        t.start()
    # timed to when the last client finishes (polled every 10 ms); memory sampled every 2 s
    next_sample = tic
    while any(t.is_alive() for t in threads):
        if sample and time.time() >= next_sample:
            sample()
            next_sample += 2
        time.sleep(0.01)
    for t in threads:
        t.join()
    return stats["tokens"], stats["errors"], time.time() - tic, stats["lat"]


def measure(name, cmd, port, args):
    print(f"\n## {name}: {' '.join(cmd)}", flush=True)
    log = open(f"/tmp/server_load_{name}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    try:
        for _ in range(600):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/v1/models")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise SystemExit(f"{name} did not start; see /tmp/server_load_{name}.log")
        # warm-up, untimed: a full request alone, then 16 at once (mlx compiles its GPU kernels
        # on first use, per shape)
        run_clients(port, 1, args.max_tokens, per_client=2)
        run_clients(port, 16, args.max_tokens, per_client=1)
        res = {}
        tok, err, secs, _ = run_clients(port, 1, args.max_tokens, per_client=8)
        res["one"] = tok / secs
        print(f"1 client:   {tok} tokens in {secs:.1f} s = {tok / secs:.1f} tok/s, {err} errors", flush=True)
        # the same 8 requests per client as the 1-client phase: with fewer, the ramp-up and the
        # tail (the batch shrinking as clients finish) are most of the phase
        tok, err, secs, _ = run_clients(port, 16, args.max_tokens, per_client=8)
        res["sixteen"] = tok / secs
        print(f"16 clients: {tok} tokens in {secs:.1f} s = {tok / secs:.1f} tok/s ({tok / secs / res['one']:.2f}x one client), {err} errors", flush=True)
        mem = []
        tok, err, secs, lat = run_clients(
            port, 64, args.max_tokens, duration=args.duration, sample=lambda: mem.append(rss_mb(proc.pid))
        )
        res.update(load=tok / secs, errors=err, requests=len(lat), mem=mem)
        p50 = statistics.median(lat) if lat else float("nan")
        p99 = sorted(lat)[int(0.99 * (len(lat) - 1))] if lat else float("nan")
        print(f"64 clients for {secs:.0f} s: {len(lat)} requests, {err} errors, {tok / secs:.1f} tok/s, latency p50 {p50:.2f} s p99 {p99:.2f} s", flush=True)
        if mem:
            q = max(1, len(mem) // 4)
            print(f"memory (RSS MB): first quarter max {max(mem[:q]):.0f}, last quarter max {max(mem[-q:]):.0f}, overall max {max(mem):.0f}", flush=True)
            res["mem_growth"] = max(mem[-q:]) - max(mem[:q])
        return res
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--wick", default="target/release/wick")
    ap.add_argument("--mlx", action="store_true", help="also run mlx_lm.server on the same model")
    ap.add_argument("--mlx-only", action="store_true", help="run mlx_lm.server only")
    ap.add_argument("--duration", type=float, default=120)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    results = {}
    port = free_port()
    cmd = [args.wick, "server", "--model", args.model, "--port", str(port), "--log-level", "WARNING"]
    if not args.mlx_only:
        results["wick"] = measure("wick", cmd, port, args)
    if args.mlx or args.mlx_only:
        port = free_port()
        cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", args.model, "--port", str(port), "--log-level", "WARNING"]
        results["mlx_lm"] = measure("mlx_lm", cmd, port, args)
    print("\n| server | 1 client tok/s | 16 clients tok/s | 16 / 1 | 64 clients tok/s | requests | errors | RSS growth MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['one']:.1f} | {r['sixteen']:.1f} | {r['sixteen'] / r['one']:.2f}x | {r['load']:.1f} | "
            f"{r['requests']} | {r['errors']} | {r.get('mem_growth', float('nan')):.0f} |"
        )
    bad = [n for n, r in results.items() if n == "wick" and (r["errors"] or r["sixteen"] < 3 * r["one"])]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
