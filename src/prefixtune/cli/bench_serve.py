"""`prefixtune bench-serve`: serving throughput, one mixed batch vs one batch per prefix."""

from __future__ import annotations

import argparse

from prefixtune.bench.serve import bench_serve
from prefixtune.cli.args import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="base model (default: embedded SmolLM2)")
    parser.add_argument("--tenants", type=int, default=8, help="prefixes (tenants)")
    parser.add_argument("--requests", type=int, default=128, help="requests per mode and repeat")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per request")
    parser.add_argument("--max-batch-size", type=int, default=16, help="rows per forward")
    parser.add_argument("--prefix-length", type=int, default=10, help="positions per prefix")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--out", default="bench-serve.json", help="JSON report path")


def run(args: argparse.Namespace) -> int:

    if min(args.tenants, args.requests, args.max_new_tokens, args.max_batch_size) < 1:
        raise UserError("--tenants, --requests, --max-new-tokens, --max-batch-size must be >= 1")
    report = bench_serve(args.model, args.tenants, args.requests, args.out,
                         max_new_tokens=args.max_new_tokens, max_batch_size=args.max_batch_size,
                         prefix_length=args.prefix_length, repeats=args.repeats,
                         device=args.device)  # fmt: skip
    for mode, row in report["modes"].items():
        print(f"{mode:<17} {row['requests_per_s']:8.2f} req/s  p50 {row['p50_ms']:8.1f} ms  "
              f"p95 {row['p95_ms']:8.1f} ms")  # fmt: skip
    for name, ratio in report["ratios"].items():
        print(f"{name}: throughput x{ratio['throughput']:.2f}, p50 x{ratio['p50_latency']:.2f}, "
              f"p95 x{ratio['p95_latency']:.2f}")  # fmt: skip
    print(f"wrote {args.out}")
    return 0
