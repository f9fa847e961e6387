"""Log lines for ``docker logs``: text for people, JSON for log shippers.

Both formats carry the same fields. A filter masks every secret (ESL
password, Zammad token), also percent-encoded or HTML-escaped, in the
message, the exception text and the structured fields, so neither can leak
through a third-party error message.
"""

from __future__ import annotations

import html
import json
import logging
import re
import sys
import time

_FIELD_ORDER = ("event", "callId", "direction", "from", "to", "user", "cause", "status", "ms",
                "result", "detail")


def _char_forms(char: str) -> str:
    """A regex for one character of a secret as it may come back to us: itself,
    percent-encoded (either hex case: servers echo the path as they got it) or
    HTML-escaped (an error page)."""
    encoded = "".join(f"%{b:02X}" for b in char.encode("utf-8"))
    hex_any_case = "".join(f"[{c}{c.lower()}]" if c.isalpha() else re.escape(c)
                           for c in encoded)
    forms = [re.escape(char), hex_any_case]
    if html.escape(char) != char:
        forms.append(re.escape(html.escape(char)))
    if char == " ":
        forms.append(r"\+")
    return "(?:" + "|".join(forms) + ")"


def secret_pattern(secrets) -> re.Pattern | None:
    """One regex matching every secret in every form it can be echoed in."""
    secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
    if not secrets:
        return None
    return re.compile("|".join("".join(_char_forms(c) for c in s) for s in secrets))


def redact(text: str, pattern: re.Pattern | None) -> str:
    """``text`` with every secret (plain, percent-encoded, HTML-escaped) as ``***``."""
    if pattern is None or not text:
        return text
    return pattern.sub("***", text)


class RedactSecrets(logging.Filter):
    """Masks secrets in the message, the exception text and every structured field:
    Zammad's and proxies' words (which may echo the CTI path) travel in all three."""

    def __init__(self, secrets):
        super().__init__()
        self.pattern = secret_pattern(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.pattern is not None:
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.msg, record.args = redact(record.getMessage(), self.pattern), None
            if record.exc_text:
                record.exc_text = redact(record.exc_text, self.pattern)
            fields = getattr(record, "event_fields", None)
            if fields:
                record.event_fields = {k: redact(v, self.pattern) if isinstance(v, str) else v
                                       for k, v in fields.items()}
        return True


def _fields(record) -> dict:
    fields = getattr(record, "event_fields", None) or {}
    return {k: fields[k] for k in _FIELD_ORDER if fields.get(k) not in (None, "")}


class TextFormatter(logging.Formatter):
    def format(self, record):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = _fields(record)
        if fields:
            message = " ".join(f"{k}={v}" for k, v in fields.items() if k != "event")
            message = f"{fields.get('event', '')} {message}"
        else:
            message = record.getMessage()
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname:<7} {message}"
        if record.exc_info or record.exc_text:
            line += " | " + " ".join((record.exc_text or self.formatException(record.exc_info))
                                     .split("\n")[-1:])
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record):
        data = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + f".{int(record.msecs):03d}Z", "level": record.levelname.lower(),
                "logger": record.name, "message": record.getMessage()}
        data.update(_fields(record))
        if record.exc_info or record.exc_text:
            data["error"] = (record.exc_text or self.formatException(record.exc_info)) \
                .strip().split("\n")[-1]
        return json.dumps(data, ensure_ascii=False)


def setup(level: str = "INFO", fmt: str = "text", secrets=()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactSecrets(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # greenswitch and urllib3 speak at INFO about things we report ourselves.
    for noisy in ("urllib3", "greenswitch"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
