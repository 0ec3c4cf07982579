"""Progress bars for the minute-long passes of calibration and profiling: tqdm's, when tqdm is
installed (the ``examples`` extra has it; the library itself does not depend on it)."""

from __future__ import annotations

from typing import TypeVar
from collections.abc import Iterable

T = TypeVar("T")


def progress(
    iterable: Iterable[T], show: bool | None, desc: str, unit: str, total: int | None = None
) -> Iterable[T]:
    """``iterable`` with a bar on stderr. ``show=None``: only when stderr is a terminal;
    ``False``: never. Without tqdm there is no bar."""
    if show is False:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    # disable=None is tqdm's "off when the output is not a terminal".
    return tqdm(iterable, desc, total, leave=False, unit=unit, disable=None if show is None else False)
