"""Hub ids for ``relex plan --model`` and ``--base``: a model id (``Qwen/Qwen3-8B-Base``) is read from the Hugging Face
cache, never from the network. A local path always wins; an id that is not cached gets one line saying how to
download it. The cache is wherever ``huggingface_hub`` looks (``HF_HUB_CACHE``, ``HF_HOME``, ``~/.cache/huggingface``).
"""

from __future__ import annotations

import os
import re

from ..errors import RelexInputError

# what a hub id looks like: "name" or "org/name", letters, digits, "-", "_", "." (no path separators beyond one "/",
# no leading "." or "/"): anything else is a path that does not exist
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def looks_like_hub_id(value: str) -> bool:
    return bool(_HUB_ID.match(value)) and ".." not in value and not value.endswith(".json")


def resolve_model(option: str, value: str, *, config_only: bool = False) -> str:
    """``value`` itself when it exists on disk; else the cached snapshot directory of the hub model ``value``.

    Raises :class:`RelexInputError` when ``value`` is neither, naming the command that downloads it (``config_only``:
    only its ``config.json``, all ``relex plan`` reads)."""
    if os.path.exists(value) or not looks_like_hub_id(value):
        return value
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub import constants

        path = snapshot_download(value, local_files_only=True)
        cache = constants.HF_HUB_CACHE
    except ImportError:
        raise RelexInputError(f"{option} {value} does not exist; pass a local directory (huggingface_hub, which reads "
                              "hub ids from the Hugging Face cache, is not installed)") from None
    except Exception:  # not cached (LocalEntryNotFoundError), or not a valid id for the hub's own checks
        try:
            from huggingface_hub import constants

            cache = constants.HF_HUB_CACHE
        except Exception:  # pragma: no cover
            cache = "the Hugging Face cache"
        what = f"{value} config.json" if config_only else value
        raise RelexInputError(f"{option} {value} is neither a local path nor a model in the Hugging Face cache "
                              f"({cache}); download it first: hf download {what}") from None
    if config_only and not os.path.isfile(os.path.join(path, "config.json")):
        raise RelexInputError(f"{option} {value}: the cached snapshot {path} has no config.json; download it: "
                              f"hf download {value} config.json")
    return path


def label(value: str, resolved: str) -> str:
    """A short name for a model given as ``value`` and read from ``resolved`` (the hub id's last part for a cached
    snapshot, whose directory name is a commit hash)."""
    if resolved != value:
        return value.rsplit("/", 1)[-1]
    return os.path.basename(os.path.normpath(value if os.path.isdir(value) else os.path.dirname(value) or "."))
