"""Prefix artifacts on disk.

Folded prefix (what serving and evaluation load): a directory with
    prefix.safetensors   one tensor per attention kind, (L, 2, H_kv, P, D), fp32 or bf16
    prefix.json          format, base model, geometry, prefix config, sha256 of the tensors
Encoder checkpoint (what training resumes from; keeps the MLP):
    encoder.safetensors  the PrefixEncoder state dict
    encoder.json         prefix config, geometry, hidden size
Files are written to temp names and renamed; the JSON's sha256 ties it to its tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from prefixtune.config import PrefixConfig, from_dict, to_dict
from prefixtune.core.atomic_files import atomic_write, atomic_write_json, sha256_file
from prefixtune.core.attention import PrefixKV
from prefixtune.core.models import DTYPES
from prefixtune.core.prefix_encoder import KindShape, PrefixEncoder

FORMAT = "prefixtune-prefix"
VERSION = 1
PREFIX_TENSORS, PREFIX_JSON = "prefix.safetensors", "prefix.json"
RUN_ARTIFACT = "prefix"  # a run dir keeps its artifact here (train.ARTIFACT_DIR)
ENCODER_TENSORS, ENCODER_JSON = "encoder.safetensors", "encoder.json"
SAVE_DTYPES = ("float32", "bfloat16")  # what an artifact may store its tensors in
MAX_JSON_BYTES = 16 << 20  # a prefix.json is a few kB; refuse to read a huge one


class ArtifactError(ValueError):
    """A prefix file that is missing, corrupt, or made for another model; names the file."""


@dataclass
class FoldedPrefix:
    """A baked prefix: kind -> (L, 2, H_kv, P, D) keys/values plus its metadata."""

    kv: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return next(iter(self.kv.values())).shape[-2]

    def shapes(self) -> dict[str, KindShape]:
        return {kind: KindShape(t.shape[0], t.shape[2], t.shape[4]) for kind, t in self.kv.items()}

    def to_prefix_kv(self, device: str | torch.device = "cpu") -> PrefixKV:
        """A PrefixKV shared by every row of a batch."""
        return PrefixKV({kind: t[None].to(device) for kind, t in self.kv.items()})

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv.values())


def _shapes_json(shapes: dict[str, KindShape]) -> dict[str, list[int]]:
    return {kind: [s.layers, s.heads, s.head_dim] for kind, s in shapes.items()}


def artifact_dir(path: Path) -> Path | None:
    """The folded-prefix directory at `path` (itself, or a run's prefix/), or None."""
    if (path / PREFIX_JSON).is_file():
        return path
    if (path / RUN_ARTIFACT / PREFIX_JSON).is_file():
        return path / RUN_ARTIFACT
    return None


def trained_separator(meta: dict[str, Any]) -> str:
    """The prompt separator an artifact was trained with ("\n" for artifacts older than it)."""
    separator = meta.get("separator", "\n")
    return separator if isinstance(separator, str) else "\n"


def save_dtype(name: str) -> torch.dtype:
    """The torch dtype of a SAVE_DTYPES name (--save-dtype); ArtifactError for any other."""
    if name not in SAVE_DTYPES:
        raise ArtifactError(f"--save-dtype must be one of {sorted(SAVE_DTYPES)}, got {name!r}")
    return DTYPES[name]


def save_prefix(
    directory: str | Path,
    kv: dict[str, Tensor],
    *,
    base_model: str,
    prefix_config: PrefixConfig | None = None,
    dtype: str = "float32",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a folded prefix to `directory` (created if needed); returns the directory."""
    torch_dtype = save_dtype(dtype)
    directory = Path(directory)
    tensors = {kind: t.detach().to(torch_dtype).contiguous().cpu() for kind, t in kv.items()}
    path = atomic_write(
        directory / PREFIX_TENSORS,
        lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}),
    )
    folded = FoldedPrefix(tensors)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "base_model": base_model,
        "length": folded.length,
        "dtype": dtype,
        "shapes": _shapes_json(folded.shapes()),
        "prefix_config": to_dict(prefix_config) if prefix_config else None,
        "sha256": sha256_file(path),
        **(extra or {}),
    }
    atomic_write_json(directory / PREFIX_JSON, meta)
    return directory


def _regular_file(path: Path) -> Path:
    """`path` if it is a regular file (after links); FIFOs and devices would block or never end."""
    if not path.exists():
        raise ArtifactError(f"{path}: not found (is {path.parent} a prefix directory?)")
    if not path.is_file():
        raise ArtifactError(f"{path}: not a regular file (a FIFO, device or directory)")
    return path


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} (JSON allows only finite numbers)")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object of valid UTF-8 text without NaN/Infinity (anything else: ArtifactError)."""
    _regular_file(path)
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ArtifactError(f"{path}: larger than {MAX_JSON_BYTES} bytes")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_reject_constant)
        json.dumps(data, allow_nan=False, ensure_ascii=False).encode("utf-8")  # no lone \ud800
    except UnicodeError as err:
        raise ArtifactError(f"{path}: not valid UTF-8 text ({err.reason})") from None
    except ValueError as err:  # JSONDecodeError included
        raise ArtifactError(f"{path}: corrupt JSON ({err})") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: not a JSON object (found a {type(data).__name__})")
    return data


def _check_kv(path: Path, tensors: dict[str, Tensor]) -> None:
    """Folded prefix tensors: at least one kind, each (L, 2, H_kv, P, D) with P >= 1."""
    if not tensors:
        raise ArtifactError(f"{path}: holds no tensors")
    for kind, t in tensors.items():
        if t.dim() != 5 or t.shape[1] != 2:
            raise ArtifactError(f"{path}: '{kind}' has shape {tuple(t.shape)}; a folded prefix "
                                "has 5 dimensions (layers, 2, kv heads, positions, head dim)")  # fmt: skip
        if t.shape[3] == 0 or t.numel() == 0:
            raise ArtifactError(f"{path}: '{kind}' has no positions (shape {tuple(t.shape)})")


def read_tensors(path: Path, expected_sha: str | None) -> dict[str, Tensor]:
    _regular_file(path)
    if expected_sha and sha256_file(path) != expected_sha:
        raise ArtifactError(f"{path}: checksum mismatch (file truncated, corrupt or replaced)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path}: corrupt or truncated safetensors file ({err})") from None


def load_prefix(directory: str | Path) -> FoldedPrefix:
    """Read a folded prefix written by `save_prefix` (fp32 in memory)."""
    directory = Path(directory)
    meta = read_json(directory / PREFIX_JSON)
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{directory / PREFIX_JSON}: not a prefixtune prefix (format field)")
    tensors = read_tensors(directory / PREFIX_TENSORS, meta.get("sha256"))
    _check_kv(directory / PREFIX_TENSORS, tensors)
    kv = {kind: t.float() for kind, t in tensors.items()}
    folded = FoldedPrefix(kv, meta)
    if _shapes_json(folded.shapes()) != meta.get("shapes"):
        raise ArtifactError(f"{directory}: tensor shapes disagree with {PREFIX_JSON}")
    return folded


def check_fits(
    shapes: dict[str, KindShape], model_shapes: dict[str, KindShape], where: str
) -> None:
    """Raise ArtifactError naming layers/heads/dims when a prefix does not fit a model."""
    for kind, shape in shapes.items():
        have = model_shapes.get(kind)
        if have is None:
            raise ArtifactError(
                f"{where}: has '{kind}' prefixes but the model has only {sorted(model_shapes)}"
            )
        if have != shape:
            raise ArtifactError(
                f"{where}: '{kind}' prefix is for {shape.describe()}, "
                f"but the model has {have.describe()}"
            )


def save_encoder(directory: str | Path, encoder: PrefixEncoder, hidden_size: int) -> Path:
    """Write the trainable PrefixEncoder (MLP included) so training can resume."""
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    path = atomic_write(directory / ENCODER_TENSORS, lambda tmp: save_file(state, str(tmp)))
    meta = {
        "format": "prefixtune-encoder",
        "version": VERSION,
        "prefix_config": to_dict(encoder.config),
        "shapes": _shapes_json(encoder.shapes),
        "hidden_size": hidden_size,
        "sha256": sha256_file(path),
    }
    atomic_write_json(directory / ENCODER_JSON, meta)
    return directory


def load_encoder(directory: str | Path) -> PrefixEncoder:
    """Rebuild a PrefixEncoder (with its MLP) from `save_encoder` output."""
    directory = Path(directory)
    meta = read_json(directory / ENCODER_JSON)
    state = read_tensors(directory / ENCODER_TENSORS, meta.get("sha256"))
    config = from_dict(PrefixConfig, meta["prefix_config"], source=str(directory / ENCODER_JSON))
    shapes = {kind: KindShape(*dims) for kind, dims in meta["shapes"].items()}
    encoder = PrefixEncoder(config, shapes, meta["hidden_size"])
    encoder.load_state_dict(state)
    return encoder
