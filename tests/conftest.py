"""Tiny random models built in-process (no network): GPT-2 and Llama with GQA (the bench's, from
prefixtune.bench.common), Gemma-3 and BART."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
)

from prefixtune.bench.common import TINY_VOCAB as VOCAB
from prefixtune.bench.common import tiny_gpt2, tiny_llama  # the bench's tiny models
from prefixtune.core.artifact import ArtifactError, FoldedPrefix, load_prefix, read_json
from prefixtune.core.attention import PrefixKV
from prefixtune.methods.multitask import INDEX_FORMAT, INDEX_JSON

X = torch.tensor([[10, 11, 12, 13, 14]])


def tiny_gemma3(sliding_window: int = 4) -> Gemma3ForCausalLM:
    config = Gemma3TextConfig(
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, hidden_size=32,
        intermediate_size=64, head_dim=16, vocab_size=VOCAB, max_position_embeddings=128,
        sliding_window=sliding_window, layer_types=["sliding_attention", "full_attention"],
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return Gemma3ForCausalLM(config).eval()


def tiny_bart(vocab: int = VOCAB) -> BartForConditionalGeneration:
    config = BartConfig(
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=vocab,
        max_position_embeddings=128, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        decoder_start_token_id=2, forced_bos_token_id=None, forced_eos_token_id=None,
    )  # fmt: skip
    return BartForConditionalGeneration(config).eval()


BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "gemma3": tiny_gemma3, "bart": tiny_bart}
DECODER_ONLY = ("gpt2", "llama", "gemma3")


class CharTokenizer:
    """A minimal tokenizer: one id per character (ids 3..), enough for real-word init tests."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [3 + (ord(c) % (VOCAB - 3)) for c in text]}


TOKENIZER_VOCAB = 320


def make_bpe_tokenizer():
    """Byte-level BPE (vocab 320, <pad>=0 <s>=1 </s>=2, no BOS added) trained on the built-in
    examples in-process; pair it with tiny models built with vocab=TOKENIZER_VOCAB."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from prefixtune.data.builtin import builtin_examples

    corpus = [f"{e.source}\n{e.target}" for e in builtin_examples("train")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return make_bpe_tokenizer()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine oversubscribed
    OpenMP threads slow them ~50x. A module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`; the setting is restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()


def pytest_collection_modifyitems(config, items):
    """Real-model tests (marked slow) run where PREFIXTUNE_SLOW=1 or in CI."""
    import os

    if os.environ.get("PREFIXTUNE_SLOW") == "1" or os.environ.get("CI"):
        return
    skip = pytest.mark.skip(reason="real-model test: set PREFIXTUNE_SLOW=1 (CI runs it)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, bpe_tokenizer):
    """A tiny GPT-2 and its tokenizer saved like any local model directory (for --model DIR)."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tiny_gpt2(TOKENIZER_VOCAB).save_pretrained(path)
    bpe_tokenizer.save_pretrained(path)
    return path


# A multi-task run's prefix set (out/prefixes), read the way a user would read it.
def load_prefix_set(directory: str | Path) -> dict[str, FoldedPrefix]:
    """The folded prefixes of a multi-task run (out/prefixes), name -> prefix, in task-id order."""
    directory = Path(directory)
    index = read_json(directory / INDEX_JSON)
    if index.get("format") != INDEX_FORMAT:
        raise ArtifactError(f"{directory / INDEX_JSON}: not a prefixtune prefix set (format field)")
    entries = sorted(index.get("tasks") or [], key=lambda e: e["task_id"])
    return {e["name"]: load_prefix(directory / e["path"]) for e in entries}


def prefix_set_kv(prefixes: dict[str, FoldedPrefix], row_tasks: list[str],
                  device: str | torch.device = "cpu") -> PrefixKV:  # fmt: skip
    """A mixed-task PrefixKV: row i uses prefixes[row_tasks[i]]."""
    names = list(prefixes)
    unknown = sorted(set(row_tasks) - set(names))
    if unknown:
        raise ArtifactError(f"no prefix for task(s) {unknown}; the set has {names}")
    rows = torch.tensor([names.index(t) for t in row_tasks], dtype=torch.long, device=device)
    return PrefixKV.stack([{k: t.to(device) for k, t in p.kv.items()} for p in prefixes.values()],
                          rows)  # fmt: skip


def assert_same_prefill_state(packed, packed_logits, padded, padded_logits) -> None:
    """A packed prefill left the decode state a padded prefill leaves: logits, key mask,
    positions, and every cached key/value a real column holds."""
    torch.testing.assert_close(packed_logits, padded_logits, atol=1e-5, rtol=1e-4)
    assert torch.equal(packed.mask, padded.mask) and packed.length == padded.length
    assert torch.equal(packed.positions, padded.positions)
    visible = packed.mask[:, None, : packed.length, None]  # (B, 1, S, 1): padding columns differ
    for mine, theirs in zip(packed.cache.layers, padded.cache.layers, strict=True):
        for a, b in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
            torch.testing.assert_close(a * visible, b * visible, atol=1e-5, rtol=1e-4)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process group's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(worker: Callable[..., None], world: int, *args, timeout: float = 120.0) -> None:
    """Spawn `world` ranks of `worker(rank, world, port, *args)` (a module-level function) and
    wait for them, killing them past `timeout` seconds."""
    import torch.multiprocessing as mp

    context = mp.start_processes(worker, args=(world, free_port(), *args), nprocs=world,
                                 join=False, start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks still running after {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
