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


class Redactor:
    """Replaces every secret with ``***``: as it is, in any letter case (a proxy may
    echo the path upper-cased, and a token's case is most of its secret),
    percent-encoded (either hex case) or HTML-escaped. Text without ``%`` or ``&``
    and without a secret (nearly every log line) is left as it is after one look."""

    def __init__(self, secrets):
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._folded = [s.lower() for s in self.secrets]
        self.pattern = re.compile("|".join("".join(_char_forms(c) for c in s)
                                           for s in self.secrets), re.I) \
            if self.secrets else None
        self._encoded_marks = "%&" + ("+" if any(" " in s for s in self.secrets) else "")

    def needed(self, text: str) -> bool:
        """Could ``text`` hold a secret in any form?"""
        for mark in self._encoded_marks:
            if mark in text:
                return True
        folded = text.lower()
        for secret in self._folded:
            if secret in folded:
                return True
        return False

    def __call__(self, text: str) -> str:
        if not text or not self.needed(text):
            return text
        return self.pattern.sub("***", text)


class RedactSecrets(logging.Filter):
    """Masks secrets in the message, the exception text and every structured field:
    Zammad's and proxies' words (which may echo the CTI path) travel in all three."""

    def __init__(self, secrets):
        super().__init__()
        self.redact = Redactor(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        redact = self.redact
        if redact.secrets:
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.msg, record.args = redact(record.getMessage()), None
            if record.exc_text:
                record.exc_text = redact(record.exc_text)
            fields = getattr(record, "event_fields", None)
            if fields and redact.needed("\n".join(v for v in fields.values()
                                                  if isinstance(v, str))):
                record.event_fields = {k: redact(v) if isinstance(v, str) else v
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
    # No line shows the process or thread: not looking them up saves a
    # getpid() and, under gevent, a thread object per greenlet on every record.
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # greenswitch and urllib3 speak at INFO about things we report ourselves.
    for noisy in ("urllib3", "greenswitch"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
