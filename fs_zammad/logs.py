"""Log lines for ``docker logs``: text for people, JSON for log shippers.

Both formats carry the same fields. A filter masks every secret (ESL
password, Zammad token) in the message and in exception text, so neither can
leak through a third-party error message.
"""

from __future__ import annotations

import json
import logging
import sys
import time

_FIELD_ORDER = ("event", "callId", "direction", "from", "to", "user", "cause", "status", "ms",
                "result", "detail")


class RedactSecrets(logging.Filter):
    def __init__(self, secrets):
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            for secret in self.secrets:
                message = message.replace(secret, "***")
                if record.exc_text:
                    record.exc_text = record.exc_text.replace(secret, "***")
            record.msg, record.args = message, None
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
