"""The bench plan: which configurations each suite measures, at full or --quick size."""

from __future__ import annotations

from typing import Any

from prefixtune.bench.report import COMPILED

SUITES = ("train", "generate", "multitenant", "long", "mfu", "real", "kernels")
OPT_IN_SUITES = ("quantize",)  # run only when named (not in "all"): bench/quantize.py
# What `--device cuda` measures (scaling and fused run beside the plan: cli/bench.py); on CUDA
# "all" means these, and naming another suite is an error.
CUDA_SUITES = ("train", "generate", "multitenant", "long", "mfu")


BENCH_MODELS = ("gpt2-small-random", "smollm2", "smollm2-random", "tiny-gpt2", "tiny-llama")


DEFAULT_MODELS = {
    "train": ["gpt2-small-random", "smollm2"],
    "mfu": ["gpt2-small-random", "smollm2"],
}


FULL = {
    "train": {"batch": 8, "seq": 128, "prefix_lens": (10, 200)},
    "long": {"batch": 4, "seq": 1024, "prefix_len": 200, "target_tail": 64},
    "generate": {"prompts": 8, "new_tokens": 32, "prefix_len": 10, "prompt_min": 16,
                 "prompt_max": 48},
    "real": {"examples": 64, "batch": 8, "prefix_len": 10},
    "kernels": {"queries": (64, 128, 256, 512, 1024), "prefix_lens": (10, 200), "rows": 1024,
                "vocab": 49152},
    "mlp_hidden": 512,
}  # fmt: skip


QUICK = {
    "train": {"batch": 2, "seq": 16, "prefix_lens": (2, 6)},
    "long": {"batch": 2, "seq": 64, "prefix_len": 6, "target_tail": 8},
    "generate": {"prompts": 8, "new_tokens": 8, "prefix_len": 4, "prompt_min": 4,
                 "prompt_max": 12},
    "real": {"examples": 16, "batch": 4, "prefix_len": 4},
    "kernels": {"queries": (16, 64), "prefix_lens": (4,), "rows": 64, "vocab": 512},
    "mlp_hidden": 16,
}  # fmt: skip


def cuda_suites(suites: list[str]) -> tuple[list[str], list[str]]:
    """(the suites to run on CUDA, those "all" leaves out there); ValueError naming the suites
    that do not measure on CUDA yet when they are asked for by name."""
    if "all" in suites:
        return list(CUDA_SUITES), [s for s in SUITES if s not in CUDA_SUITES]
    other = [s for s in suites if s not in CUDA_SUITES]
    if other:
        raise ValueError(f"--device cuda: --suite {' '.join(other)} measures on the CPU only so "
                         f"far (CUDA: scaling, fused, {', '.join(CUDA_SUITES)})")  # fmt: skip
    return suites, []


def resolve_dtypes(requested: list[str], device: str = "cpu") -> tuple[list[str], str | None]:
    """The dtypes to run, and a note when bf16 was left out because the CPU lacks it. On CUDA
    `auto` is bf16 (as for the scaling suite: bench/device.py)."""
    from prefixtune.core.runtime import native_bf16

    dtypes: list[str] = []
    note = None
    for name in requested:
        if name == "auto" and device == "cuda":
            dtypes.append("bf16")
        elif name == "auto":
            dtypes.append("fp32")
            if native_bf16("cpu"):
                dtypes.append("bf16")
            else:
                note = ("bf16 not run: this CPU has no native bf16 (auto picks fp32); "
                        "pass --dtypes fp32 bf16 to measure the emulated path anyway")  # fmt: skip
        else:
            dtypes.append(name)
    return list(dict.fromkeys(dtypes)), note


def _train_specs(model: str, dtype: str, shapes: dict, base: dict,
                 compile: bool) -> list[tuple[str, dict]]:  # fmt: skip
    train = shapes["train"]
    common = {**base, "kind": "train", "model": model, "dtype": dtype, "batch": train["batch"],
              "seq": train["seq"]}  # fmt: skip
    specs = []
    for length in train["prefix_lens"]:
        for reparam in (True, False):
            name = f"train/{model}/{dtype}/P{length}/{{}}-{'mlp' if reparam else 'table'}"
            spec = {**common, "prefix_len": length, "reparam": reparam, "compile": False}
            specs += [(name.format(impl), {**spec, "impl": impl}) for impl in ("ours", "peft")]
            if compile:
                specs.append((name.format("ours") + COMPILED, {**spec, "impl": "ours",
                                                               "compile": True}))  # fmt: skip
    for impl, label in (("finetune", "finetune"), ("frozen", "frozen-floor")):
        spec = {**common, "impl": impl, "prefix_len": 0, "reparam": False, "compile": False}
        specs.append((f"train/{model}/{dtype}/{label}", spec))
    return specs


def build_plan(suites: list[str], models: list[str] | None, dtypes: list[str], quick: bool,
               iters: int, warmup: int, compile: bool = False,
               device: str = "cpu") -> list[tuple[str, dict[str, Any]]]:  # fmt: skip
    """(name, worker spec) for every configuration of the chosen suites, without repeats.
    With `compile`, prefixtune's training configs also run under torch.compile (*-compiled).
    On CUDA every spec names its device (on the CPU the specs stay as they always were)."""
    shapes = QUICK if quick else FULL
    base = {"iters": iters, "warmup": warmup, "seed": 0, "mlp_hidden": shapes["mlp_hidden"]}
    on = {} if device == "cpu" else {"device": device}
    base.update(on)
    chosen = list(SUITES) if "all" in suites else suites
    plan: dict[str, dict[str, Any]] = {}

    def models_for(suite: str) -> list[str]:
        return models or (["tiny-llama"] if quick else DEFAULT_MODELS.get(suite, ["smollm2"]))

    for suite in chosen:
        if suite == "kernels":
            plan.update(_kernel_specs(shapes["kernels"], base, dtypes))
            continue
        if suite == "quantize":  # fp32 against the int8 base (bench/quantize.py)
            from prefixtune.bench.quantize import quantize_specs

            plan.update(quantize_specs(models_for(suite), quick, base))
            continue
        for model in models_for(suite):
            if suite in ("train", "mfu"):
                plan[f"check/{model}/equal-loss"] = {
                    "kind": "equal_loss", "model": model, "prefix_len": shapes["train"]
                    ["prefix_lens"][0], "reparam": True, "mlp_hidden": base["mlp_hidden"],
                    "batch": 2, "seq": 16, "seed": 0, **on,
                }  # fmt: skip
            for dtype in dtypes:
                plan.update(_suite_specs(suite, model, dtype, shapes, base, compile))
        if suite == "mfu":
            plan["mfu/peak"] = {"kind": "peak", "dtypes": ["fp32", "bf16"], "quick": quick, **on}
    return list(plan.items())


def _kernel_specs(shapes: dict, base: dict, dtypes: list[str]) -> dict[str, dict[str, Any]]:
    """Cross-entropy; the attention sweep in each of the run's dtypes (bf16 where it runs)."""
    specs = {f"kernels/cross-entropy/{impl}": {**base, "kind": "cross_entropy", "impl": impl,
                                               "rows": shapes["rows"], "vocab": shapes["vocab"]}
             for impl in ("ours", "torch")}  # fmt: skip
    for dtype in dtypes:
        for length in shapes["queries"]:
            for prefix in shapes["prefix_lens"]:
                for impl in ("ours", "sdpa", "math"):
                    specs[f"kernels/attention/{dtype}/T{length}/P{prefix}/{impl}"] = {
                        **base, "kind": "attention", "impl": impl, "dtype": dtype,
                        "queries": length, "prefix_len": prefix}  # fmt: skip
    return specs


def _suite_specs(suite: str, model: str, dtype: str, shapes: dict, base: dict,
                 compile: bool = False) -> dict:  # fmt: skip
    tag = f"{model}/{dtype}"
    if suite == "train":
        return dict(_train_specs(model, dtype, shapes, base, compile))
    if suite == "mfu":  # prefixtune at both lengths and the floor (shared with the train suite)
        specs = dict(_train_specs(model, dtype, shapes, base, compile))
        kept = ("ours-mlp", "ours-mlp" + COMPILED, "frozen-floor")
        return {k: v for k, v in specs.items() if k.endswith(kept)}
    if suite == "long":
        long = shapes["long"]
        common = {**base, "kind": "train", "model": model, "dtype": dtype, "reparam": True,
                  "batch": long["batch"], "seq": long["seq"], "prefix_len": long["prefix_len"],
                  "target_tail": long["target_tail"]}  # fmt: skip
        return {
            f"long/{tag}/{impl}{'-ckpt' if ckpt else ''}": {**common, "impl": impl,
                                                           "checkpointing": ckpt}
            for impl in ("ours", "peft") for ckpt in (False, True)
        }  # fmt: skip
    if suite in ("generate", "multitenant"):
        common = {**base, "kind": suite, "model": model, "dtype": dtype, **shapes["generate"]}
        theirs = "peft" if suite == "generate" else "peft-switching"
        specs = {f"{suite}/{tag}/ours": {**common, "impl": "ours"},
                 f"{suite}/{tag}/{theirs}": {**common, "impl": "peft"}}  # fmt: skip
        if compile:
            specs[f"{suite}/{tag}/ours{COMPILED}"] = {**common, "impl": "ours", "compile": True}
        return specs
    if suite == "real":
        common = {**base, "kind": "real", "model": model, "dtype": dtype, "reparam": True,
                  **shapes["real"]}  # fmt: skip
        impls = ["ours", "peft"] + ([f"ours{COMPILED}"] if compile else [])
        return {f"real/{tag}/{impl}": {**common, "impl": impl.removesuffix(COMPILED),
                                       "compile": impl.endswith(COMPILED)} for impl in impls}  # fmt: skip
    raise ValueError(f"unknown suite {suite!r}")
