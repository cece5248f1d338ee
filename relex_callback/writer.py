"""Hugging Face checkpoints written whole or not at all.

A checkpoint is assembled in a hidden temporary sibling (``.step-500.tmp-<pid>-<rand>``) and renamed into place at
the end, so a crash never leaves a half checkpoint under the final name. Weights are safetensors in the tensors'
own dtype, sharded like ``save_pretrained`` (``model-00001-of-0000N.safetensors`` + ``model.safetensors.index.json``)
above ``max_shard_size``; one shard is in memory at a time.

Where the untracked tensors and the config come from is a *source*: :class:`DirectorySource` (a checkpoint
directory on disk: the CLI) or :class:`ModelSource` (the live model in the trainer: the callback).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from typing import Callable, Optional

import torch

from .errors import RelexInputError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
CONFIG_FILES = ("config.json", "generation_config.json")


def parse_size(size) -> int:
    """``"50GB"`` / ``"500MB"`` / ``"10KiB"`` / int -> bytes (decimal units like transformers)."""
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    units = {"TIB": 1024**4, "GIB": 1024**3, "MIB": 1024**2, "KIB": 1024, "TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for u, m in units.items():
        if s.endswith(u):
            try:
                return int(float(s[: -len(u)]) * m)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise RelexInputError(f"max_shard_size={size!r} is not a size like '5GB' or '500MB'") from None


def tensor_bytes(shape, dtype: torch.dtype) -> int:
    """Bytes of a tensor of ``shape`` and ``dtype`` (what a shard of safetensors holds of it)."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def plan_shards(entries: list[tuple[str, int]], max_shard_size) -> list[list[str]]:
    """Split ``(key, nbytes)`` (in order) into shards of at most ``max_shard_size`` bytes (a tensor larger than the
    limit gets a shard of its own), like ``save_pretrained``."""
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for key, nb in entries:
        if shards[-1] and size + nb > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nb
    return [s for s in shards if s]


def shard_names(n: int) -> list[str]:
    if n == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


@contextlib.contextmanager
def atomic_directory(final: str, overwrite: bool = False):
    """Yield a temporary sibling of ``final``; rename it to ``final`` when the block succeeds, delete it when it
    raises. ``final`` existing is an error unless ``overwrite``."""
    final = os.path.abspath(final)
    if os.path.exists(final) and not overwrite:
        raise RelexInputError(f"{final} already exists; choose another output directory or pass overwrite")
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(final)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
        commit_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit_directory(tmp: str, final: str):
    """Flush ``tmp`` and rename it to ``final`` (replacing an existing ``final`` only after the new one is whole)."""
    parent = os.path.dirname(final)
    _fsync_dir_files(tmp)
    if os.path.exists(final):
        trash = os.path.join(parent, f".{os.path.basename(final)}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_path(parent)


def _fsync_path(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_dir_files(d: str):
    for name in os.listdir(d):
        p = os.path.join(d, name)
        if os.path.isfile(p):
            _fsync_path(p)
    _fsync_path(d)


def clean_stale_temporaries(parent: str, name: str):
    """Remove temporaries a killed writer left beside ``parent/name`` (never the final directory)."""
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        if entry.startswith(f".{name}.tmp-") or entry.startswith(f".{name}.old-"):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


# ----------------------------------------------------------------------------------------------- sources
class DirectorySource:
    """A Hugging Face checkpoint directory: weights from its safetensors, config and tokenizer files copied."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        if not os.path.isdir(path):
            raise RelexInputError(f"{path} is not a directory")
        index = os.path.join(path, INDEX_NAME)
        single = os.path.join(path, WEIGHTS_NAME)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    wm = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise RelexInputError(f"{index} is not a valid safetensors index: {e}") from None
            files = list(dict.fromkeys(wm.values()))
        elif os.path.isfile(single):
            files = [WEIGHTS_NAME]
        else:
            raise RelexInputError(
                f"{path} has no {WEIGHTS_NAME} or {INDEX_NAME}; save checkpoints with safetensors (the default of save_pretrained)"
            )
        self.key_file: dict[str, str] = {}
        self.meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.keys: list[str] = []
        for fn in files:
            fp = os.path.join(path, fn)
            try:
                with safe_open(fp, "pt") as f:
                    for k in f.keys():
                        sl = f.get_slice(k)
                        self.key_file[k] = fp
                        self.meta[k] = (tuple(sl.get_shape()), _st_dtype(sl.get_dtype()))
                        self.keys.append(k)
            except Exception as e:  # safetensors raises its own error types for corrupt files
                raise RelexInputError(f"cannot read {fp}: {e}; the file is missing or corrupt") from None
        self._handles = {}

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        fp = self.key_file[key]
        try:
            handle = self._handles.get(fp)
            if handle is None:  # one open (header parse + mmap) per file, not per tensor
                handle = self._handles[fp] = safe_open(fp, "pt")
            return handle.get_tensor(key)
        except Exception as e:
            raise RelexInputError(f"cannot read tensor {key} from {fp}: {e}") from None

    def write_extras(self, out_dir: str):
        for name in CONFIG_FILES + TOKENIZER_FILES:
            src = os.path.join(self.path, name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(out_dir, name))


def _st_dtype(name: str) -> torch.dtype:
    table = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", torch.uint8), "F8_E5M2": getattr(torch, "float8_e5m2", torch.uint8),
    }
    return table.get(name, torch.float32)


def checkpoint_keys(model: torch.nn.Module, sd: dict) -> list[str]:
    """The keys ``save_pretrained`` writes: ``state_dict()`` minus the tied copies (``all_tied_weights_keys``), so
    tied weights stay tied when the checkpoint is loaded."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    return [k for k in sd if k not in tied]


def write_model_extras(model: torch.nn.Module, tokenizer, out_dir: str):
    """Config, generation config and tokenizer of a live model, beside its weights."""
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg.save_pretrained(out_dir)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(out_dir)
        except Exception:  # a generation config that fails validation is not worth losing a checkpoint for
            pass
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out_dir)


class ModelSource:
    """The live model (and its tokenizer): untracked tensors from ``state_dict()`` (keys: :func:`checkpoint_keys`),
    config and tokenizer saved from the model."""

    def __init__(self, model: torch.nn.Module, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer
        # one state_dict() per source (it walks every module); its tensors share storage with the parameters, so
        # later updates are still seen
        self._sd = model.state_dict()
        self.keys = checkpoint_keys(model, self._sd)
        self.meta = {k: (tuple(self._sd[k].shape), self._sd[k].dtype) for k in self.keys}

    def get(self, key: str) -> torch.Tensor:
        return self._sd[key].detach().to("cpu").contiguous()

    def write_extras(self, out_dir: str):
        write_model_extras(self.model, self.tokenizer, out_dir)


# ---------------------------------------------------------------------------------------------- writing
def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: Optional[dict] = None):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata or {"format": "pt"})


def write_weights(
    out_dir: str,
    keys: list[str],
    meta: dict[str, tuple[tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    max_shard_size="50GB",
):
    """Write ``keys`` (in order) as safetensors shards + index into ``out_dir`` (not atomic by itself)."""
    entries = [(k, tensor_bytes(*meta[k])) for k in keys]
    shards = plan_shards(entries, max_shard_size)
    names = shard_names(len(shards))
    for name, shard in zip(names, shards):
        write_shard(os.path.join(out_dir, name), shard, meta, produce)
    if len(shards) > 1:
        write_index(out_dir, {k: n for n, shard in zip(names, shards) for k in shard}, sum(nb for _, nb in entries))
    return names


def write_shard(path: str, keys: list[str], meta: dict, produce: Callable[[str], torch.Tensor]):
    """Write one shard file of ``keys``, each ``produce(key)`` checked against ``meta[key]`` (shape, dtype) and for
    NaN/Inf (no checkpoint is ever written with them, single-process or distributed); the shard's tensors are the
    only ones held in memory."""
    tensors = {}
    for k in keys:
        t = produce(k)
        shape, dtype = meta[k]
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise RuntimeError(f"{k}: produced {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            from .errors import RelexNonFiniteError

            raise RelexNonFiniteError(
                f"{k} would be written with NaN/Inf values into {os.path.dirname(path)}; nothing was written (a diverged "
                "model, or an extrapolation from non-finite deltas)"
            )
        tensors[k] = t.to("cpu")
    write_safetensors(path, tensors)


def write_index(out_dir: str, weight_map: dict[str, str], total_size: int):
    """``model.safetensors.index.json`` of a checkpoint written in more than one shard."""
    with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
