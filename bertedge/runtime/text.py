"""What counts as text: the one emptiness check for every reader (predict, Ray, serve, finetune).

`str.strip()` keeps NUL, other control characters and zero-width characters, so a line of
those looks like text to it and would be predicted (or trained on) as if it were a sentence.
"""

from __future__ import annotations

import unicodedata

# Unicode general categories that carry no visible text: controls, format characters
# (zero-width space/joiners, BOM, bidi marks), separators, unassigned and surrogate code points.
_NOT_TEXT = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})


def has_text(value: str) -> bool:
    """True when `value` holds at least one visible character.

    >>> has_text("a film"), has_text("  \\t\\n"), has_text("\\x00\\x01"), has_text("\\u200b\\ufeff")
    (True, False, False, False)
    """
    return any(unicodedata.category(ch) not in _NOT_TEXT for ch in value)
