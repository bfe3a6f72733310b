"""Per-peer throttling of authentication failures (`limits.auth_failures_per_second`).

A client guessing credentials (or replaying a stolen token list) costs the hub a database lookup, an
HMAC and an audit record per attempt. `AuthThrottle` keeps one token bucket per peer address: every
attempt holds a token while it runs, a success gives it back, a refusal keeps it. When a peer's bucket
is empty its attempts are refused at once (`auth-rate-limited`) without any of that work — valid
credentials included, so a guessing peer cannot slip a correct guess in — until the bucket refills at
`rate` per second (burst `2 × rate`). Holding the token during the attempt makes concurrent guesses
count too: a peer cannot open a thousand connections and have them all verified before the first
refusal is charged.

Keys are the peer's IP address, IPv4-mapped IPv6 folded to IPv4, and IPv6 grouped by its /64 (one
host usually owns a whole /64, so per-address buckets would be free to evade). Only peers with a
deficit are remembered, in an LRU bounded by `max_peers`, so a flood from many sources cannot
exhaust memory; an evicted peer merely starts over with a full bucket.

Throttled refusals are audited in aggregate so the audit table cannot become the amplifier: the first
refusal of an episode is recorded, then at most one per peer per `audit_interval_s`, each carrying
`suppressed` = refusals not written since the previous record. Counts still pending when the episode
ends (the peer is admitted again), when the peer is evicted, or when `sweep()` finds them quiet for
`audit_interval_s` (the hub sweeps every second) come back from `take_summaries()` for a closing
record. Total refused = records that are not summaries + the sum of `suppressed`.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from tether.security.principal import AuthRefused

__all__ = [
    "DEFAULT_MAX_PEERS",
    "RATE_LIMITED",
    "Admission",
    "AuthThrottle",
    "AuthThrottled",
    "Summary",
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
class Admission:
    """`admit()`'s answer. Allowed: the attempt holds one token of bucket `key` (call `refund(key)`
    when it succeeds). Refused: `record` says whether to audit this refusal, with `suppressed`."""

    key: str
    allowed: bool
    retry_after: float = 0.0
    record: bool = False
    suppressed: int = 0


@dataclass(frozen=True, slots=True)
class Summary:
    """Throttled refusals never written individually, to be closed with one audit record."""

    peer: str
    action: str
    suppressed: int


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float
    limited: bool = False  # in a throttled episode
    last_record: float = 0.0
    suppressed: int = 0
    action: str = ""  # of the last suppressed refusal, for a summary record
    peer: str = ""


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
        self._suppressing: set[str] = set()  # keys of buckets holding a suppressed count

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
            if bucket.limited:  # the episode is over
                bucket.limited = False
                self._close(bucket)
                self._suppressing.discard(key)
            return Admission(key, True)
        retry_after = (1.0 - bucket.tokens) / self.rate
        if not bucket.limited:
            bucket.limited, bucket.last_record, bucket.suppressed = True, now, 0
            return Admission(key, False, retry_after, record=True)
        if now - bucket.last_record >= self.audit_interval_s:
            suppressed, bucket.suppressed, bucket.last_record = bucket.suppressed, 0, now
            return Admission(key, False, retry_after, record=True, suppressed=suppressed)
        bucket.suppressed += 1
        bucket.action, bucket.peer = action, peer
        self._suppressing.add(key)
        return Admission(key, False, retry_after)

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
        """Close the suppressed counts that went quiet for `audit_interval_s`, so a flood that stops
        is accounted for in the audit log within seconds, not when the peer next tries (or never)."""
        now = self._clock()
        for key in list(self._suppressing):
            bucket = self._buckets.get(key)
            if bucket is None:
                self._suppressing.discard(key)
            elif now - bucket.last_record >= self.audit_interval_s:
                bucket.last_record = now
                self._close(bucket)
                self._suppressing.discard(key)

    def take_summaries(self) -> list[Summary]:
        """Suppressed counts of finished episodes and evicted peers, to be audited once each."""
        summaries, self._summaries = self._summaries, []
        return summaries

    # internals ----------------------------------------------------------------------------------
    def _bucket(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            while len(self._buckets) >= self.max_peers:
                evicted_key, evicted = self._buckets.popitem(last=False)
                self._close(evicted)
                self._suppressing.discard(evicted_key)
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
            self._summaries.append(Summary(bucket.peer, bucket.action, bucket.suppressed))
            bucket.suppressed = 0
