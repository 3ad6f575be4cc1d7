"""PrefixBank: the folded prefixes one server holds for one frozen base model.

Prefixes are read from a directory (each subdirectory holds prefix.json/prefix.safetensors, or
is a run directory with prefix/ inside; the prefix id is the subdirectory name) or hot-loaded
one at a time. Each is checked against the model's geometry when it is loaded: a bad artifact is
reported in `errors` and skipped, the others keep serving. Tensors are kept in the model's dtype
and device, so a batch only gathers them: `gather(ids)` stacks the distinct prefixes of a batch
(`PrefixKV.stack`, shorter ones masked) with `rows` pointing each row at its own.
The id None means "no prefix": the plain base model.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from prefixtune.core.artifact import (
    PREFIX_JSON,
    ArtifactError,
    artifact_dir,
    check_fits,
    load_prefix,
)
from prefixtune.core.attention import PrefixKV
from prefixtune.core.injection import enable_prefixes
from prefixtune.core.prefix_encoder import KindShape, model_shapes

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class UnknownPrefixError(KeyError):
    """A request named a prefix id the bank does not hold."""


@dataclass(frozen=True)
class BankEntry:
    """One loaded prefix: kind -> (L, 2, H_kv, P, D) in the model's dtype/device."""

    id: str
    kv: dict[str, Tensor]
    path: str
    meta: dict[str, Any]

    @property
    def length(self) -> int:
        return next(iter(self.kv.values())).shape[-2]

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(sorted(self.kv))

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv.values())

    def describe(self, root: Path | None = None) -> dict[str, Any]:
        """What clients see; `path` is relative to `root` (never an absolute path)."""
        base_model = self.meta.get("base_model")
        return {
            "id": self.id,
            "length": self.length,
            "kinds": list(self.kinds),
            "bytes": self.num_bytes(),
            "dtype": str(next(iter(self.kv.values())).dtype).removeprefix("torch."),
            "base_model": base_model if isinstance(base_model, str) else None,
            "path": public_path(self.path, root),
        }


def public_path(path: str | Path, root: Path | None) -> str:
    """`path` relative to `root` when inside it, else only its last two parts: listings and
    errors shown to clients never reveal where the server keeps its files."""
    path = Path(path)
    if root is not None:
        for base in (root, root.resolve()):
            if path.is_relative_to(base):
                return str(path.relative_to(base))
    return str(Path(*path.parts[-2:])) if len(path.parts) > 1 else path.name


def check_id(prefix_id: str) -> str:
    """Prefix ids are directory-name-like: letters, digits, '.', '_', '-' (at most 128)."""
    if not ID_PATTERN.match(prefix_id):
        raise ArtifactError(
            f"prefix id {prefix_id!r}: use 1-128 letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit)"
        )
    return prefix_id


def _check_finite(kv: dict[str, Tensor], where: Path) -> None:
    """NaN/Inf keys or values (stored, or overflowing the model's dtype) would poison every
    sampling row that reads them: refuse them at load."""
    for kind, t in kv.items():
        if not bool(torch.isfinite(t).all()):
            dtype = str(t.dtype).removeprefix("torch.")
            raise ArtifactError(f"{where}: '{kind}' prefix holds non-finite values (NaN/Inf) "
                                f"in {dtype}")  # fmt: skip


class PrefixBank:
    """Folded prefixes validated against one model, gathered per batch by id (thread-safe)."""

    def __init__(self, model: PreTrainedModel, shapes: dict[str, KindShape] | None = None):
        self.model = model
        enable_prefixes(model)  # verified once per model: refuses one prefixes would get wrong
        self.shapes = shapes if shapes is not None else model_shapes(model)
        self.errors: dict[str, str] = {}
        self.root: Path | None = None  # the directory load_dir read; listings are relative to it
        self._entries: dict[str, BankEntry] = {}
        self._lock = threading.Lock()
        self._empty = self._zero_length_prefix()

    def _zero_length_prefix(self) -> dict[str, Tensor]:
        """A prefix with no positions for every kind: rows without a prefix in a mixed batch."""
        param = next(self.model.parameters())
        return {
            kind: torch.zeros(s.layers, 2, s.heads, 0, s.head_dim, dtype=param.dtype,
                              device=param.device)
            for kind, s in self.shapes.items()
        }  # fmt: skip

    # ------------------------------------------------------------------ loading
    def load(self, prefix_id: str, path: str | Path, *, replace: bool = False) -> BankEntry:
        """Load one artifact (a prefix directory or a run directory) under `prefix_id`.

        Raises ArtifactError (missing/corrupt/wrong shape) or FileExistsError (id taken and
        not `replace`). Rows already decoding keep the prefix they started with.
        """
        check_id(prefix_id)
        if not replace and prefix_id in self._entries:
            raise FileExistsError(f"prefix {prefix_id!r} is already loaded (set replace=true)")
        path = Path(path)
        found = artifact_dir(path)
        if found is None:
            raise ArtifactError(
                f"{path}: no {PREFIX_JSON} here or in {path / 'prefix'} (a prefix or run directory)"
            )
        folded = load_prefix(found)
        if folded.meta.get("method", "prefix") != "prefix":
            raise ArtifactError(
                f"{found}: a {folded.meta['method']!r} artifact is not a prefix every position "
                "sees; serve it with `prefixtune generate --prefix`"
            )
        check_fits(folded.shapes(), self.shapes, str(found))
        param = next(self.model.parameters())
        kv = {k: t.to(device=param.device, dtype=param.dtype) for k, t in folded.kv.items()}
        _check_finite(kv, found)
        entry = BankEntry(prefix_id, kv, str(found), folded.meta)
        with self._lock:
            if not replace and prefix_id in self._entries:
                raise FileExistsError(f"prefix {prefix_id!r} is already loaded (set replace=true)")
            self._entries[prefix_id] = entry
            self.errors.pop(prefix_id, None)
        log.info("loaded prefix %r from %s (%d positions)", prefix_id, found, entry.length)
        return entry

    def load_dir(self, root: str | Path) -> dict[str, str]:
        """Load every prefix under `root`; returns {id: error} for those skipped (also kept in
        `errors`). A root that is itself a prefix directory loads under its own name."""
        root = Path(root)
        if not root.is_dir():
            raise ArtifactError(f"{root}: not a directory of prefixes")
        self.root = root
        candidates = [root] if artifact_dir(root) else sorted(root.iterdir())
        failed: dict[str, str] = {}
        for path in candidates:
            if not path.is_dir() or path.name.startswith(".") or artifact_dir(path) is None:
                continue
            try:
                self.load(path.name, path, replace=True)
            except (ArtifactError, OSError, ValueError) as err:
                failed[path.name] = self.public_error(err)
                log.error("skipped prefix %r: %s", path.name, err)
        with self._lock:
            self.errors.update(failed)
        return failed

    def public_error(self, err: BaseException) -> str:
        """An error message with paths under the prefixes directory made relative to it."""
        text = str(err)
        if self.root is not None:
            for base in {str(self.root.resolve()), str(self.root)}:
                text = text.replace(base.rstrip("/") + "/", "")
        return text

    def remove(self, prefix_id: str) -> None:
        with self._lock:
            if self._entries.pop(prefix_id, None) is None:
                raise UnknownPrefixError(prefix_id)

    # ------------------------------------------------------------------ lookup
    def get(self, prefix_id: str) -> BankEntry:
        entry = self._entries.get(prefix_id)
        if entry is None:
            raise UnknownPrefixError(prefix_id)
        return entry

    def __contains__(self, prefix_id: object) -> bool:
        return prefix_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def ids(self) -> list[str]:
        return sorted(self._entries)

    def kinds_of(self, prefix_id: str | None) -> tuple[str, ...]:
        """The attention kinds a prefix covers (no prefix: every kind, as zero-length)."""
        return tuple(sorted(self.shapes)) if prefix_id is None else self.get(prefix_id).kinds

    def describe(self) -> dict[str, Any]:
        """What GET /v1/prefixes reports: each prefix with its bytes, total, load errors."""
        with self._lock:
            entries = [self._entries[k].describe(self.root) for k in sorted(self._entries)]
            errors = dict(self.errors)
        total = sum(e["bytes"] for e in entries)
        return {"prefixes": entries, "total_bytes": total, "errors": errors}

    def gather(self, ids: list[str | None]) -> PrefixKV | None:
        """One PrefixKV for a batch whose row i uses prefix ids[i] (None: no prefix).

        Only the batch's distinct prefixes are stacked (N, L, 2, H_kv, P_max, D); `rows` maps
        each row to its stack index. Returns None when no row has a prefix. Raises
        UnknownPrefixError for an id that is not loaded and ValueError when the batch mixes
        prefixes that cover different attention kinds.
        """
        if all(i is None for i in ids):
            return None
        with self._lock:
            distinct = list(dict.fromkeys(ids))
            tensors = [self._empty if i is None else self.get(i).kv for i in distinct]
        index = {prefix_id: n for n, prefix_id in enumerate(distinct)}
        device = next(iter(tensors[0].values())).device
        rows = torch.tensor([index[i] for i in ids], dtype=torch.long, device=device)
        if any(i is None for i in distinct):
            kinds = set(next(t for i, t in zip(distinct, tensors, strict=True) if i is not None))
            tensors = [{k: t[k] for k in kinds} if i is None else t
                       for i, t in zip(distinct, tensors, strict=True)]  # fmt: skip
        return PrefixKV.stack(tensors, rows=rows)
