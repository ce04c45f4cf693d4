"""Request authentication for `/v1/*`: kameng's own request-signing scheme, verified the way a
strict supplier would (±300 s clock window, nonces remembered for 10 minutes).

The simulator reuses `kameng.security.signing` rather than a private copy so that the adapter,
our API and the simulator can never disagree about what is signed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping

from kameng.security.signing import sign_request, signature_matches

WINDOW_S = 300
NONCE_TTL_S = 600
MAX_NONCE_LENGTH = 128


class RequestVerifier:
    """Checks signatures and remembers nonces (in memory, pruned in arrival order, O(1))."""

    def __init__(
        self,
        merchants: Mapping[str, str],
        *,
        window_s: int = WINDOW_S,
        nonce_ttl_s: float = NONCE_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.merchants = dict(merchants)
        self.window_s = window_s
        self.nonce_ttl_s = nonce_ttl_s
        self.clock = clock
        self._seen: dict[tuple[str, str], float] = {}
        self._expiry: deque[tuple[float, tuple[str, str]]] = deque()

    def verify(
        self, headers: Mapping[str, str], method: str, path_with_query: str, body: bytes
    ) -> str | None:
        """The merchant key when the request is authentic and fresh, else None.

        The nonce is recorded only after the signature checks out, so a forged request cannot
        burn a nonce the real client is about to use.
        """
        api_key = headers.get("x-api-key", "")
        timestamp = headers.get("x-timestamp", "")
        nonce = headers.get("x-nonce", "")
        signature = headers.get("x-signature", "")
        secret = self.merchants.get(api_key)
        if secret is None or not signature or not nonce or len(nonce) > MAX_NONCE_LENGTH:
            return None
        if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
            return None
        now = self.clock()
        if abs(now - int(timestamp)) > self.window_s:
            return None
        expected = sign_request(secret, method, path_with_query, timestamp, nonce, body)
        if not signature_matches(expected, signature):
            return None
        self._prune(now)
        slot = (api_key, nonce)
        if slot in self._seen:
            return None
        self._seen[slot] = now + self.nonce_ttl_s
        self._expiry.append((now + self.nonce_ttl_s, slot))
        return api_key

    def _prune(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            _, slot = self._expiry.popleft()
            if self._seen.get(slot, now + 1) <= now:
                del self._seen[slot]
