"""What the worker logs about payloads, store operations and database errors: kinds, ids and
sizes, never content (users' private data; a driver's error text may quote a value too)."""

from __future__ import annotations

import logging

from .. import core

log = logging.getLogger("backend.worker")


def describe_op(op: core.Operation) -> str:
    """A store operation for a log line: kind, ids and sizes, never the content (users' private data)."""
    if isinstance(op, core.StoreMessage):
        return (f"message msg_id={op.msg_id!r} from {op.sender} to {op.to} "
                f"(type {op.type!r}, {len(op.content)} characters of content)")
    if isinstance(op, core.DeleteAcked):
        return f"ack of {len(op.seqs)} seqs by {op.receiver}"
    if isinstance(op, core.CountBacklog):
        return f"count for {op.receiver}"
    if isinstance(op, core.PullPage):
        return f"pull of up to {op.limit} for {op.receiver}"
    return type(op).__name__


def log_bug(message: str, *args) -> None:
    """Log the exception being handled as ERROR with its type and stack but not its text: an exception raised
    on a payload may quote it (a decode error, a driver's "Incorrect string value"), and content never goes to
    a log line."""
    import sys
    import traceback
    exc_type, _, tb = sys.exc_info()
    stack = "".join(traceback.format_tb(tb)).rstrip()
    log.error(message + " (%s; its message is not logged, it may quote the payload)\n%s", *args,
              getattr(exc_type, "__name__", "?"), stack)


def describe_db_error(error: BaseException) -> str:
    """A database error's class and code, not its text: drivers quote the offending value in it (MariaDB's
    "Incorrect string value: '\\xF0...' for column content"), which may be message content."""
    code = getattr(error, "pgcode", None) or getattr(getattr(error, "orig", None), "pgcode", None)
    if code is None and getattr(error, "args", None) and isinstance(error.args[0], int):
        code = error.args[0]  # PyMySQL: (errno, text)
    if code is None and error.__cause__ is not None:
        return f"{type(error).__name__} ({type(error.__cause__).__name__})"
    return type(error).__name__ + (f" (code {code})" if code is not None else "")


def describe_outage(error: BaseException) -> str:
    """A failed transaction's error for a log line: its first line (the lost connection, the lock timeout), unless
    it quotes a value (MariaDB reports some bad values as OperationalError), then only its class and code."""
    text = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    if not text or "value" in text.lower() or "content" in text.lower():
        return describe_db_error(error)
    return text


def describe_payload(payload) -> str:
    """A published payload by its kind and ids, for DEBUG lines (content and previews left out)."""
    if isinstance(payload, str):
        return payload  # a status word
    kind = payload.get("kind")
    ids = " ".join(f"{k}={payload[k]}" for k in ("seq", "msg_id", "status", "code", "req_id", "total", "cursor")
                   if k in payload)
    if kind == "page":
        ids += f" messages={len(payload.get('messages', ()))} more={payload.get('more')}"
    elif kind == "receipts":
        ids += f" receipts={len(payload.get('receipts', ()))}"
    return f"{kind} {ids}".strip()
