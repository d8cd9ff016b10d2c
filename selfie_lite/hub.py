"""The Hugging Face hub as the input checks see it: is it off by setting, and does a name look like a hub id rather
than a local path. One home for both, so a model, a dataset and `doctor` agree on what "offline" means."""

from __future__ import annotations

import os

_TRUE = ("1", "ON", "YES", "TRUE")  # the spellings huggingface_hub (and datasets) read as true


def offline(datasets: bool = False) -> bool:
    """HF_HUB_OFFLINE set to a true spelling; for datasets also HF_DATASETS_OFFLINE, which `datasets` honours too."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if datasets else ("HF_HUB_OFFLINE",)
    return any(os.environ.get(n, "").strip().upper() in _TRUE for n in names)


def looks_like_hub_id(name: str) -> bool:
    """owner/name, not a path that exists or starts like one (./x, /x, ~/x)."""
    name = str(name)
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(name))
