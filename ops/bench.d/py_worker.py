"""The Python reference worker of `ops/bench worker` (issue #17): what a small team would
write in an afternoon, to keep our worker's numbers honest on any machine.

aio-pika consumer (prefetch 100) on the 8 shard queues, Redis `SET NX` dedup and `HINCRBY`
session counter, aiohttp POST of a text reply to the fake customer-service API, ack. It does
less than wechat-worker: no per-user order, no decision record, no claim or fence, no window
tracking, no retries. Run one process per worker:

    python3 py_worker.py   (AMQP_URL, REDIS_URL, WECHAT_API_URL, TOKEND_URL, TOKEND_SECRET)
"""
import asyncio
import os
import re
import signal

import aio_pika
import aiohttp
import redis.asyncio as aioredis

FROM = re.compile(rb"<FromUserName><!\[CDATA\[(.*?)\]\]></FromUserName>")
MSGID = re.compile(rb"<MsgId>(\d+)</MsgId>")


async def main() -> None:
    prefix = os.environ.get("WECHAT_QUEUE_PREFIX", "wechat")
    shards = int(os.environ.get("SHARDS", "8"))
    api = os.environ["WECHAT_API_URL"].rstrip("/")
    # Blocking: callers wait for a free connection instead of failing (prefetch 100 per process).
    redis = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(os.environ["REDIS_URL"], max_connections=100))
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
    async with http.get(
        os.environ["TOKEND_URL"].rstrip("/") + "/v1/access-token",
        headers={"Authorization": "Bearer " + os.environ["TOKEND_SECRET"]},
    ) as r:
        token = (await r.json())["access_token"]
    url = f"{api}/cgi-bin/message/custom/send?access_token={token}"

    connection = await aio_pika.connect_robust(os.environ["AMQP_URL"])
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=100)

    async def handle(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        body = message.body
        user = FROM.search(body).group(1).decode()
        msgid = MSGID.search(body).group(1).decode()
        if await redis.set(f"py:dedup:{msgid}", 1, nx=True, ex=86400):
            count = await redis.hincrby(f"py:session:{user}", "count", 1)
            reply = {"touser": user, "msgtype": "text", "text": {"content": f"第{count}条消息：可发送 帮助 或 菜单"}}
            async with http.post(url, json=reply) as r:
                await r.read()
        await message.ack()

    for i in range(shards):
        queue = await channel.get_queue(f"{prefix}.inbound.{i}", ensure=False)
        await queue.consume(handle)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    await stop.wait()
    await connection.close()
    await http.close()
    await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main())
