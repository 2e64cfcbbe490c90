"""The upstream side: where requests leave the proxy and upstream bytes are read.

One narrow interface (`Transport.send` returning an `UpstreamResponse`, in `transport`)
with three clients behind it: aiohttp's `ClientSession` (in `transport`), `lean` (an
asyncio protocol on httptools, with `lean_wire` the per-connection parser) and `http2`
(httpx). `pool` holds one transport per arm and swaps them on reload.
"""
