"""Ephemeral signals: typing notices (docs/PROTOCOL.md, section 15). Relayed at once, never stored.

A typing notice is planned entirely here, in the plan step: it becomes QoS 0 publishes in
``plan.replies`` to the receiver's online devices, never a store operation, so it costs no
database write (and no device registration). It is rate-limited per user (a token bucket like the
send rate); a notice over the limit is dropped silently (it would lapse by itself anyway) and
counted. A mixin of :class:`backend.core.Delivery` (it reads ``self._devices``, the presence).

Groups plug in through :meth:`SignalsMixin._typing_targets` (the lead's: a group's online members'
devices, from membership the core holds in memory; never a query).
"""

from __future__ import annotations

from typing import Any

from .. import protocol as p
from .events import Key, Plan, Publish, RelayTyping, TypingMembers

# How long a typing notice lasts at the receiver unless renewed: 6 s. Telegram's chat action lasts 5 s
# and clients repeat it while the user types; Matrix caps a typing notice at 30 s, which leaves a
# "typing..." up for half a minute after an app died mid-word. Clients renew every 3 s (half of it)
# while typing, and send "stopped" when the user stops or sends.
TYPING_EXPIRES_MS = 6_000
# Per-user typing notices: 2 a second sustained, bursts of 10. A user renewing every 3 s in a few
# conversations at once stays far below; a client flooding notices costs one bucket look-up each.
TYPING_RATE_PER_S = 2.0
TYPING_BURST = 10
# Buckets of users idle long enough to be full again are forgotten past this many entries (memory).
TYPING_BUCKETS_MAX = 100_000


def take_token(buckets: dict[str, tuple[float, int]], uid: str, now_ms: int, rate: float, burst: int,
               max_entries: int = TYPING_BUCKETS_MAX) -> bool:
    """A token bucket per uid (``buckets``: uid -> (tokens, at ms)); True if ``uid`` may go on. ``rate`` <= 0:
    no limit."""
    if rate <= 0:
        return True
    tokens, at = buckets.get(uid, (float(burst), now_ms))
    tokens = min(float(burst), tokens + (now_ms - at) * rate / 1000)
    ok = tokens >= 1
    buckets[uid] = (tokens - 1 if ok else tokens, now_ms)
    if len(buckets) > max_entries:
        full_after_ms = burst / rate * 1000
        for u in [u for u, b in buckets.items() if now_ms - b[1] >= full_after_ms]:
            del buckets[u]
    return ok


def typing_payload(sender: str, to: str, state: str, expires_in: int) -> dict[str, Any]:
    """{"kind": "typing", "from", "to", "state": "typing"|"stopped", "expires_in": ms}."""
    return {"kind": "typing", "from": sender, "to": to, "state": state, "expires_in": expires_in}


class SignalsMixin:
    """The typing half of Delivery (``self._typing_buckets``, ``self.typing_rate``...)."""

    def _init_signals(self, rate: float = TYPING_RATE_PER_S, burst: int = TYPING_BURST,
                      expires_ms: int = TYPING_EXPIRES_MS) -> None:
        self.typing_rate, self.typing_burst, self.typing_expires_ms = rate, burst, expires_ms
        self._typing_buckets: dict[str, tuple[float, int]] = {}
        self.signals_relayed = 0  # typing publishes planned (one per receiving device)
        self.signals_dropped = 0  # typing notices dropped by the rate limit

    def _plan_typing(self, plan: Plan, uid: str, dev: str, r: p.TypingRequest, now_ms: int) -> None:
        """QoS 0 publishes of the notice to the receiver's online devices, in ``plan.replies`` (no store)."""
        if not take_token(self._typing_buckets, uid, now_ms, self.typing_rate, self.typing_burst):
            self.signals_dropped += 1
            return
        if r.group:  # the store names the members (a read, cached: store/groups.py); relayed after it
            plan.ops.append(RelayTyping(uid, dev, r.to, r.state))
            return
        targets = self._typing_targets(uid, dev, r)
        if not targets:
            return  # nobody online: a notice is never kept for later
        payload = typing_payload(uid, r.to, r.state, self.typing_expires_ms)
        for u, d in targets:
            plan.replies.append(Publish(p.inbox_topic(u, d), payload, qos=0))
        self.signals_relayed += len(targets)

    def _typing_targets(self, uid: str, dev: str, r: p.TypingRequest) -> list[Key]:
        """The devices a notice goes to: the receiver's online devices (not the typing device itself)."""
        return sorted((r.to, d) for d in self._devices.get(r.to, ()) if (r.to, d) != (uid, dev))

    def _typing_to_group(self, out: list[Publish], o: TypingMembers) -> None:
        """A group typing notice: QoS 0 to the online devices of its members (not the typing device)."""
        op = o.op
        targets = [(u, d) for u in o.members for d in self._devices.get(u, ()) if (u, d) != (op.uid, op.device)]
        if not targets:
            return
        payload = {**typing_payload(op.uid, op.group, op.state, self.typing_expires_ms), "group": op.group}
        out += [Publish(p.inbox_topic(u, d), payload, qos=0) for u, d in sorted(targets)]
        self.signals_relayed += len(targets)

    def take_signal_counts(self) -> tuple[int, int]:
        """(relayed, dropped) since the last call (the worker adds them to its metrics)."""
        out = (self.signals_relayed, self.signals_dropped)
        self.signals_relayed = self.signals_dropped = 0
        return out
