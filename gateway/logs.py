"""The served process's logging: uvicorn's lines, ours and the libraries', every one through
`Redact`, so no log line carries an API key, a visitor token or a raw visitor id, at any level.

They would otherwise arrive from several places: uvicorn logs each WebSocket handshake at INFO with
its query string (`?token=...&key=...`) even without the access log, the access log has every query
string and erasure's `/v1/visitors/<id>` path, websockets logs the handshake's request line and
headers at DEBUG, and uvicorn's TRACE level dumps whole ASGI scopes (query string, headers).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

from gateway.settings import Settings

HIDDEN = "…"

# Every query value: parameter names stay (they help reading a log), values never do.
_QUERY_VALUE = re.compile(r"([?&][^=&?\s\"'#]*=)[^&\s\"'#]*")
# A scope's `query_string` as uvicorn's TRACE dump shows it.
_QUERY_STRING = re.compile(r"('query_string': b)('[^']*'|\"[^\"]*\")")
_SECRET_HEADERS = r"x-tailor-key|x-tailor-token|authorization|proxy-authorization|cookie|set-cookie"
# `name: value` (websockets' DEBUG lines) and `(b'name', b'value')` (a scope's headers).
_HEADER_LINE = re.compile(rf"(?i)\b({_SECRET_HEADERS})(:[ \t]*)[^\r\n]*")
_HEADER_PAIR = re.compile(rf"(?i)(b?['\"](?:{_SECRET_HEADERS})['\"],\s*b?)('[^']*'|\"[^\"]*\")")
# Erasure and export name the visitor in the path.
_VISITOR_PATH = re.compile(r"(/v1/visitors/)[^/\s?\"'#]+")
# A visitor token anywhere else (a body in an exception message, say); v1 showed the raw id.
_TOKEN = re.compile(r"\bv[12]\.[A-Za-z0-9_-]{8,}(?:\.[A-Za-z0-9_-]+){1,2}")


class Redact(logging.Filter):
    """Rewrites a record so its line shows no key, token or raw visitor id. `secrets` (the
    configured API keys and secret) are also hidden wherever they appear."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def clean(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, HIDDEN)
        text = _QUERY_VALUE.sub(rf"\1{HIDDEN}", text)
        text = _QUERY_STRING.sub(rf"\1'{HIDDEN}'", text)
        text = _HEADER_LINE.sub(rf"\1\2{HIDDEN}", text)
        text = _HEADER_PAIR.sub(rf"\1'{HIDDEN}'", text)
        text = _VISITOR_PATH.sub(rf"\1{HIDDEN}", text)
        return _TOKEN.sub(HIDDEN, text)

    def filter(self, record: logging.LogRecord) -> bool:
        # Arguments one by one first: uvicorn's access formatter reads them by position.
        if isinstance(record.args, tuple):
            record.args = tuple(self.clean(arg) if isinstance(arg, str) else arg for arg in record.args)
        message = record.getMessage()
        cleaned = self.clean(message)
        if cleaned != message and record.name != "uvicorn.access":
            record.msg, record.args = cleaned, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.clean(record.exc_text)
        if record.stack_info:
            record.stack_info = self.clean(record.stack_info)
        return True


def config(settings: Settings) -> dict[str, Any]:
    """uvicorn's `log_config`: its own handlers and formats, a root handler for everyone else's
    loggers, and `Redact` on every handler (a handler's filter sees every record it writes)."""
    redact = {
        "()": "gateway.logs.Redact",
        "secrets": [*settings.public_keys, *settings.admin_keys, settings.secret, settings.pseudonym_key],
    }
    level = settings.log_level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": redact},
        "formatters": {
            "default": {"()": "uvicorn.logging.DefaultFormatter", "fmt": "%(levelprefix)s %(message)s"},
            "access": {
                "()": "uvicorn.logging.AccessFormatter",
                "fmt": '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s',
            },
            "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        },
        "handlers": {
            "default": {
                "formatter": "default",
                "filters": ["redact"],
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
            },
            "access": {
                "formatter": "access",
                "filters": ["redact"],
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stdout",
            },
            "plain": {
                "formatter": "plain",
                "filters": ["redact"],
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
            },
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
            # numba's compiler logs its every pass at DEBUG: hundreds of thousands of lines a start.
            "numba": {"level": "INFO"},
        },
        "root": {"handlers": ["plain"], "level": level},
    }
