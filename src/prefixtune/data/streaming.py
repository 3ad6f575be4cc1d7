"""Training batches from a stream: the length bucketing of :class:`~prefixtune.data.encoding.Batches`
over a bounded buffer, for data larger than memory.

Each pass reads the stream from the start, ``buffer`` examples at a time; each buffer is
encoded and cut by :func:`~prefixtune.data.encoding.length_bucketed_batches` with the seed
``seed + epoch + 1_000_003 * k`` (buffer k), so data that fits one buffer gets exactly the
batches of ``Batches`` and every pass is the same given the seed. Micro-batches are numbered
across the run; going back (a resume) re-reads and skips, deterministically.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable, Iterator
from itertools import islice

import torch

from prefixtune.data.encoding import Encoded, length_bucketed_batches
from prefixtune.data.records import Example

SEED_STRIDE = 1_000_003  # buffer k of a pass shuffles with seed + epoch + SEED_STRIDE * k


def _lengths(items: list[Encoded]) -> list[int]:
    return [len(it.input_ids) + len(it.labels) for it in items]  # as Batches measures rows


class StreamingBatches:
    """A drop-in for ``Batches`` (``get``, ``total``, ``epoch_of``) that holds at most
    ``buffer`` examples (plus the few batches read ahead of the one asked)."""

    def __init__(self, open_stream: Callable[[], Iterator[Example]],
                 encode: Callable[[list[Example]], list[Encoded]],
                 collate: Callable[[list[Encoded]], dict[str, torch.Tensor]], batch_size: int,
                 *, seed: int = 0, buffer: int = 10_000, max_tokens: int = 0) -> None:  # fmt: skip
        if batch_size < 1 or buffer < 1:
            raise ValueError(f"batch_size ({batch_size}) and buffer ({buffer}) must be >= 1")
        self.open_stream, self.encode, self.collate = open_stream, encode, collate
        self.batch_size, self.seed, self.buffer, self.max_tokens = (
            batch_size,
            seed,
            buffer,
            max_tokens,
        )
        self.n_examples: int | None = None  # examples in one pass, once a pass has been read
        self._starts = [0]  # _starts[e]: index of epoch e's first micro-batch, as found
        self._ahead: deque[tuple[int, list[Encoded]]] = deque()  # read, not yet asked for
        self._plan: Iterator[tuple[int, list[Encoded]]] | None = None
        self._next = 0  # index of the micro-batch the plan yields next

    def _pass(self, epoch: int) -> Iterator[list[Encoded]]:
        """One pass's batches, buffer after buffer."""
        stream, k, count = iter(self.open_stream()), 0, 0
        while True:
            chunk = list(islice(stream, self.buffer))
            if not chunk:
                break
            count += len(chunk)
            items = self.encode(chunk)
            del chunk
            seed = self.seed + epoch + SEED_STRIDE * k
            for batch in length_bucketed_batches(_lengths(items), self.batch_size, seed=seed,
                                                 max_tokens=self.max_tokens or None):  # fmt: skip
                yield [items[i] for i in batch]
            del items  # before the next buffer is read
            k += 1
        if count == 0:
            raise ValueError("no items to batch: the training stream is empty")
        self.n_examples = count

    def _batches(self, epoch: int) -> Iterator[tuple[int, list[Encoded]]]:
        while True:
            for batch in self._pass(epoch):
                yield epoch, batch
            epoch += 1

    def _read_to(self, index: int) -> None:
        """Read ahead until micro-batch ``index`` is in ``_ahead``, restarting if it has passed."""
        if self._plan is None or index < (self._ahead[0][0] if self._ahead else self._next):
            epoch = bisect.bisect_right(self._starts, index) - 1 if self._plan else 0
            self._plan, self._next = self._batches(epoch), self._starts[epoch]
            self._ahead.clear()
        while self._next <= index:
            epoch, batch = next(self._plan)
            if epoch == len(self._starts):  # the first batch of a new pass
                self._starts.append(self._next)
            self._ahead.append((self._next, batch))
            self._next += 1

    def get(self, index: int) -> dict[str, torch.Tensor]:
        """Micro-batch ``index`` of the run, collated (batches before it are dropped)."""
        self._read_to(index)
        while self._ahead[0][0] < index:
            self._ahead.popleft()
        return self.collate(self._ahead.popleft()[1])

    def epoch_of(self, index: int) -> int:
        """The pass micro-batch ``index`` belongs to (reads ahead to it if not yet read)."""
        if index >= self._next:
            self._read_to(index)
        return bisect.bisect_right(self._starts, index) - 1

    def per_epoch(self) -> int:
        """Micro-batches in one pass, counted from one read of the stream (no tokenizing):
        without a token cap each full buffer gives ceil(buffer / batch_size) batches."""
        if self.max_tokens:
            raise ValueError(
                "with a token cap the batches of a streamed pass are known only once read: "
                "set --max-steps"
            )
        if self.n_examples is None:
            self.n_examples = sum(1 for _ in self.open_stream())
        if self.n_examples == 0:
            raise ValueError("no items to batch: the training stream is empty")
        full, rest = divmod(self.n_examples, self.buffer)
        per = full * math.ceil(self.buffer / self.batch_size)
        return per + math.ceil(rest / self.batch_size)

    def total(self, epochs: float) -> int:
        """Micro-batches in ``epochs`` passes (a fractional pass: that share, rounded up)."""
        per = self.per_epoch()
        whole = math.floor(epochs)
        return whole * per + math.ceil((epochs - whole) * per)
