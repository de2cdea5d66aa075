"""HTTP helpers for tests that talk to a gateway."""
from __future__ import annotations

import asyncio

import aiohttp


async def wait_ready(base_url: str, timeout: float = 5.0) -> None:
    """Poll `base_url`/readyz until it answers 200 (a worker's heartbeat has reached the gateway)."""
    async with aiohttp.ClientSession() as http:
        for _ in range(int(timeout / 0.05)):
            async with http.get(f"{base_url}/readyz") as resp:
                if resp.status == 200:
                    return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{base_url} did not become ready within {timeout:g}s")
