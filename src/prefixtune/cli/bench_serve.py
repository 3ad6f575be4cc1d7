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
    parser.add_argument("--open-loop", action="store_true", help="Poisson arrivals through the "
                        "OpenAI API of a live server, mixed vs one prefix at a time")  # fmt: skip
    parser.add_argument("--prefix-counts", default="8,32,128", help="open loop: prefix counts")
    parser.add_argument("--rates", default="1,2,4", help="open loop: requests/s to offer")
    parser.add_argument("--plot", default=None, help="open loop: latency-vs-throughput PNG")


def run(args: argparse.Namespace) -> int:

    if min(args.tenants, args.requests, args.max_new_tokens, args.max_batch_size) < 1:
        raise UserError("--tenants, --requests, --max-new-tokens, --max-batch-size must be >= 1")
    if args.open_loop:
        return _open_loop(args)
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


def _open_loop(args: argparse.Namespace) -> int:
    from prefixtune.bench.open_loop import open_loop

    try:
        counts = [int(c) for c in args.prefix_counts.split(",")]
        rates = [float(r) for r in args.rates.split(",")]
    except ValueError:
        raise UserError("--prefix-counts and --rates take comma-separated numbers") from None
    if min(counts) < 1 or min(rates) <= 0:
        raise UserError("--prefix-counts must be >= 1 and --rates > 0")
    report = open_loop(args.model, prefix_counts=counts, rates=rates, requests=args.requests,
                       max_new_tokens=args.max_new_tokens, max_batch_size=args.max_batch_size,
                       prefix_length=args.prefix_length, device=args.device, out_json=args.out,
                       plot=args.plot)  # fmt: skip
    for row in report["rows"]:
        print(f"{row['prefixes']:>4} prefixes {row['mode']:<10} offered {row['offered_rate']:6.2f}"
              f" got {row['requests_per_s']:6.2f} req/s  p50 {row['p50_ms']:8.1f} ms  p95 "
              f"{row['p95_ms']:8.1f} ms  ttft p50 {row['ttft_p50_ms']:7.1f} ms")  # fmt: skip
    print(f"wrote {args.out}")
    return 0
