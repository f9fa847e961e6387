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


#: Zammad's column sizes (``cti_logs``; ``user`` names a login, ``answeringNumber``
#: is matched against phone numbers): a longer value is cut to fit.
FIELD_LIMITS = {"callId": 250, "from": 100, "to": 100, "answeringNumber": 100, "user": 250,
                "queue": 250, "cause": 500}

#: Fields that are phone numbers, normalised (to_e164) once cleaned.
NUMBER_FIELDS = frozenset({"from", "to"})

#: What a required number that held nothing but control characters becomes:
#: the word FreeSWITCH itself shows for a caller id it cannot show.
UNREADABLE_NUMBER = "anonymous"

# C0 controls (NUL, newline, ...), DEL and the C1 controls.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def clean_fields(fields, normalise=lambda number: number):
    """Fields for Zammad -> (fields Zammad can store, [(field, problem), ...]).

    Control characters are removed (in ``callId`` they are %-escaped
    instead, so that two ids stay two), numbers are then normalised with
    ``normalise``, and a value longer than its FIELD_LIMITS is cut to fit.
    A number that held only control characters becomes UNREADABLE_NUMBER
    (``from`` and ``to`` are required); another optional field left empty is
    left out. An empty value stays as it was (FreeSWITCH had none).
    """
    cleaned, problems = [], []
    for name, value in fields:
        had_value = bool(value)
        if _CONTROL.search(value):
            problems.append((name, "control characters"))
            value = _CONTROL.sub(
                (lambda m: f"%{ord(m.group()):02X}") if name == "callId" else "", value)
        if name in NUMBER_FIELDS:
            value = normalise(value)
        limit = FIELD_LIMITS.get(name)
        if limit and len(value) > limit:
            problems.append((name, f"longer than {limit} characters"))
            value = value[:limit]
        if had_value and not value:
            if name not in NUMBER_FIELDS:
                continue
            value = UNREADABLE_NUMBER
        cleaned.append((name, value))
    return cleaned, problems
