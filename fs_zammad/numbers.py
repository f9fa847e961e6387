"""Phone numbers as Zammad wants them: E.164 digits without '+' (pure)."""

from __future__ import annotations

import re

_NON_DIGITS = re.compile(r"[^\d]")


def to_e164(number: str, country_code: str = "", national_prefix: str = "0",
            max_internal_digits: int = 6) -> str:
    """Normalise one number for Zammad.

    ``+49 221 4710334`` and ``0049221...`` become ``49221...``; a national
    number (``0221...``) gets ``country_code`` when one is configured, because
    Zammad would otherwise assume Germany. Extensions (up to
    ``max_internal_digits`` digits) and non-numbers such as ``anonymous`` pass
    through unchanged, so the caller log still says who called.
    """
    raw = (number or "").strip()
    if raw.startswith("sip:"):
        raw = raw[4:].split("@", 1)[0]
    digits = _NON_DIGITS.sub("", raw)
    if not digits or not re.fullmatch(r"[\d\s()./+-]+", raw):
        return raw
    if raw.startswith("+"):
        return digits
    if len(digits) <= max_internal_digits:
        return digits
    if digits.startswith("00"):
        return digits[2:]
    if country_code and national_prefix and digits.startswith(national_prefix):
        return country_code + digits[len(national_prefix):]
    return digits
