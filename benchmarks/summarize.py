"""Turn a pytest-benchmark JSON file into the markdown table recorded in benchmarks/results/.

    python benchmarks/summarize.py bench.json --command "bash scripts/gpu_check.sh"
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("json_file")
    ap.add_argument("--command", default="pytest benchmarks/ --benchmark-only")
    a = ap.parse_args()
    data = json.load(open(a.json_file))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    benches = data.get("benchmarks", [])
    info = benches[0]["extra_info"] if benches else {}
    print(f"- device: {info.get('gpu', '?')}; torch {info.get('torch', '?')}; triton {info.get('triton', '?')}")
    print(f"- commit: {commit or '?'}; date: {datetime.date.today().isoformat()}")
    print(f"- command: `{a.command}`\n")
    print("| benchmark | median ms | TFLOP/s | peak mem GiB | extra |")
    print("|---|---|---|---|---|")
    skip = {"gpu", "torch", "triton", "median_ms", "tflops", "peak_mem_gib", "name"}
    for b in benches:
        e = b.get("extra_info", {})
        extra = ", ".join(f"{k}={v}" for k, v in e.items() if k not in skip)
        ms = e.get("median_ms", b["stats"]["median"] * 1e3)
        tf, mem = e.get("tflops"), e.get("peak_mem_gib")
        print(f"| {b['name']} | {ms:.3f} | {tf if tf is None else f'{tf:.1f}'} | "
              f"{mem if mem is None else f'{mem:.2f}'} | {extra} |")


if __name__ == "__main__":
    main()
