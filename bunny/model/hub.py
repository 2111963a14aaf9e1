"""Hub names as model folders: ``org/name`` resolved through ``huggingface_hub`` as transformers does.

A name that is an existing local path is used as it is. Otherwise a name of the form ``org/name``
(optionally ``org/name@revision``) is looked up with ``huggingface_hub.snapshot_download``:
downloaded when online (into the HF cache), taken from the HF cache when offline
(``HF_HUB_OFFLINE=1``; the cache is ``HF_HUB_CACHE``/``HF_HOME`` as usual). When that fails, the
error says which name was looked up where: the local path tried, the cache folder, and whether
downloading was off or failed (with the hub's reason).
"""

from __future__ import annotations

import re
from pathlib import Path

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


class HubNameError(FileNotFoundError):
    """A model name is neither a local path nor a hub name that could be resolved."""


def is_hub_name(name: str) -> bool:
    """Whether ``name`` has the shape of a hub repo id (``org/name`` or ``org/name@revision``)."""
    return bool(_REPO_ID.match(name)) and not name.startswith((".", "/", "~"))


def resolve_folder(name: str | Path, allow_patterns: list[str] | None = None, what: str = "model",
                   local_only: bool = False) -> Path:
    """A local folder for ``name``: ``Path(name)`` when it exists or is not shaped like a hub name
    (the caller reports a missing path its own way), else the hub repo's snapshot (only the files
    matching ``allow_patterns`` when given; only the HF cache when ``local_only``). ``what`` names
    the thing in errors ("vision tower", "language model", ...)."""
    path = Path(name).expanduser()
    if path.exists() or isinstance(name, Path) or not is_hub_name(str(name)):
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = str(name).partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=allow_patterns,
                                      local_files_only=local_only))
    except (LocalEntryNotFoundError, HfHubHTTPError, ValueError, OSError) as exc:
        if local_only or constants.HF_HUB_OFFLINE:
            how = "HF_HUB_OFFLINE=1, so nothing was downloaded" if constants.HF_HUB_OFFLINE else "cache only"
        else:
            how = f"downloading it from {constants.ENDPOINT} failed ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        raise HubNameError(
            f"{what} {str(name)!r}: not a local path ({path.resolve()}) and, as hub repo {repo_id!r}"
            f"{' at ' + revision if revision else ''}, not in the HF cache {constants.HF_HUB_CACHE}; {how}. "
            "Download it (huggingface-cli download), or point to its folder"
        ) from exc
