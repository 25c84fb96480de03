#!/usr/bin/env python3
"""wick, mlx_lm and llama.cpp on the same model, one run, same prompt/generation lengths, CPU.

    python3 bench/side_by_side.py --model models/SmolLM2-135M-Instruct \
        --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf [--f16-gguf /tmp/smol-f16.gguf] \
        [-p 128] [-g 64] [-n 3] [--wick-dtype float16] [--skip-mlx]

Prints one table: prompt tok/s and generation tok/s per tool. wick runs `wick bench`; mlx_lm
runs `mlx_lm benchmark` (its CPU backend); llama.cpp runs through llama-cpp-python with greedy
decoding of exactly -g tokens after a random -p token prompt (EOS ignored, as the other two).
"""
import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_avg(out):
    m = re.search(r"Averages: prompt_tps=([\d.]+), generation_tps=([\d.]+), peak_memory=([\d.]+)", out)
    if not m:
        raise RuntimeError("no Averages line in:\n" + out)
    return float(m.group(1)), float(m.group(2)), float(m.group(3))


def run_wick(a, model, dtype, label):
    exe = os.path.join(ROOT, "target", "release", "wick")
    cmd = [exe, "bench", "--model", model, "-p", str(a.p), "-g", str(a.g), "-n", str(a.n)]
    if dtype:
        cmd += ["--dtype", dtype]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return (label,) + parse_avg(out)


def run_mlx(a, model, label):
    cmd = [sys.executable, "-m", "mlx_lm", "benchmark", "--model", model, "-p", str(a.p), "-g", str(a.g),
           "-n", str(a.mlx_trials)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=a.mlx_timeout).stdout
    except subprocess.TimeoutExpired:
        return (f"{label} (no result in {a.mlx_timeout}s)", float("nan"), float("nan"), float("nan"))
    return (label,) + parse_avg(out)


def run_llama(a, gguf, label):
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(gguf, n_ctx=a.p + a.g + 8, n_threads=os.cpu_count(), n_batch=a.p + a.g + 8, verbose=False)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, llm.n_vocab(), size=a.p).tolist()
    res = []
    for trial in range(a.n + 1):  # first is warmup
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t1 = time.perf_counter()
        for _ in range(a.g - 1):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t2 = time.perf_counter()
        if trial:
            res.append((a.p / (t1 - t0), (a.g - 1) / (t2 - t1)))
    pt = sum(r[0] for r in res) / len(res)
    gt = sum(r[1] for r in res) / len(res)
    return (label, pt, gt, float("nan"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct"))
    ap.add_argument("--quant-model", help="an mlx-format quantized folder to time with wick and mlx_lm too")
    ap.add_argument("--gguf", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--f16-gguf", help="f16 GGUF of the same model (bench/make_f16_gguf.py)")
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-g", type=int, default=64)
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("--wick-dtype", default="float16")
    ap.add_argument("--skip-mlx", action="store_true")
    ap.add_argument("--mlx-trials", type=int, default=1, help="trials for mlx_lm (its CPU backend is slow)")
    ap.add_argument("--mlx-timeout", type=int, default=900, help="seconds before an mlx_lm run is given up")
    a = ap.parse_args()
    rows = [run_wick(a, a.model, a.wick_dtype, f"wick {a.wick_dtype}")]
    if a.quant_model:
        rows.append(run_wick(a, a.quant_model, None, f"wick {os.path.basename(a.quant_model)}"))
    if not a.skip_mlx:
        rows.append(run_mlx(a, a.model, "mlx_lm (cpu) float16"))
        if a.quant_model:
            rows.append(run_mlx(a, a.quant_model, f"mlx_lm (cpu) {os.path.basename(a.quant_model)}"))
    if a.f16_gguf:
        rows.append(run_llama(a, a.f16_gguf, "llama.cpp F16 gguf"))
    rows.append(run_llama(a, a.gguf, "llama.cpp " + os.path.basename(a.gguf)))
    print(f"\nprompt={a.p} tokens, generation={a.g} tokens, trials={a.n} (mlx_lm: {a.mlx_trials}), cores={os.cpu_count()}")
    print(f"{'tool':40s} {'prompt tok/s':>14s} {'gen tok/s':>10s} {'peak GB':>8s}")
    for r in rows:
        print(f"{r[0]:40s} {r[1]:14.1f} {r[2]:10.1f} {r[3]:8.3f}")


if __name__ == "__main__":
    main()
