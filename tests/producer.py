"""A producer process for end-to-end tests: sends prompts concurrently, prints results as JSON.

Usage: python tests/producer.py URL JSON_ARGS  (JSON_ARGS: {"prompts": [...], "chat": bool, ...})
It waits for a go-file to appear so that several producers fire at the same moment.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time


async def main(url: str, spec: dict) -> None:
    from batchd import AsyncClient

    async with AsyncClient(url) as client:
        go_file = spec.get("go_file")
        while go_file and not os.path.exists(go_file):
            await asyncio.sleep(0.01)

        async def one(prompt: str) -> dict:
            kwargs = {"messages": [{"role": "user", "content": prompt}]} if spec.get("chat") else {"prompt": prompt}
            result = await client.generate(max_new_tokens=spec.get("max_new_tokens", 64), timeout=spec.get("timeout", 120),
                                           model=spec.get("model"), **kwargs)
            return {"prompt": prompt, "request_id": result.request_id, "text": result.text,
                    "token_ids": result.token_ids, "finish_reason": result.finish_reason, "worker": result.worker}

        results = await asyncio.gather(*(one(p) for p in spec["prompts"]))
    print(json.dumps({"pid": os.getpid(), "finished_at": time.time(), "results": results}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
