"""Routing state shared between worker processes: rate-limit slots, domain throttles, snapshots.

Three backends, one contract (`RoutingState`):

* `MemoryState`: one process (tests, and `postroom run` with nothing else configured);
* `RedisState`: when `redis_url` is set; one Lua script reserves slots in several limits atomically
  on Redis's clock;
* `StoreState`: through the database (a small `routing_state` table, see `Store.state_update`), so
  several processes or hosts share limits with nothing but the database. Concurrent acquisitions in
  one process go to the database as one transaction (group commit).

Values other than rate slots are small JSON objects with a time to live (`put` / `scan`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

import orjson

from postroom.domain.batching import GroupCommit
from postroom.domain.ports import Store
from postroom.providers.limiter import Grant, Limit, gcra

__all__ = ["MemoryState", "RedisState", "RoutingState", "StoreState"]

_RATE_PREFIX = "rl:"
_TAT_TTL_S = 60.0  # a TAT this far in the past means nothing: let it go


class RoutingState(Protocol):
    shared: bool  # True when other processes see the same state

    async def acquire(self, limits: Sequence[Limit], max_wait_s: float, cost: int = 1) -> Grant:
        """Reserve a slot in every limit at once (see `limiter.gcra`)."""
        ...

    async def backlog(self, limits: Sequence[Limit]) -> dict[str, float]:
        """Seconds of slots already reserved ahead of now, per limit key (0 when idle)."""
        ...

    async def put(self, key: str, value: dict[str, Any], ttl_s: float) -> None: ...

    async def scan(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Every live value whose key starts with `prefix`."""
        ...

    async def close(self) -> None: ...


class MemoryState:
    shared = False

    def __init__(self) -> None:
        self._tats: dict[str, float] = {}
        self._values: dict[str, tuple[dict[str, Any], float]] = {}

    async def acquire(self, limits: Sequence[Limit], max_wait_s: float, cost: int = 1) -> Grant:
        grant, new = gcra(time.time(), self._tats, limits, max_wait_s, cost)
        self._tats.update(new)
        if len(self._tats) > 100_000:  # domains come and go; old TATs mean nothing
            now = time.time()
            self._tats = {k: v for k, v in self._tats.items() if v > now}
        return grant

    async def backlog(self, limits: Sequence[Limit]) -> dict[str, float]:
        now = time.time()
        return {lim.key: max(0.0, self._tats.get(lim.key, now) - now) for lim in limits}

    async def put(self, key: str, value: dict[str, Any], ttl_s: float) -> None:
        self._values[key] = (value, time.time() + ttl_s)

    async def scan(self, prefix: str) -> dict[str, dict[str, Any]]:
        now = time.time()
        return {k: v for k, (v, exp) in self._values.items() if k.startswith(prefix) and exp > now}

    async def close(self) -> None:
        return None


# A batch of acquisitions in one call (the concurrent ones of a process, group-committed), each
# as `gcra` does it, in order. KEYS: the TAT keys of every request, one after the other. ARGV[1]:
# JSON {"now": the caller's epoch s, "reqs": [[max_wait_s, cost, [[interval_s, burst], ...]], ...]}
# (one argument: packing hundreds of small ones costs the client more than the script costs
# Redis). Returns per request: ok (0/1), wait_s, the blocking limit (1-based, 0 = none), at.
# Slots are on the callers' clock (not Redis's TIME) so that a worker sleeps until its slot exactly,
# whatever the round trip took; numbers come back as strings (Redis truncates Lua floats).
_GCRA_LUA = """
local batch = cjson.decode(ARGV[1])
local now = batch.now
local out, tats, dirty = {}, {}, {}
local k = 1
for _, req in ipairs(batch.reqs) do
  local max_wait, cost, lims = req[1], req[2], req[3]
  local n = #lims
  local mine = {}
  local wait, blocking = 0, 0
  for i = 1, n do
    local key = KEYS[k + i - 1]
    local tat = tats[key]
    if tat == nil then
      tat = tonumber(redis.call('GET', key) or '0')
      tats[key] = tat
    end
    if tat < now then tat = now end
    mine[i] = tat
    local w = tat - (lims[i][2] - 1) * lims[i][1] - now
    if w > wait then wait, blocking = w, i end
  end
  if wait > max_wait then
    out[#out + 1] = 0
  else
    local at = now + wait
    for i = 1, n do
      local key = KEYS[k + i - 1]
      local tat = math.max(mine[i], at) + lims[i][1] * cost
      tats[key] = tat
      dirty[key] = tat
    end
    out[#out + 1] = 1
  end
  out[#out + 1] = string.format('%.6f', wait)
  out[#out + 1] = blocking
  out[#out + 1] = string.format('%.6f', now + wait)
  k = k + n
end
for key, tat in pairs(dirty) do
  redis.call('SET', key, string.format('%.6f', tat), 'PX', math.ceil((tat - now) * 1000) + 60000)
end
return out
"""

_BACKLOG_LUA = """
local now = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS do
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  out[i] = string.format('%.6f', math.max(0, tat - now))
end
return out
"""


class RedisState:
    """Shared through Redis (`redis_url`). Keys live under `prefix` (default ``postroom:``)."""

    shared = True

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "postroom:",
        timeout_s: float = 5.0,
        max_connections: int = 16,
    ) -> None:
        import redis.asyncio as aioredis

        self.url = url
        self.prefix = prefix
        # a bounded pool: acquisitions are group-committed (one script call per batch), but
        # snapshots, scans and many routers in one process must not open connections unbounded
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
        self._redis = aioredis.Redis.from_pool(pool)  # the client owns (and closes) the pool
        self._gcra = self._redis.register_script(_GCRA_LUA)
        self._acquirer: GroupCommit[tuple[Sequence[Limit], float, int], Grant] = GroupCommit(
            self._acquire_many, max_batch=200
        )
        self._backlog = self._redis.register_script(_BACKLOG_LUA)

    def _rkey(self, key: str) -> str:
        return f"{self.prefix}{_RATE_PREFIX}{key}"

    async def acquire(self, limits: Sequence[Limit], max_wait_s: float, cost: int = 1) -> Grant:
        return await self._acquirer.submit((limits, max_wait_s, cost))

    async def _acquire_many(
        self, reqs: Sequence[tuple[Sequence[Limit], float, int]]
    ) -> list[Grant]:
        keys = [self._rkey(lim.key) for limits, _, _ in reqs for lim in limits]
        batch = {
            "now": time.time(),
            "reqs": [
                [max_wait_s, cost, [[lim.interval_s, lim.burst] for lim in limits]]
                for limits, max_wait_s, cost in reqs
            ],
        }
        out = await self._gcra(keys=keys, args=[orjson.dumps(batch)])
        return [
            Grant(bool(out[i]), float(out[i + 1]), int(out[i + 2]) - 1, float(out[i + 3]))
            for i in range(0, len(out), 4)
        ]

    async def backlog(self, limits: Sequence[Limit]) -> dict[str, float]:
        if not limits:
            return {}
        out = await self._backlog(
            keys=[self._rkey(x.key) for x in limits], args=[repr(time.time())]
        )
        return {lim.key: float(v) for lim, v in zip(limits, out, strict=True)}

    async def put(self, key: str, value: dict[str, Any], ttl_s: float) -> None:
        await self._redis.set(self.prefix + key, orjson.dumps(value), px=max(1, int(ttl_s * 1000)))

    async def scan(self, prefix: str) -> dict[str, dict[str, Any]]:
        keys = [k async for k in self._redis.scan_iter(match=f"{self.prefix}{prefix}*", count=500)]
        if not keys:
            return {}
        values = await self._redis.mget(keys)
        n = len(self.prefix)
        return {
            k.decode()[n:]: orjson.loads(v)
            for k, v in zip(keys, values, strict=True)
            if v is not None
        }

    async def close(self) -> None:
        await self._acquirer.close()
        await self._redis.aclose()


class StoreState:
    """Shared through the database. Each value is JSON text with an expiry in `routing_state`."""

    shared = True

    def __init__(self, store: Store) -> None:
        self.store = store
        self._acquirer: GroupCommit[tuple[Sequence[Limit], float, int], Grant] = GroupCommit(
            self._acquire_many, max_batch=500
        )

    async def acquire(self, limits: Sequence[Limit], max_wait_s: float, cost: int = 1) -> Grant:
        return await self._acquirer.submit((limits, max_wait_s, cost))

    async def _acquire_many(
        self, reqs: Sequence[tuple[Sequence[Limit], float, int]]
    ) -> list[Grant]:
        keys = sorted({_RATE_PREFIX + lim.key for limits, _, _ in reqs for lim in limits})

        def update(rows: dict[str, str]) -> tuple[dict[str, tuple[str, float | None]], list[Grant]]:
            now = time.time()
            tats = {k[len(_RATE_PREFIX) :]: float(v) for k, v in rows.items()}
            changed: dict[str, float] = {}
            grants = []
            for limits, max_wait_s, cost in reqs:
                grant, new = gcra(now, tats, limits, max_wait_s, cost)
                tats.update(new)
                changed.update(new)
                grants.append(grant)
            writes: dict[str, tuple[str, float | None]] = {
                _RATE_PREFIX + k: (repr(v), v + _TAT_TTL_S) for k, v in changed.items()
            }
            return writes, grants

        return await self.store.state_update(keys, update)

    async def backlog(self, limits: Sequence[Limit]) -> dict[str, float]:
        rows = await self.store.state_scan(_RATE_PREFIX)
        now = time.time()
        out = {}
        for lim in limits:
            raw = rows.get(_RATE_PREFIX + lim.key)
            out[lim.key] = max(0.0, float(raw) - now) if raw is not None else 0.0
        return out

    async def put(self, key: str, value: dict[str, Any], ttl_s: float) -> None:
        text = orjson.dumps(value).decode()
        exp = time.time() + ttl_s

        def update(_: dict[str, str]) -> tuple[dict[str, tuple[str, float | None]], None]:
            return {key: (text, exp)}, None

        await self.store.state_update([], update)

    async def scan(self, prefix: str) -> dict[str, dict[str, Any]]:
        rows = await self.store.state_scan(prefix)
        return {k: orjson.loads(v) for k, v in rows.items()}

    async def close(self) -> None:
        await self._acquirer.close()
