"""`prefixtune bench` results -> comparisons (ratios), MFU, the issue's targets, and markdown."""

from __future__ import annotations

from typing import Any

COMPILED = "-compiled"  # name suffix of a config run under torch.compile (bench --compile)

TARGETS = {
    "real": "real E2E workload: tokens/s >= 1.5x PEFT, peak memory no higher",
    "fixed": "fixed-shape training step: tokens/s >= PEFT (beside the frozen floor)",
    "generate": "batched greedy generation: >= 1.2x PEFT",
    "multitenant": "multi-tenant (8 prefixes): >= 4x PEFT switching adapters",
    "dtype": "dtype follows hardware (auto: fp32 without native bf16)",
    "bf16": "native bf16 (AVX512-BF16/AMX, GPUs): bf16 training >= 1.6x our own fp32",
    "mfu": "utilisation: >= 75% MFU (prefixtune training step)",
    "loss": "same loss as PEFT on the same weights and batch (<= 1e-4)",
}


def _ok(result: dict[str, Any] | None) -> bool:
    return bool(result) and "error" not in result and "refused" not in result


RATE_KEYS = ("tokens_per_s", "new_tokens_per_s", "calls_per_s")  # what a config's rate is in


def _rate(result: dict[str, Any]) -> float | None:
    for key in RATE_KEYS:
        if key in result:
            return result[key]
    return None


def _peak(result: dict[str, Any]) -> float | None:
    """Peak resident MB: the exact-malloc memory pass when there is one, else the timing run."""
    return result.get("live_peak_mb", result.get("peak_rss_mb"))


def _pair(suite: str, key: str, ours: dict, theirs: dict, reference: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"suite": suite, "key": key, "reference": reference}
    if not (_ok(ours) and _ok(theirs)):
        entry["missing"] = [r.get("error") or r.get("refused") or "not run"
                            for r in (ours, theirs) if not _ok(r)]  # fmt: skip
        return entry
    a, b = _rate(ours), _rate(theirs)
    entry.update(ours_rate=a, reference_rate=b, ratio=a / b if a and b else None,
                 ours_peak_mb=_peak(ours), reference_peak_mb=_peak(theirs),
                 peak_from="memory pass" if "live_peak_mb" in ours else "timing run",
                 ours_step_extra_mb=ours.get("live_step_extra_mb", ours.get("step_extra_mb")),
                 reference_step_extra_mb=theirs.get("live_step_extra_mb",
                                                    theirs.get("step_extra_mb")))  # fmt: skip
    if "outputs" in ours and "outputs" in theirs:
        same = sum(x == y for x, y in zip(ours["outputs"], theirs["outputs"], strict=False))
        entry["same_tokens_rows"] = f"{same}/{len(ours['outputs'])}"
        entry["same_tokens"] = same == len(ours["outputs"]) == len(theirs["outputs"])
    return entry


def comparisons(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name, result in results.items():
        spec = result.get("spec", {})
        suite = name.split("/", 1)[0]
        if suite in ("train", "real") and spec.get("impl") == "ours" and "/bf16/" in name:
            fp32 = results.get(name.replace("/bf16/", "/fp32/"), {})
            out.append(_pair(suite, name, result, fp32, "fp32 (ours)"))
        if suite == "train" and spec.get("impl") == "ours":
            root = name.rsplit("/", 2)[0]  # train/model/dtype
            peft = name.replace("/ours-", "/peft-").removesuffix(COMPILED)
            out.append(_pair(suite, name, result, results.get(peft, {}), "PEFT"))
            for label in ("frozen-floor", "finetune"):
                out.append(_pair(suite, name, result, results.get(f"{root}/{label}", {}), label))
        elif suite in ("generate", "real") and spec.get("impl") == "ours":
            peft = name.removesuffix(COMPILED).removesuffix("ours") + "peft"
            out.append(_pair(suite, name, result, results.get(peft, {}), "PEFT"))
        elif suite == "multitenant" and spec.get("impl") == "ours":
            theirs = results.get(name.removesuffix(COMPILED)[: -len("ours")] + "peft-switching", {})
            out.append(_pair(suite, name, result, theirs, "PEFT switching"))
        elif suite == "kernels" and spec.get("impl") == "ours":
            stock = name.removesuffix("ours") + ("torch" if "cross-entropy" in name else "sdpa")
            out.append(_pair(suite, name, result, results.get(stock, {}), "PyTorch's kernel"))
        elif suite == "long" and name.endswith("/ours"):
            base = name[: -len("ours")]
            for other in ("ours-ckpt", "peft", "peft-ckpt"):
                out.append(_pair(suite, name, result, results.get(base + other, {}), other))
    return out


def mfu(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Useful FLOP/s over the measured matmul peak of the same dtype, per timed config."""
    peak = results.get("mfu/peak", {})
    rows = []
    for name, result in results.items():
        dtype = result.get("spec", {}).get("dtype")
        if not _ok(result) or dtype not in peak:
            continue
        if "useful_flops" in result:
            useful = result["useful_flops"]["total"]
        elif "useful_flops_per_pass" in result:
            useful = result["useful_flops_per_pass"]
        else:
            continue
        achieved = useful / result["median_s"] / 1e9
        rows.append({"key": name, "useful_gflop": useful / 1e9, "achieved_gflops": achieved,
                     "peak_gflops": peak[dtype]["gflops"],
                     "mfu": achieved / peak[dtype]["gflops"]})  # fmt: skip
    return rows


def _peft_ignores_prefix(transformers_version: str | None) -> bool:
    """PEFT 0.21's prefix-tuning generate() drops the prefix from transformers 5.24 on."""
    from packaging.version import Version

    return bool(transformers_version) and Version(transformers_version) >= Version("5.24")


def _target(key: str, pairs: list[dict], threshold: float, memory: bool = False,
            transformers_version: str | None = None) -> dict:  # fmt: skip
    done = [p for p in pairs if p.get("ratio") is not None]
    if not done:
        return {"target": TARGETS[key], "measured": "not run", "met": None}
    # Equal greedy tokens prove both sides decode the same thing, in fp32. In bf16 both drift
    # from their own fp32 tokens after a few steps (a top-2 gap under bf16's resolution flips
    # the argmax), so bf16 pairs lean on the fp32 pair of the same run.
    differ = [p for p in done if p.get("same_tokens") is False and "/bf16/" not in p["key"]]
    if differ:  # decoding that is not the same computation is no comparison
        rows = ", ".join(f"{p['same_tokens_rows']} ({p['key']})" for p in differ)
        text = f"not comparable: greedy tokens equal in only {rows} rows"
        if _peft_ignores_prefix(transformers_version):
            return {"target": TARGETS[key], "met": None,
                    "measured": text + "; PEFT 0.21's generate() ignores the prefix with "
                                f"transformers {transformers_version} (see constraints.txt)"}  # fmt: skip
        return {"target": TARGETS[key], "met": False,
                "measured": text + ": a decoding difference to investigate"}  # fmt: skip
    worst = min(done, key=lambda p: p["ratio"])
    text = f"{worst['ratio']:.2f}x at worst ({worst['key']})"
    met = all(p["ratio"] >= threshold for p in done)
    if memory:
        over = [p for p in done if p["ours_peak_mb"] > p["reference_peak_mb"]]
        text += "; peak MB " + ", ".join(f"{p['ours_peak_mb']:.0f} vs {p['reference_peak_mb']:.0f}"
                                         for p in done)  # fmt: skip
        met = met and not over
    return {"target": TARGETS[key], "measured": text, "met": met}


def _fastest_variant(pairs: list[dict]) -> list[dict]:
    """The compiled pairs where the run has them (the fastest way to run prefixtune), else all."""
    compiled = [p for p in pairs if p["key"].endswith(COMPILED)]
    return compiled or pairs


def targets(pairs: list[dict], mfu_rows: list[dict], results: dict, meta: dict) -> list[dict]:
    def of(suite: str, reference: str = "PEFT") -> list[dict]:
        return [p for p in pairs if p["suite"] == suite and p["reference"] == reference]

    version = meta.get("transformers")
    fixed = _fastest_variant([p for p in of("train") if "/P" in p["key"]])
    floor = [p["ratio"] for p in of("train", "frozen-floor") if p.get("ratio") is not None]
    fixed_row = _target("fixed", fixed, 1.0)
    if floor:
        fixed_row["measured"] += (f"; prefixtune runs at {min(floor):.0%}-{max(floor):.0%} of "
                                  "the frozen forward+backward floor's tokens/s")  # fmt: skip
    rows = [
        _target("real", of("real"), 1.5, memory=True),
        fixed_row,
        _target("generate", _fastest_variant(of("generate")), 1.2, transformers_version=version),
        _target(
            "multitenant",
            _fastest_variant(of("multitenant", "PEFT switching")),
            4.0,
            transformers_version=version,
        ),  # fmt: skip
    ]
    peak = results.get("mfu/peak", {})
    speeds = "; ".join(f"{d} matmul peak {v['gflops']:.0f} GFLOP/s" for d, v in peak.items()
                       if isinstance(v, dict) and "gflops" in v)  # fmt: skip
    rows.append({
        "target": TARGETS["dtype"],
        "measured": f"auto -> {meta.get('auto_dtype')} on {meta.get('cpu_capability')} "
                    f"(native bf16: {meta.get('native_bf16')})" + (f"; {speeds}" if speeds else ""),
        "met": (meta.get("auto_dtype") == "bf16") == bool(meta.get("native_bf16")),
    })  # fmt: skip
    bf16 = _target("bf16", _fastest_variant(of("train", "fp32 (ours)") + of("real", "fp32 (ours)")),
                   1.6)  # fmt: skip
    if not meta.get("native_bf16") and bf16["met"] is not None:
        bf16.update(met=None, measured=bf16["measured"] + "; not applicable: bf16 is emulated "
                    "on this CPU, so auto never picks it")  # fmt: skip
    rows.append(bf16)
    ours = [r for r in mfu_rows if r["key"].startswith("train/") and "/ours-" in r["key"]]
    rows.append(
        {
            "target": TARGETS["mfu"],
            "measured": ", ".join(f"{r['mfu']:.0%} ({r['key']})" for r in ours) or "not run",
            "met": all(r["mfu"] >= 0.75 for r in ours) if ours else None,
        }
    )
    checks = {k: r for k, r in results.items() if k.endswith("/equal-loss") and _ok(r)}
    rows.append(
        {
            "target": TARGETS["loss"],
            "measured": ", ".join(f"{r['abs_diff']:.1e} ({k})" for k, r in checks.items())
            or "not run",
            "met": all(r["abs_diff"] <= 1e-4 for r in checks.values()) if checks else None,
        }
    )
    return rows


def summarise_results(results: dict[str, dict[str, Any]], meta: dict) -> dict[str, Any]:
    pairs = comparisons(results)
    mfu_rows = mfu(results)
    return {"comparisons": pairs, "mfu": mfu_rows,
            "targets": targets(pairs, mfu_rows, results, meta)}  # fmt: skip


# ------------------------------------------------------------------------------ markdown


def _num(value: Any, fmt: str = ".0f") -> str:
    return "-" if value is None else format(value, fmt)


def _results_table(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| config | median s [min, max] | rate /s | peak MB, timing run (+ steps) | "
             "peak MB, memory pass (+ steps) |", "|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        if "error" in r or "refused" in r:
            why = (r.get("error") or "refused: " + r["refused"]).replace("|", "/")[:160]
            lines.append(f"| {name} | {why} | | | |")
        elif "median_s" in r:
            rate = _rate(r)
            lines.append(f"| {name} | {r['median_s']:.3f} [{r['min_s']:.3f}, {r['max_s']:.3f}] | "
                         f"{_num(rate)} | {_num(r.get('peak_rss_mb'))} "
                         f"(+{_num(r.get('step_extra_mb'))}) | {_num(r.get('live_peak_mb'))} "
                         f"(+{_num(r.get('live_step_extra_mb'))}) |")  # fmt: skip
    return lines


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        "# prefixtune bench",
        "",
        f"{meta['cpu']} ({meta['cpu_capability']}, native bf16: {meta['native_bf16']}), "
        f"{meta['threads']} threads; torch {meta['torch']}, transformers {meta['transformers']}, "
        f"peft {meta['peft']}; median of {meta['iters']} after {meta['warmup']} warm-up"
        + (
            f", pooled over {meta['rounds']} rounds of the whole plan."
            if meta.get("rounds", 1) > 1
            else "."
        ),  # fmt: skip
        "",
    ]
    if meta.get("gpu"):
        lines += [f"On {meta['gpu']} (--device cuda): CUDA-event timing, peak MB = "
                  "torch.cuda.max_memory_allocated over the steps.", ""]  # fmt: skip
    if meta.get("iters", 0) < 5:
        lines += [
            f"**Only {meta.get('iters')} timed iterations: below the 5 the method asks "
            "for; not reportable.**",
            "",
        ]
    if meta.get("quick"):
        lines += ["**--quick: tiny shapes for a smoke test; these are not measurements.**", ""]
    if meta.get("dtype_note"):
        lines += [meta["dtype_note"], ""]
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in report["targets"]:
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    lines += ["", "## Comparisons (rate ratio: prefixtune / reference)", "",
              "| config | reference | ratio | prefixtune /s | reference /s | peak MB (ours / ref) |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for p in report["comparisons"]:
        if "ratio" not in p:
            lines.append(f"| {p['key']} | {p['reference']} | {'; '.join(map(str, p['missing']))[:120]} | | | |")  # fmt: skip
            continue
        lines.append(f"| {p['key']} | {p['reference']} | {_num(p['ratio'], '.2f')} | "
                     f"{_num(p['ours_rate'])} | {_num(p['reference_rate'])} | "
                     f"{_num(p['ours_peak_mb'])} / {_num(p['reference_peak_mb'])} |")  # fmt: skip
    if report["mfu"]:
        lines += ["", "## MFU (useful FLOPs / measured matmul peak)", "",
                  "| config | useful GFLOP | achieved GFLOP/s | peak GFLOP/s | MFU |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in report["mfu"]:
            lines.append(f"| {r['key']} | {r['useful_gflop']:.1f} | {r['achieved_gflops']:.1f} | "
                         f"{r['peak_gflops']:.1f} | {r['mfu']:.0%} |")  # fmt: skip
    lines += ["", "## All configurations", "", *_results_table(report["results"]), ""]
    return "\n".join(lines)


def pool_rounds(first: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """One config's result over two rounds: timed iterations pooled, rates at the new median,
    the higher memory peaks."""
    from prefixtune.bench.common import rates, summarise

    if "median_s" not in first or "median_s" not in later:
        return first if "error" in later else later
    pooled = {**first, **summarise(first["times_s"] + later["times_s"])}
    for key in RATE_KEYS:
        if key in first:  # units per iteration: the same every round
            pooled.update(rates(pooled, first[key] * first["median_s"], key))
    for key in ("peak_rss_mb", "step_extra_mb", "live_peak_mb", "live_step_extra_mb"):
        if key in first and key in later:
            pooled[key] = max(first[key], later[key])
    pooled["rounds"] = first.get("rounds", 1) + 1
    return pooled
