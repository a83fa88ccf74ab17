"""Progress bars: shown on a terminal, silent in logs and CI (DISTILLAB_PROGRESS=0/1 forces)."""

from __future__ import annotations

import os
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def _disabled() -> bool | None:
    forced = os.environ.get("DISTILLAB_PROGRESS")
    if forced is not None:
        return forced.strip() in ("0", "false", "no", "")
    return None  # tqdm: disable when stderr is not a terminal


def progress(iterable: Iterable[T], **kwargs) -> Iterable[T]:
    return tqdm(iterable, disable=_disabled(), dynamic_ncols=True, leave=False, **kwargs)


def progress_bar(disable: bool = False, **kwargs) -> tqdm:
    return tqdm(disable=True if disable else _disabled(), dynamic_ncols=True, leave=False, **kwargs)
