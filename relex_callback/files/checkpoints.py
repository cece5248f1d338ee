"""Hugging Face checkpoints on disk and in the trainer: where every tensor is read from, and the safetensors format
they are written in.

Readers (*sources*): :class:`DirectorySource` (a checkpoint directory: ``model.safetensors`` or an index and its
shards), :class:`MappedSafetensors` / :class:`MappedSource` (the same files memory-mapped one tensor at a time, for
streaming reads from the page cache), :class:`ModelSource` (the live model in the trainer). Checkpoint discovery for
``relex extrapolate``: :func:`discover_checkpoints`. Writing: :func:`write_weights` (shards + index, like
``save_pretrained``; not atomic by itself: the writers of :mod:`relex_callback.files.writers` assemble it in a temporary
directory), :func:`write_shard` (refuses NaN/Inf), :func:`write_model_extras`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass
from typing import Callable, Optional, Sequence
import mmap

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import DEFAULTS, parse_size
from ..errors import RelexInputError, RelexNonFiniteError
from .fs import read_json, read_safetensors_header, start_writeback, write_json
from ..compat import tied_copies

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"  # a PEFT adapter directory (adapter_config.json beside it)
ADAPTER_KEYS = "relex_keys.json"  # in an adapter relex saved: trainable parameter name -> key in the adapter file
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
CONFIG_FILES = ("config.json", "generation_config.json", "adapter_config.json")

# Directory names that carry a step number: checkpoint-N (Trainer), global_step_N (verl, DeepSpeed), step_N, step-N.
STEP_DIR = re.compile(r"^(?:checkpoint|global_step|step)[-_](\d+)$")
VERL_SUBDIR = os.path.join("actor", "huggingface")
WEIGHT_FILES = (WEIGHTS_NAME, INDEX_NAME)


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


def shard_names(n: int, weights_name: str = WEIGHTS_NAME) -> list[str]:
    if n == 1:
        return [weights_name]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class DirectorySource:
    """A Hugging Face checkpoint directory: weights from its safetensors, config and tokenizer files copied."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isdir(path):
            raise RelexInputError(f"{path} is not a directory")
        index = os.path.join(path, INDEX_NAME)
        single = os.path.join(path, WEIGHTS_NAME)
        adapter = os.path.join(path, ADAPTER_WEIGHTS_NAME)
        self.weights_name = WEIGHTS_NAME
        if not os.path.isfile(single) and not os.path.isfile(index) and os.path.isfile(adapter):
            single, self.weights_name = adapter, ADAPTER_WEIGHTS_NAME
        if os.path.isfile(index):
            try:
                wm = read_json(index)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise RelexInputError(f"{index} is not a valid safetensors index: {e}") from None
            if not isinstance(wm, dict) or any(not isinstance(k, str) or not isinstance(v, str) or not v
                                               or os.path.basename(v) != v for k, v in wm.items()):
                raise RelexInputError(f"{index} is not a valid safetensors index: its weight_map must map tensor names "
                                      "to file names in the same directory")
            files = list(dict.fromkeys(wm.values()))
        elif os.path.isfile(single):
            files = [self.weights_name]
        else:
            raise RelexInputError(
                f"{path} has no {WEIGHTS_NAME} or {INDEX_NAME}; save checkpoints with safetensors (the default of "
                "save_pretrained)"
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
                        self.meta[k] = (tuple(sl.get_shape()), st_dtype(sl.get_dtype()))
                        self.keys.append(k)
            except Exception as e:  # safetensors raises its own error types for corrupt files
                raise RelexInputError(f"cannot read {fp}: {e}; the file is missing or corrupt") from None
        if os.path.isfile(index):  # what the index claims is where it says
            wrong = [k for k, fn in wm.items() if self.key_file.get(k) != os.path.join(path, fn)]
            if wrong:
                raise RelexInputError(f"{index} maps {len(wrong)} tensor(s) to files that do not hold them (e.g. "
                                      f"{wrong[0]} -> {wm[wrong[0]]}); the index and its shards are not one checkpoint")
        self._handles = {}

    @property
    def weights_bytes(self) -> int:
        """Bytes of the weight files (what one full checkpoint written from this one takes on disk)."""
        return sum(os.path.getsize(f) for f in set(self.key_file.values()))

    def get(self, key: str) -> torch.Tensor:
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


def st_dtype(name: str) -> torch.dtype:
    table = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", torch.uint8),
        "F8_E5M2": getattr(torch, "float8_e5m2", torch.uint8),
    }
    return table.get(name, torch.float32)


def checkpoint_keys(model: torch.nn.Module, sd: dict) -> list[str]:
    """The keys ``save_pretrained`` writes: ``state_dict()`` minus the tied copies (``lm_head.weight`` of tied
    embeddings; found by sharing, the same on every transformers release: :func:`relex_callback.compat.tied_copies`),
    so tied weights stay tied when the checkpoint is loaded and the keys equal the tracked names."""
    tied = tied_copies(model, sd)
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


# ----------------------------------------------------------------------------------------- memory-mapped reading
class MappedSafetensors:
    """One safetensors file whose tensors are memory-mapped one at a time: ``get(name)`` is a view of the page cache
    (a private mapping of just that tensor's pages, no copy), unmapped when the tensor is freed, so the resident
    memory never holds a whole checkpoint. The header is checked against the file size when opened: a truncated
    file is refused before any work."""

    def __init__(self, path: str):
        self.path = path
        try:
            header, start, size = read_safetensors_header(path)
            hlen = start - 8
        except (OSError, ValueError) as e:
            raise RelexInputError(f"cannot read {path}: {e}; the file is missing, truncated or corrupt") from None
        header.pop("__metadata__", None)
        self.start = 8 + hlen
        for k, v in header.items():
            b, e = v["data_offsets"]
            if self.start + e > size:
                raise RelexInputError(
                    f"cannot read {path}: tensor {k} ends at byte {self.start + e} of a {size}-byte file; the file is "
                    "truncated"
                )
        self.header = header
        self.size = size
        self._fd = None
        self._last = None

    def get(self, name: str):
        h = self.header[name]
        b, e = h["data_offsets"]
        dtype = st_dtype(h["dtype"])  # the dtype DirectorySource.meta reports for it (the shape/dtype checks use that)
        if e == b:
            return torch.empty(h["shape"], dtype=dtype)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        lo = (self.start + b) // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        if self._last is not None:
            # the previous tensor has been consumed: drop its pages from this process (they stay in the page cache;
            # a later touch faults them back in), so at most one tensor of a checkpoint is resident at a time
            try:
                self._last.madvise(mmap.MADV_DONTNEED)
            except (ValueError, OSError):
                pass
        mm = mmap.mmap(
            self._fd, self.start + e - lo, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=lo
        )
        self._last = mm
        raw = torch.frombuffer(mm, dtype=torch.uint8, offset=self.start + b - lo, count=e - b)  # keeps mm alive
        if (self.start + b) % dtype.itemsize:  # unaligned (old writers): one copy
            raw = raw.clone()
        return raw.view(dtype).reshape(h["shape"])

    def close(self):
        self._last = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class MappedSource:
    """The tensors of a :class:`~relex_callback.files.checkpoints.DirectorySource`, memory-mapped one at a time
    (:class:`MappedSafetensors`, each file opened on first use)."""

    def __init__(self, source):
        self.key_file = source.key_file
        self.files: dict[str, MappedSafetensors] = {}

    def get(self, name: str):
        fp = self.key_file[name]
        if fp not in self.files:
            self.files[fp] = MappedSafetensors(fp)
        return self.files[fp].get(name)

    def close(self):
        for mf in self.files.values():
            mf.close()  # the mappings stay valid after the descriptor is closed


def read_tensors(source, names: Sequence[str], device: str = "cpu"):
    """Yield the tensors ``names`` of a :class:`~relex_callback.files.checkpoints.DirectorySource` one at a time,
    memory-mapped from its safetensors files (no copy on CPU: the store subtracts theta_0 straight from the page
    cache)."""
    mapped = MappedSource(source)
    try:
        for n in names:
            t = mapped.get(n)
            yield t if device == "cpu" else t.to(device)
    finally:
        mapped.close()


# ------------------------------------------------------------------------------------ checkpoints of a run
@dataclass
class Checkpoint:
    step: int
    path: str  # the directory given (or found)
    weights: str  # the directory holding the safetensors (path, or path/actor/huggingface for verl)


def weights_dir(path: str) -> Optional[str]:
    """The directory with the weights: ``path`` itself or verl's ``path/actor/huggingface``; None when neither."""
    for d in (path, os.path.join(path, VERL_SUBDIR)):
        if any(os.path.isfile(os.path.join(d, f)) for f in WEIGHT_FILES):
            return d
    return None


from .fs import RELEX_MARKER  # noqa: E402  in every step-H/ relex writes: never read back as a training checkpoint


def is_relex_output(path: str) -> bool:
    return os.path.isfile(os.path.join(path, RELEX_MARKER))


def write_relex_marker(out_dir: str, horizon: int, tcut: int, run_id: Optional[str] = None):
    """Mark ``out_dir`` (a checkpoint being assembled) as relex's extrapolation to ``horizon`` from ``tcut`` by run
    ``run_id`` (the id the state file records): what :func:`relex_callback.files.fs.not_ours` checks before any removal
    or
    read-back."""
    write_json(os.path.join(out_dir, RELEX_MARKER), {"horizon": int(horizon), "tcut": int(tcut), "run_id": run_id,
                                                     "written_by": "relex_callback"}, durable=False)


def step_of(path: str) -> Optional[int]:
    m = STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def discover_checkpoints(
    paths: Sequence[str], steps: Optional[Sequence[int]] = None, stride: int = 1
) -> list[Checkpoint]:
    """Resolve ``--checkpoints`` (+ ``--steps``, ``--stride``) to checkpoints sorted by step.

    A single path that is not itself a checkpoint is a parent directory: its subdirectories named like
    ``checkpoint-N`` / ``global_step_N`` / ``step_N`` / ``step-N`` are the checkpoints. ``stride`` keeps the
    checkpoints whose step is a multiple of it (``--stride 10`` over steps 5, 10, 15, 20 keeps 10 and 20).
    """
    for p in paths:
        if not os.path.isdir(p):
            what = "is not a directory" if os.path.exists(p) else "does not exist"
            raise RelexInputError(
                f"--checkpoints {p} {what}; pass checkpoint directories or one directory holding them"
            )
    dirs = list(paths)
    if len(paths) == 1 and weights_dir(paths[0]) is None:
        parent = paths[0]
        if steps is not None:
            raise RelexInputError(
                f"--steps cannot be given with a parent directory ({parent}): its checkpoints are numbered by their "
                "names; "
                "pass the checkpoint directories themselves with --steps, in the same order"
            )
        named = [(int(STEP_DIR.match(d).group(1)), d) for d in os.listdir(parent)
                 if STEP_DIR.match(d) and os.path.isdir(os.path.join(parent, d))]
        ours = [d for _, d in named if is_relex_output(os.path.join(parent, d))]
        dirs = [os.path.join(parent, d) for _, d in sorted(named) if d not in ours]
        if not dirs:
            raise RelexInputError(
                f"{parent} is neither a checkpoint (no model.safetensors) nor a directory of checkpoints named "
                "checkpoint-N, global_step_N, step_N or step-N"
                + (f" (its {', '.join(sorted(ours))} were written by relex)" if ours else "")
            )
    found = []
    for d in dirs:
        if is_relex_output(d):
            raise RelexInputError(
                f"{d} is an extrapolated checkpoint written by relex ({RELEX_MARKER}), not a training checkpoint; "
                "leave "
                "it "
                "out of --checkpoints"
            )
        w = weights_dir(d)
        if w is None:
            raise RelexInputError(
                f"{d} has no model.safetensors or model.safetensors.index.json (nor actor/huggingface/ with them)"
            )
        found.append((d, w))
    if steps is not None:
        if len(steps) != len(found):
            raise RelexInputError(
                f"--steps gives {len(steps)} step numbers for {len(found)} checkpoints; give one per checkpoint"
            )
        numbered = list(steps)
    else:
        numbered = []
        for d, _ in found:
            s = step_of(d)
            if s is None:
                raise RelexInputError(
                    f"cannot tell the step of {d} from its name (expected checkpoint-N, global_step_N, step_N or "
                    "step-N); pass --steps"
                )
            numbered.append(s)
    bad = [s for s in numbered if s <= 0]
    if bad:
        raise RelexInputError(f"checkpoint steps must be > 0 (the base is step 0), got {bad}")
    seen = {}
    for s, (d, _) in zip(numbered, found):
        if s in seen:
            raise RelexInputError(f"step {s} appears twice ({seen[s]} and {d}); give each step once")
        seen[s] = d
    cks = sorted((Checkpoint(s, d, w) for s, (d, w) in zip(numbered, found)), key=lambda c: c.step)
    if stride < 1:
        raise RelexInputError(f"--stride must be >= 1, got {stride}")
    if stride > 1:
        kept = [c for c in cks if c.step % stride == 0]
        if len(kept) < 2:
            raise RelexInputError(
                f"--stride {stride} keeps {len(kept)} of the steps {[c.step for c in cks]} (steps divisible by "
                f"{stride}); "
                "a line needs at least 2: lower --stride"
            )
        cks = kept
    if len(cks) < 2:
        raise RelexInputError(f"{len(cks)} checkpoint given; a line needs at least 2")
    return cks


def check_same_tensors(base, names, ck, src):
    """Every tracked tensor present in ``src`` with the base's shape and dtype; no extra floating tensors."""
    for n in names:
        if n not in src.meta:
            raise RelexInputError(
                f"{ck.weights} has no tensor {n!r} (present in the base); all checkpoints must be of the same model"
            )
        if src.meta[n] != base.meta[n]:
            (s1, d1), (s2, d2) = base.meta[n], src.meta[n]
            raise RelexInputError(
                f"{n}: shape {list(s2)} {str(d2).replace('torch.', '')} in {ck.weights} but {list(s1)} "
                f"{str(d1).replace('torch.', '')} in the base; all checkpoints must be of the same model and dtype"
            )
    extra = [k for k, (_, dt) in src.meta.items() if k not in base.meta and dt.is_floating_point]
    if extra:
        raise RelexInputError(
            f"{ck.weights} has tensors the base lacks ({', '.join(extra[:3])}); all checkpoints must be of the same "
            "model"
        )


# ---------------------------------------------------------------------------------------------- writing
def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: Optional[dict] = None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata or {"format": "pt"})


def write_weights(
    out_dir: str,
    keys: list[str],
    meta: dict[str, tuple[tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    max_shard_size=DEFAULTS["max_shard_size"],
    weights_name: str = WEIGHTS_NAME,
):
    """Write ``keys`` (in order) as safetensors shards + index into ``out_dir`` (not atomic by itself)."""
    names, shards, weight_map, total = weights_layout(keys, meta, max_shard_size, weights_name)
    for name, shard in zip(names, shards):
        write_shard(os.path.join(out_dir, name), shard, meta, produce)
    if weight_map is not None:
        write_index(out_dir, weight_map, total)
    return names


def weights_layout(keys: Sequence[str], meta: dict, max_shard_size, weights_name: str = WEIGHTS_NAME):
    """The files a checkpoint of ``keys`` is written in: ``(names, shards, weight_map, total_bytes)``, ``shards[i]``
    the keys of file ``names[i]`` in order, ``weight_map`` the index's (``None`` for one file). An adapter file is
    never sharded (PEFT reads one file)."""
    entries = [(k, tensor_bytes(*meta[k])) for k in keys]
    shards = plan_shards(entries, max_shard_size)
    if weights_name != WEIGHTS_NAME and len(shards) > 1:
        shards = [[k for shard in shards for k in shard]]
    names = shard_names(len(shards), weights_name)
    weight_map = {k: n for n, shard in zip(names, shards) for k in shard} if len(shards) > 1 else None
    return names, shards, weight_map, sum(nb for _, nb in entries)


def all_finite(t: torch.Tensor) -> bool:
    """``bool(torch.isfinite(t).all())`` without its boolean tensor, the check of every tensor a checkpoint is written
    with. A NaN or an Inf anywhere makes a float32 sum NaN or Inf (NaN propagates; Inf plus a finite value is Inf,
    plus -Inf NaN), so a finite sum proves every element finite. Only when the sum is not finite (a NaN/Inf, or finite
    values whose sum overflows float32) is the exact element-wise check run. The sum reads each element once in its
    own dtype (float16/bfloat16 widened in registers, not into a copy); a float64 tensor gets the exact check, a
    float8 one the check of its float32 copy (torch has no isfinite for float8)."""
    if t.numel() == 0:
        return True
    if t.dtype in (torch.float32, torch.float16, torch.bfloat16) and math.isfinite(float(t.sum(dtype=torch.float32))):
        return True
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):  # float8: no isfinite kernel
        t = t.float()  # exact (every float8 value is a float32), NaN and Inf kept
    return bool(torch.isfinite(t).all())


# safetensors' dtype codes (the dtypes relex writes a file of itself; any other goes through save_file)
ST_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"), ("uint32", "U32"),
                     ("uint64", "U64")):
    if hasattr(torch, _name):
        ST_CODES[getattr(torch, _name)] = _code


def safetensors_header(entries: Sequence[tuple[str, torch.dtype, tuple]], metadata: Optional[dict] = None):
    """The header bytes (length prefix included, padded with spaces to 8 bytes) of a safetensors file holding
    ``entries`` ``(name, dtype, shape)`` in that order, and the byte size of its data. The JSON is written as
    safetensors' own serializer writes it (no spaces, UTF-8 names as they are), so a file laid out in
    :func:`safetensors_order` has ``save_file``'s bytes."""
    hdr: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    off = 0
    for name, dtype, shape in entries:
        if dtype not in ST_CODES:
            raise RelexInputError(f"{name}: dtype {dtype} cannot be written to safetensors")
        nb = math.prod(shape) * dtype.itemsize
        hdr[name] = {"dtype": ST_CODES[dtype], "shape": [int(s) for s in shape], "data_offsets": [off, off + nb]}
        off += nb
    raw = json.dumps(hdr, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, off


@functools.lru_cache(maxsize=1)
def _dtype_rank() -> dict:
    """Each dtype's place in the order the installed safetensors lays tensors out (by dtype, then by name), read once
    from its own serializer: one empty tensor per dtype, named so that only the dtype decides. A dtype this
    safetensors does not take is left out (a shard holding it goes through ``save_file``, as it always did)."""
    from safetensors.torch import save

    dts = []
    for d in ST_CODES:
        try:
            save({"t": torch.empty(0, dtype=d)})
        except Exception:  # noqa: BLE001 - an older safetensors without this dtype
            continue
        dts.append(d)
    raw = save({f"t{i:03d}": torch.empty(0, dtype=d) for i, d in enumerate(dts)}, metadata={"format": "pt"})
    (n,) = struct.unpack("<Q", raw[:8])
    names = [k for k in json.loads(raw[8: 8 + n]) if k != "__metadata__"]  # JSON objects keep their order
    rank = {dts[int(k[1:])]: pos for pos, k in enumerate(names)}
    # the whole layout checked once on a small file: where this safetensors writes other bytes than ours, every
    # shard goes through save_file (the bytes of a checkpoint never depend on which writer relex used)
    probe = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b\u00e9": torch.ones(3, dtype=torch.bfloat16),
             "a": torch.zeros(0, dtype=torch.int64), "z": torch.tensor(True)}
    order = sorted(probe, key=lambda k: (rank.get(probe[k].dtype, -1), k))
    head, _ = safetensors_header([(k, probe[k].dtype, tuple(probe[k].shape)) for k in order])
    ours = head + b"".join(bytes(_raw(probe[k])) for k in order)
    return rank if ours == save(probe, metadata={"format": "pt"}) else {}


def safetensors_order(keys: Sequence[str], meta: dict) -> list[str]:
    """``keys`` in the order ``save_file`` writes them: grouped by dtype in the installed safetensors' order, then by
    name (Python's string order is the UTF-8 byte order safetensors sorts by)."""
    rank = _dtype_rank()
    return sorted(keys, key=lambda k: (rank[meta[k][1]], k))


def _raw(t: torch.Tensor) -> memoryview:
    """A tensor's bytes as safetensors stores them (row-major, native order), without a copy where it is
    contiguous."""
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def _write_tensor(f, t: torch.Tensor):
    if t.numel():
        f.write(_raw(t))


def _produced(produce, k: str, meta: dict, path: str, check_finite: bool = True) -> torch.Tensor:
    """``produce(k)``, checked against ``meta[k]`` (a mismatch is relex's bug) and for NaN/Inf (the input's fault)."""
    t = produce(k)
    shape, dtype = meta[k]
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise RuntimeError(f"{k}: produced {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")
    if check_finite and t.is_floating_point() and not all_finite(t):
        raise RelexNonFiniteError(
            f"{k} would be written with NaN/Inf values into {os.path.dirname(path)}; that checkpoint was not written "
            "(a diverged model, or an extrapolation from non-finite deltas)"
        )
    return t


# Bytes written before they are handed to the disk (:func:`relex_callback.files.fs.start_writeback`): a request per
# small tensor only adds system calls and small writes (a file of small tensors is left to its fsync); a large tensor
# goes to the disk as soon as it is written.
WRITEBACK_MIN = 8 << 20


class Writeback:
    """The bytes written to one file, handed to the disk (:func:`relex_callback.files.fs.start_writeback`) once
    :data:`WRITEBACK_MIN` of them have gathered: the range from the first to the last byte written since, which the
    writes may fill in any order. ``flush``: called first (a buffered file's bytes must reach the kernel)."""

    def __init__(self, fd: int, flush: Optional[Callable[[], None]] = None):
        self.fd, self.flush = fd, flush
        self.lo = self.hi = None
        self.count = 0

    def wrote(self, offset: int, nbytes: int, kick: bool = True):
        """``nbytes`` written at ``offset``; ``kick=False``: gathered but not handed over yet (a file's header,
        which goes with its first tensor)."""
        if nbytes <= 0:
            return
        end = offset + nbytes
        self.lo = offset if self.lo is None else min(self.lo, offset)
        self.hi = end if self.hi is None else max(self.hi, end)
        self.count += nbytes
        if kick and self.count >= WRITEBACK_MIN:  # small tensors gathered; the commit's fsync does the rest
            if self.flush is not None:
                self.flush()
            start_writeback(self.fd, self.lo, self.hi - self.lo)
            self.lo = self.hi = None
            self.count = 0


def write_tensor_file(path: str, keys: Sequence[str], meta: dict, produce: Callable[[str], torch.Tensor], *,
                      order: str = "safetensors", metadata: Optional[dict] = None, check_finite: bool = True):
    """A safetensors file of ``keys`` written tensor by tensor: the header first (the sizes are known from ``meta``),
    then each ``produce(key)`` as it comes, checked against ``meta[key]`` (shape, dtype) and for NaN/Inf (no
    checkpoint is ever written with them). Only one tensor is in memory at a time, and the disk starts on the bytes
    written (each :data:`WRITEBACK_MIN` of them, :func:`relex_callback.files.fs.start_writeback`) while the next
    tensors are computed; the file is made durable by whoever commits it. ``order="safetensors"`` lays the tensors
    out as ``save_file`` does (the same bytes, see :func:`safetensors_order`), ``"given"`` in the order of ``keys``.
    ``metadata``: the header's (default ``{"format": "pt"}``); ``check_finite=False`` writes NaN/Inf as they are (a
    file that is not a checkpoint)."""
    keys = safetensors_order(keys, meta) if order == "safetensors" else list(keys)
    head, _ = safetensors_header([(k, meta[k][1], tuple(meta[k][0])) for k in keys], metadata)
    with open(path, "wb") as f:
        f.write(head)
        disk = Writeback(f.fileno(), f.flush)
        disk.wrote(0, len(head), kick=False)
        off = len(head)
        for k in keys:
            t = _produced(produce, k, meta, path, check_finite)
            _write_tensor(f, t.to("cpu"))
            nb = t.numel() * t.element_size()
            disk.wrote(off, nb)
            off += nb


def write_tensors(path: str, tensors: dict, *, metadata: dict):
    """``save_file(tensors, path, metadata)``'s file (its bytes, up to the order of the metadata keys, which
    ``save_file`` varies from process to process), written tensor by tensor from ``tensors`` as they are: no copy of
    them (``save_file`` refuses views of one storage, so the callers cloned every direction for it), nothing checked
    for NaN/Inf. ``metadata`` is required: ``save_file`` without one writes no
    ``__metadata__``, which a file of relex always has. Through ``save_file`` where its layout is not relex's (see
    :func:`write_shard`)."""
    meta = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
    if all(m[1] in _dtype_rank() for m in meta.values()):
        write_tensor_file(path, list(tensors), meta, tensors.__getitem__, metadata=metadata, check_finite=False)
        return
    save_file({k: t.contiguous().clone() for k, t in tensors.items()}, path, metadata=metadata)


def write_shard(path: str, keys: list[str], meta: dict, produce: Callable[[str], torch.Tensor]):
    """Write one shard file of ``keys``, each ``produce(key)`` checked against ``meta[key]`` (shape, dtype) and for
    NaN/Inf (no checkpoint is ever written with them, single-process or distributed). Tensor by tensor in
    ``save_file``'s layout (:func:`write_tensor_file`: the same bytes, one tensor in memory at a time); a shard
    holding a dtype relex does not write itself goes through ``save_file`` (the shard's tensors then held in memory
    together)."""
    if all(meta[k][1] in _dtype_rank() for k in keys):
        write_tensor_file(path, keys, meta, produce)
        return
    tensors = {}
    for k in keys:
        tensors[k] = _produced(produce, k, meta, path).to("cpu")
    write_safetensors(path, tensors)


def write_index(out_dir: str, weight_map: dict[str, str], total_size: int):
    """``model.safetensors.index.json`` of a checkpoint written in more than one shard."""
    write_json(os.path.join(out_dir, INDEX_NAME), {"metadata": {"total_size": total_size}, "weight_map": weight_map},
               durable=False, indent=2, sort_keys=True)


def nonfinite_base(src, base: str, names: Sequence[str]):
    """Refuse a base (theta_0) holding NaN/Inf in any of ``names``, naming it as the base's fault: every delta from
    it is non-finite, so a checkpoint would be blamed otherwise. Asked only once a non-finite value was met."""
    bad = [n for n in names if not bool(torch.isfinite(src.get(n).float()).all())]
    if bad:
        raise RelexInputError(
            f"the base {base} (theta_0) holds NaN/Inf in {len(bad)} tensor(s): {', '.join(bad[:5])}"
            + (" ..." if len(bad) > 5 else "") + "; every delta from it is non-finite, whichever checkpoint: pass the "
            "finite checkpoint training started from as --base")
