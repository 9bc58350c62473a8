"""Model folders wherever they are: a local path as is, a `gs://` folder as a cached local copy of the parts read,
a Hugging Face Hub id (`ORG/NAME`, optionally `@REVISION`) as its snapshot in the Hub's cache.

Readers that need real files (memory-mapped safetensors, transformers' tokenizers) take `local_model_folder(path)`.
The order is diffusers' `from_pretrained`'s: an existing local path wins; `gs://...` is Cloud Storage; a string
`ORG/NAME[@REV]` that is no local path is a Hub id, fetched with `huggingface_hub.snapshot_download` into
`$HF_HOME/hub` (only the parts asked for; `HF_HUB_OFFLINE=1`: the cache only); anything else is a one-line error.
An unknown id, an unreachable Hub or an id missing from the offline cache is one line within seconds (no retries).
For a diffusers pipeline folder on Cloud Storage only its top-level JSON files and the component subfolders asked
for are downloaded (a hub snapshot also holds single-file checkpoints of several GB at its top level); any other
folder (a transformer folder, a LoRA adapter) is downloaded whole. JSON files of a converted checkpoint are read
through `swd_jax.storage`; its orbax params are read from `gs://` directly.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from swd_jax import storage

PIPELINE_PARTS = ("model_index.json", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
                  "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler")
NOT_TRANSFORMER = tuple(p for p in PIPELINE_PARTS if p != "transformer")
# Hub repos hold the same weights in several formats (and open_clip / single-file checkpoints beside the
# transformers / diffusers ones); we read safetensors and JSON/text files only.
HUB_IGNORE = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.pb", "*.gguf",
              "*.mlmodel*", "open_clip_*", "flax_model*", "tf_model*", "*.png", "*.jpg", "*.jpeg", "*.webp")
HUB_TIMEOUT_S = 10.0  # per Hub request (connect / read); no request is retried
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?")


def hub_id(path: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `path` has the form ORG/NAME[@REV] and is no local path; else None."""
    m = _HUB_ID.fullmatch(path)
    if m is None or os.path.exists(path) or ".." in m["repo"] or "--" in m["repo"] or m["repo"].endswith("."):
        return None
    return m["repo"], m["rev"]


def from_hub(path: str, parts: tuple[str, ...] | None = PIPELINE_PARTS, what: str = "model folder") -> str:
    """The local snapshot of Hub id `path` (see the module doc), or `path` unchanged when it is no Hub id.

    A pipeline repo (with model_index.json) brings its top-level JSON files and the subfolders in `parts` (an
    entry with a '/' is one file, e.g. "transformer/config.json"; None: every subfolder); any other repo comes
    whole, less the formats in HUB_IGNORE."""
    found = hub_id(path)
    if found is None:
        return path
    repo, revision = found
    probe = _snapshot(path, repo, revision, ["model_index.json"], what, probe=True)
    if probe is not None and os.path.isfile(os.path.join(probe, "model_index.json")):
        allow = ["*.json"] if parts is None else ["model_index.json"]
        allow += ["*/*"] if parts is None else [p if "/" in p else f"{p}/*" for p in parts if p != "model_index.json"]
        return _snapshot(path, repo, revision, allow, what)
    return _snapshot(path, repo, revision, None, what)


def _hub_offline() -> bool:
    from huggingface_hub import constants
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _hub_cache() -> str:
    """The Hub's cache folder, from the environment now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def _snapshot(path: str, repo: str, revision: str | None, allow: list[str] | None, what: str,
              probe: bool = False) -> str | None:
    """snapshot_download with one-line errors; requests time out after HUB_TIMEOUT_S and are not retried.
    `probe`: None (not an error, no warning) when no file matches `allow`."""
    import huggingface_hub
    from huggingface_hub import errors
    cache, offline = _hub_cache(), _hub_offline()
    _bound_hub_requests()
    hub_log = logging.getLogger("huggingface_hub._snapshot_download")
    level = hub_log.level
    if probe:
        hub_log.setLevel(logging.ERROR)  # its "No files matched allow_patterns" warning: the answer we look for
    try:
        snapshot = huggingface_hub.snapshot_download(repo, revision=revision, cache_dir=cache, allow_patterns=allow,
                                                     ignore_patterns=list(HUB_IGNORE), local_files_only=offline,
                                                     etag_timeout=HUB_TIMEOUT_S)
    except errors.RevisionNotFoundError:
        raise FileNotFoundError(f"{what} {path}: the Hugging Face Hub has no revision {revision!r} of {repo}") from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError):
        raise FileNotFoundError(f"{what} {path}: no such folder, and no model {repo} on the Hugging Face Hub (or "
                                "it is private or gated: log in with `hf auth login`)") from None
    except errors.IncompleteSnapshotError as e:
        raise FileNotFoundError(f"{what} {path}: the cached Hub snapshot is incomplete and the Hub cannot be "
                                f"reached: {e}") from None
    except errors.LocalEntryNotFoundError as e:
        if offline:
            raise FileNotFoundError(f"{what} {path}: no such folder, and Hub id {path} is not in the local Hugging "
                                    f"Face cache ({cache}) and HF_HUB_OFFLINE=1 is set") from None
        cause = e.__cause__ or e
        raise FileNotFoundError(f"{what} {path}: no such folder, the Hugging Face Hub could not be reached "
                                f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}) and "
                                f"{repo} is not in the local cache ({cache})") from None
    except errors.HfHubHTTPError as e:
        raise FileNotFoundError(f"{what} {path}: the Hugging Face Hub answered {e}".splitlines()[0]) from None
    finally:
        hub_log.setLevel(level)
    if not os.path.isdir(snapshot) or not os.listdir(snapshot):  # patterns that matched no file
        if probe:
            return None
        raise FileNotFoundError(f"{what} {path}: the Hub repo {repo} holds none of {allow or 'the files read'}")
    return snapshot


_bounded = False


def _bound_hub_requests() -> None:
    """huggingface_hub's shared HTTP client waits forever by default: give it HUB_TIMEOUT_S (connect, read)."""
    global _bounded
    if _bounded:
        return
    _bounded = True
    import huggingface_hub
    try:
        from huggingface_hub.utils._http import default_client_factory
    except ImportError:  # another huggingface_hub layout: keep its defaults
        return

    def factory():
        client = default_client_factory()
        client.timeout = HUB_TIMEOUT_S
        return client
    huggingface_hub.set_client_factory(factory)


def local_model_folder(path: str, parts: tuple[str, ...] | None = PIPELINE_PARTS, what: str = "model folder") -> str:
    """`path` itself when it exists locally; for `gs://`: a local copy of a pipeline folder's top-level JSON files
    and the subfolders in `parts` (None: everything), or of the whole folder when it is no pipeline folder; for a
    Hub id: its snapshot (`from_hub`); anything else raises one line."""
    if not storage.is_remote(path):
        if os.path.exists(os.path.expanduser(path)):
            return path
        if hub_id(path) is None:
            raise FileNotFoundError(f"{path}: no such folder, and not a Hub id (ORG/NAME)")
        return from_hub(path, parts, what)
    path = storage.resolve(path)
    names = storage.listdir(path)
    if not names:
        raise FileNotFoundError(f"{what} {path} not found (or empty)")
    subfolders = [n for n in names if n in PIPELINE_PARTS and not n.endswith(".json")
                  and storage.isdir(storage.join(path, n))]
    if parts is None or not subfolders:  # not a pipeline folder: everything
        return storage.local_copy(path, what=what)
    local = None
    for name in names:
        if name in parts or (name.endswith(".json") and storage.isfile(storage.join(path, name))):
            got = storage.local_copy(storage.join(path, name), what=what)
            local = os.path.dirname(got)
    return local if local is not None else storage.local_copy(path, what=what)


def local_path(path: str, what: str = "folder") -> str:
    """A local file or folder holding `path`'s files: a local path as is, `gs://` a cached copy
    (`storage.local_copy`), a Hub id its whole snapshot less HUB_IGNORE; anything else raises one line."""
    if storage.is_remote(path):
        return storage.local_copy(storage.resolve(path), what=what)
    return local_model_folder(path, parts=None, what=what)


def read_json(path: str, what: str = "file") -> Any:
    """A JSON file, local or `gs://`; a missing file or invalid JSON raises with one line naming it."""
    if not storage.isfile(path):
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        return json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def source_path(original: str, local_root: str, local_sub: str) -> str:
    """Where `local_sub` (inside `local_copy`'s `local_root` of `original`) is in the original location."""
    rel = os.path.relpath(local_sub, local_root)
    return original if rel == "." else storage.join(original, *rel.split(os.sep))


def local_transformer_folder(path: str) -> str:
    """The local transformer folder of a diffusers pipeline or transformer folder (local or gs://; of a pipeline
    on Cloud Storage only transformer/ is downloaded)."""
    local = local_model_folder(path, parts=("transformer",))
    sub = os.path.join(local, "transformer")
    return sub if os.path.isdir(sub) else local
