"""Hub reachability: a hub id the hub cannot serve is one clear message, in seconds, not retries.

    finetune validate RECIPE    # a hub model or data set, with the network (or DNS) down

huggingface_hub retries a host that does not resolve for about 30 s before the error surfaces as
a traceback-like chain. Before the first network call for a hub id, `check_reachable` resolves
the endpoint's host (socket.getaddrinfo in a thread, so a hanging resolver is bounded too) and
opens one TCP connection, each under TIMEOUT seconds. When that fails, the UserError names the id,
says whether a local copy is in the hub cache, and gives the HF_HUB_OFFLINE=1 hint. With
HF_HUB_OFFLINE=1 nothing here touches the network.
Layer: beside modeling and data.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import constants
from huggingface_hub.file_download import repo_folder_name

from finetune.errors import UserError

TIMEOUT = 4.0  # seconds per check; the whole verdict comes within 5 s of a name that does not resolve
_verdicts: dict[str, str | None] = {}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def endpoint() -> str:
    from huggingface_hub import constants  # HF_ENDPOINT as huggingface_hub reads it

    return constants.ENDPOINT


def cached_copy(repo_id: str, repo_type: str) -> Path | None:
    """The hub cache folder of this repository if it holds a snapshot, else None."""
    if repo_type == "dataset":
        # datasets keeps its own cache of prepared data sets beside the hub cache
        roots = [Path(constants.HF_HUB_CACHE), Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))]
    else:
        roots = [Path(constants.HF_HUB_CACHE)]
    folder = roots[0] / repo_folder_name(repo_id=repo_id, repo_type=repo_type) / "snapshots"
    if folder.is_dir() and any(folder.iterdir()):
        return folder.parent
    if repo_type == "dataset" and len(roots) > 1:
        prepared = roots[1] / repo_id.replace("/", "___")
        if prepared.is_dir():
            return prepared
    return None


def unreachable_reason(url: str, timeout: float = TIMEOUT) -> str | None:
    """Why the host of `url` cannot be reached (DNS, connection, timeout), or None when it can."""
    if url in _verdicts:
        return _verdicts[url]
    parts = urlparse(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    found: list = []

    def resolve():
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            found.append(exc)

    worker = threading.Thread(target=resolve, daemon=True)  # getaddrinfo has no timeout of its own
    worker.start()
    worker.join(timeout)
    if not found:
        reason = f"resolving {host} took over {timeout:.0f} s"
    elif isinstance(found[0], OSError):
        reason = f"the host name {host} does not resolve ({found[0].strerror or found[0]})"
    else:
        reason = None
        family, kind, proto, _, address = found[0][0]
        try:
            with socket.socket(family, kind, proto) as s:
                s.settimeout(timeout)
                s.connect(address)
        except OSError as exc:
            reason = f"no connection to {host}:{port} ({exc.strerror or exc.__class__.__name__})"
    _verdicts[url] = reason
    return reason


def looks_like_hub_id(name: str) -> bool:
    """`org/name` or `name`: not a path (those are reported as missing files by their readers)."""
    return bool(name) and not name.startswith((".", "/", "~")) and name.count("/") <= 1 and "\\" not in name


def check_reachable(repo_id: str, repo_type: str, where: str) -> None:
    """A UserError when `repo_id` would need the hub and the hub cannot be reached.

    where: what names the id (a recipe key such as model.name_or_path, or data.train)."""
    if _offline() or Path(repo_id).exists() or not looks_like_hub_id(repo_id):
        return
    reason = unreachable_reason(endpoint())
    if reason is None:
        return
    kind = "data set" if repo_type == "dataset" else "model"
    cache = cached_copy(repo_id, repo_type)
    if cache is not None:
        fix = (f"a local copy is in the cache ({cache}): run with HF_HUB_OFFLINE=1 to use it without the network")
    else:
        fix = (f"there is no local copy in the cache: download it where the hub is reachable (`hf download "
               f"{repo_id}{' --repo-type dataset' if repo_type == 'dataset' else ''}`) and run with HF_HUB_OFFLINE=1, "
               f"or name a local path")
    raise UserError(f"{where}: hub {kind} `{repo_id}` cannot be fetched: the hub {endpoint()} is unreachable "
                    f"({reason}); {fix}")
