"""How a report names a value the API sent against what its reference says: the value bounded in
depth and length (whatever the API sent, a report line stays short and never fails), its type in
JSON's words. Shared by the collectors that check listings item by item (audit, rate limits)."""
from __future__ import annotations

import reprlib
from typing import Any

JSON_TYPE = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxdict, _repr.maxlist, _repr.maxstring, _repr.maxother = 2, 4, 4, 60, 60


def clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def short(value: Any) -> str:
    """`value` as a report shows it."""
    try:
        text = _repr.repr(value)
    except Exception:  # noqa: BLE001 - a report must never fail
        text = f"<{type(value).__name__}>"
    return clip(text)


def wrong(name: str, value: Any, want: str) -> str:
    """"`name` is a string ('lots'), not an integer"."""
    got = next((label for t, label in JSON_TYPE.items() if type(value) is t), type(value).__name__)
    return f"`{name}` is {got} ({short(value)}), not {want}"
