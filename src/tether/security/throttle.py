"""Per-peer throttling of authentication failures and pre-authentication refusals
(`limits.auth_failures_per_second`), and the aggregation of their audit records.

A client guessing credentials (or replaying a stolen token list) costs the hub a database lookup, an
HMAC and an audit record per attempt. `AuthThrottle` keeps one token bucket per peer address: every
attempt holds a token while it runs, a success gives it back, a refusal keeps it. When a peer's bucket
is empty its attempts are refused at once (`auth-rate-limited`) without any of that work — valid
credentials included, so a guessing peer cannot slip a correct guess in — until the bucket refills at
`rate` per second (burst `2 × rate`). Holding the token during the attempt makes concurrent guesses
count too: a peer cannot open a thousand connections and have them all verified before the first
refusal is charged. Refusals that happen before any authentication (a malformed CONNECT, a client id
that does not match the username, garbage instead of a request) are charged the same way (`charge()`).

Keys are the peer's IP address, IPv4-mapped IPv6 folded to IPv4, and IPv6 grouped by its /64 (one
host usually owns a whole /64, so per-address buckets would be free to evade). Only peers with a
deficit are remembered, in an LRU bounded by `max_peers`, so a flood from many sources cannot
exhaust memory; an evicted peer merely starts over with a full bucket.

Audit aggregation, so the audit table cannot become the amplifier. A peer's refusals are recorded one
by one while its bucket has tokens. The first refusal that finds the bucket empty starts an *episode*:
that refusal is recorded, and from then on every refusal of the peer — throttled ones, refusals of
attempts admitted on a refilled token, pre-authentication refusals — is counted instead of written,
with at most one record per `audit_interval_s` carrying `suppressed` (refusals not written since the
previous record) and `reasons` (their count per reason slug). Counts still pending when the peer has
been quiet for `audit_interval_s` come back from `sweep()` + `take_summaries()` (the hub sweeps every
second) for one closing record, as do those of an evicted peer. The episode ends once the bucket has
refilled to its burst (the peer stayed quiet for `burst / rate` seconds). So one peer costs at most
`burst` records plus about one per second while it floods, and never more than `rate` records per
second on average. Total refused = records that are not summaries + the sum of `suppressed`.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tether.security.principal import AuthRefused

__all__ = [
    "DEFAULT_MAX_PEERS",
    "RATE_LIMITED",
    "Admission",
    "AuthThrottle",
    "AuthThrottled",
    "Summary",
    "Verdict",
    "peer_key",
]

RATE_LIMITED = "auth-rate-limited"
DEFAULT_MAX_PEERS = 65_536
AUDIT_INTERVAL_S = 1.0
_KEY_MAX = 64  # unparsable peers are keyed by their text: keep it short


class AuthThrottled(AuthRefused):
    """A refusal because the peer exhausted its failure budget; `retry_after` is in seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(RATE_LIMITED, "too many failed authentications from this address")
        self.retry_after = retry_after

    @property
    def retry_after_s(self) -> int:
        """Whole seconds for a `Retry-After` header (at least 1)."""
        return max(1, math.ceil(self.retry_after))


def peer_key(peer: str, *, ipv6_prefix: int = 64) -> str:
    """The bucket key of an `ip:port` / `[v6]:port` peer string (a bare address works too)."""
    host = peer
    if peer.startswith("["):
        end = peer.find("]")
        host = peer[1:end] if end > 0 else peer[1:]
    elif peer.count(":") == 1:
        host = peer.partition(":")[0]
    host = host.partition("%")[0]  # IPv6 zone id: same host whatever the interface
    return _host_key(host, ipv6_prefix) or peer[:_KEY_MAX]


@functools.lru_cache(maxsize=4096)
def _host_key(host: str, ipv6_prefix: int) -> str | None:
    """Parsing an address costs more than the rest of an admission: cached (ports vary, hosts repeat)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        if ipv6_prefix < 128:
            return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))
    return str(address)


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether to write the audit record of one refusal, and the refusals it stands for.

    `episode`: the peer is over its budget, so the record carries `suppressed` (possibly 0) and,
    when some were suppressed, `reasons` (suppressed count per reason slug)."""

    record: bool
    episode: bool = False
    suppressed: int = 0
    reasons: tuple[tuple[str, int], ...] = ()

    def details(self) -> dict[str, Any]:
        """What the record adds to its `details` (nothing outside an episode)."""
        if not self.episode:
            return {}
        if not self.suppressed:
            return {"suppressed": 0}
        return {"suppressed": self.suppressed, "reasons": dict(self.reasons)}


_RECORD = Verdict(True)
_SKIP = Verdict(False, episode=True)


@dataclass(frozen=True, slots=True)
class Admission:
    """`admit()`'s answer. Allowed: the attempt holds one token of bucket `key` (call `refund(key)`
    when it succeeds, `refused(key, …)` when it is refused). Refused: `verdict` says whether to audit
    this refusal."""

    key: str
    allowed: bool
    retry_after: float = 0.0
    verdict: Verdict = _RECORD

    @property
    def record(self) -> bool:
        return self.verdict.record

    @property
    def suppressed(self) -> int:
        return self.verdict.suppressed


@dataclass(frozen=True, slots=True)
class Summary:
    """Refusals of a peer never written individually, to be closed with one audit record."""

    peer: str
    action: str
    suppressed: int
    reasons: tuple[tuple[str, int], ...] = ()

    @property
    def reason(self) -> str:
        """The most frequent suppressed reason (the record's `reason`)."""
        return max(self.reasons, key=lambda item: item[1])[0] if self.reasons else RATE_LIMITED

    def details(self) -> dict[str, Any]:
        return {"suppressed": self.suppressed, "reasons": dict(self.reasons), "summary": True}


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float
    limited: bool = False  # in an episode (see the module docstring)
    last_record: float = 0.0
    last_refusal: float = 0.0
    suppressed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    action: str = ""  # of the last suppressed refusal, for a summary record
    peer: str = ""

    def take(self) -> tuple[int, tuple[tuple[str, int], ...]]:
        counts = (self.suppressed, tuple(sorted(self.reasons.items())))
        self.suppressed = 0
        self.reasons = {}
        return counts


class AuthThrottle:
    """Token bucket per peer for authentication failures (see the module docstring)."""

    def __init__(
        self,
        rate: float,
        *,
        burst: float | None = None,
        max_peers: int = DEFAULT_MAX_PEERS,
        clock: Callable[[], float] = time.monotonic,
        ipv6_prefix: int = 64,
        audit_interval_s: float = AUDIT_INTERVAL_S,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        if max_peers < 1:
            raise ValueError("max_peers must be at least 1")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(1.0, 2.0 * self.rate)
        self.max_peers = max_peers
        self.ipv6_prefix = ipv6_prefix
        self.audit_interval_s = audit_interval_s
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._summaries: list[Summary] = []
        self._episodes: set[str] = set()  # keys of buckets in an episode

    def __len__(self) -> int:
        """Peers remembered (those with a deficit or a throttled episode)."""
        return len(self._buckets)

    def key(self, peer: str) -> str:
        return peer_key(peer, ipv6_prefix=self.ipv6_prefix)

    def tokens(self, peer: str) -> float:
        """Tokens the peer has now (the burst for a peer not remembered)."""
        bucket = self._buckets.get(self.key(peer))
        if bucket is None:
            return self.burst
        return min(self.burst, bucket.tokens + max(0.0, self._clock() - bucket.stamp) * self.rate)

    def admit(self, peer: str, action: str) -> Admission:
        """Take a token for one attempt from `peer`, or refuse it when the bucket is empty."""
        now = self._clock()
        key = self.key(peer)
        bucket = self._bucket(key, now)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return Admission(key, True)
        retry_after = (1.0 - bucket.tokens) / self.rate
        return Admission(key, False, retry_after, self._note(key, bucket, now, peer, action, RATE_LIMITED,
                                                             exhausted=True))

    def refused(self, key: str, peer: str, action: str, reason: str) -> Verdict:
        """An admitted attempt was refused (its token stays spent): record it, or count it when the
        peer is in an episode."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return _RECORD
        return self._note(key, bucket, self._clock(), peer, action, reason, exhausted=False)

    def charge(self, peer: str, action: str, reason: str) -> Verdict:
        """A refusal before any authentication (no `admit()`): charged to the peer's budget like a
        failed authentication, audited like one."""
        now = self._clock()
        key = self.key(peer)
        bucket = self._bucket(key, now)
        exhausted = bucket.tokens < 1.0
        if not exhausted:
            bucket.tokens -= 1.0
        return self._note(key, bucket, now, peer, action, reason, exhausted=exhausted)

    def refund(self, key: str) -> None:
        """Give back the token of an attempt that succeeded (or failed through no fault of the peer)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return
        now = self._clock()
        self._refill(bucket, now)
        bucket.tokens = min(self.burst, bucket.tokens + 1.0)
        if bucket.tokens >= self.burst and not bucket.limited and bucket.suppressed == 0:
            del self._buckets[key]  # full again: nothing worth remembering

    def sweep(self) -> None:
        """Close the suppressed counts of peers quiet for `audit_interval_s` (a flood that stops is
        accounted for in the audit log within seconds, not when the peer next tries, or never), and
        end the episodes of peers whose bucket is full again."""
        now = self._clock()
        for key in list(self._episodes):
            bucket = self._buckets.get(key)
            if bucket is None:
                self._episodes.discard(key)
                continue
            if now - bucket.last_refusal < self.audit_interval_s:
                continue
            if bucket.suppressed and now - bucket.last_record >= self.audit_interval_s:
                bucket.last_record = now
                self._close(bucket)
            self._refill(bucket, now)
            if bucket.tokens >= self.burst:
                self._close(bucket)
                bucket.limited = False
                self._episodes.discard(key)
                del self._buckets[key]

    def take_summaries(self) -> list[Summary]:
        """Suppressed counts of quiet floods and evicted peers, to be audited once each."""
        summaries, self._summaries = self._summaries, []
        return summaries

    # internals ----------------------------------------------------------------------------------
    def _note(self, key: str, bucket: _Bucket, now: float, peer: str, action: str, reason: str, *,
              exhausted: bool) -> Verdict:
        bucket.last_refusal = now
        if not bucket.limited:
            if not exhausted:
                return _RECORD
            bucket.limited, bucket.last_record = True, now  # an episode starts with this record
            self._episodes.add(key)
            return Verdict(True, episode=True)
        if now - bucket.last_record >= self.audit_interval_s:
            bucket.last_record = now
            suppressed, reasons = bucket.take()
            return Verdict(True, episode=True, suppressed=suppressed, reasons=reasons)
        bucket.suppressed += 1
        bucket.reasons[reason] = bucket.reasons.get(reason, 0) + 1
        bucket.action, bucket.peer = action, peer
        return _SKIP

    def _bucket(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            while len(self._buckets) >= self.max_peers:
                evicted_key, evicted = self._buckets.popitem(last=False)
                self._close(evicted)
                self._episodes.discard(evicted_key)
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        else:
            self._buckets.move_to_end(key)
            self._refill(bucket, now)
        return bucket

    def _refill(self, bucket: _Bucket, now: float) -> None:
        elapsed = max(0.0, now - bucket.stamp)  # an injected clock may step back
        bucket.tokens = min(self.burst, bucket.tokens + elapsed * self.rate)
        bucket.stamp = now

    def _close(self, bucket: _Bucket) -> None:
        if bucket.suppressed > 0:
            peer, action = bucket.peer, bucket.action
            suppressed, reasons = bucket.take()
            self._summaries.append(Summary(peer, action, suppressed, reasons))
