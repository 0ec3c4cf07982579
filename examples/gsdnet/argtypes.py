"""argparse types that reject a bad value at parse time: exit 2 with one line naming the
option's rule, instead of a traceback (or a silently odd run) later."""

from __future__ import annotations

import argparse
import difflib
import math

import timm


def _number(kind, text: str, rule: str, ok) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not {'an integer' if kind is int else 'a number'}"
        ) from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, ">= 1", lambda v: v >= 1)


def non_negative_int(text: str) -> int:
    return _number(int, text, ">= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    return _number(float, text, "a finite number > 0", lambda v: math.isfinite(v) and v > 0)


def non_negative_float(text: str) -> float:
    return _number(float, text, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)


def timm_model(text: str) -> str:
    """A model name timm knows (or an ``hf-hub:`` one, checked when it is fetched)."""
    if text.startswith(("hf-hub:", "hf_hub:")) or timm.is_model(text):
        return text
    close = difflib.get_close_matches(text, timm.list_models(), n=3)
    hint = f"; close matches: {', '.join(close)}" if close else "; timm.list_models() lists them"
    raise argparse.ArgumentTypeError(f"timm has no model {text!r}{hint}")
