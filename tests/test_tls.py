"""HTTPS on the proxy listener of a real `canary serve`: requests and SSE over real TLS,
ALPN http/1.1, TLS 1.2+, a certificate renewed by a reload served to the next connection
while a broken one is rejected, and `validate` naming bad certificate files."""

from __future__ import annotations

import asyncio
import signal
import ssl
import warnings
from pathlib import Path

import aiohttp
import pytest
import trustme

from config.errors import ConfigError
from config.loader import load_settings
from tests.admin_support import upstream_url
from tests.serve_process import ServeProcess, write_config
from tests.upstreams import STATS


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def issue(ca: trustme.CA, folder: Path, name: str = "proxy") -> bytes:
    """A certificate for 127.0.0.1 written as folder/NAME.pem and NAME-key.pem; its DER."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(folder / f"{name}.pem")
    cert.private_key_pem.write_to_path(folder / f"{name}-key.pem")
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def tls_config(tmp_path: Path, upstreams: dict, **extra: str) -> Path:
    (tmp_path / "certs").mkdir(exist_ok=True)
    return write_config(
        tmp_path / "canary.yaml",
        f"""listen: "127.0.0.1:0"
drain_timeout: 2s
admin: {{listen: "127.0.0.1:0", token: "t"}}
tls:
  cert: "certs/proxy.pem"
  key: "certs/proxy-key.pem"
upstreams:
  baseline: {{url: "{upstream_url(upstreams['baseline'])}"}}
  canary: {{url: "{upstream_url(upstreams['canary'])}"}}
rollout: {{weight: 50}}
state: {{path: "var/state.json"}}
""",
    )


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def served_certificate(port: int, context: ssl.SSLContext) -> tuple[bytes, str | None]:
    """A fresh TLS connection's certificate (DER) and negotiated ALPN protocol."""
    context.set_alpn_protocols(["h2", "http/1.1"])
    _reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        return ssl_object.getpeercert(binary_form=True), ssl_object.selected_alpn_protocol()
    finally:
        writer.close()


@pytest.fixture
async def serve() -> object:
    started: list[ServeProcess] = []

    async def start(config: Path) -> ServeProcess:
        process = await ServeProcess(config).start()
        started.append(process)
        return process

    yield start
    for process in started:
        await process.kill()


async def test_https_requests_and_an_sse_stream_over_tls(tmp_path, upstreams, ca, serve):
    (tmp_path / "certs").mkdir()
    issue(ca, tmp_path / "certs")
    proxy = await serve(tls_config(tmp_path, upstreams))
    assert proxy.events[-1]["proxy"].startswith("https://")
    url = f"https://127.0.0.1:{proxy.proxy_port}"
    connector = aiohttp.TCPConnector(ssl=client_context(ca))
    async with aiohttp.ClientSession(connector=connector) as client:
        for arm in ("baseline", "canary"):
            async with client.post(f"{url}/v1/echo", data=b"x" * 5000, headers={"X-Canary": arm}) as resp:
                echo = await resp.json()
            assert resp.status == 200 and echo["arm"] == arm and echo["body_len"] == 5000
            assert echo["headers"]["X-Forwarded-Proto"] == "https"

        stats = upstreams["canary"].app[STATS]
        async with client.get(f"{url}/sse", headers={"X-Canary": "canary"}) as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            first = await resp.content.readuntil(b"\n\n")
            assert first == b"data: first\n\n"  # arrives while the stream is still open
            stats.release.set()
            rest = await resp.content.read()
        assert rest == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"

    _der, alpn = await served_certificate(proxy.proxy_port, client_context(ca))
    assert alpn == "http/1.1"  # never h2, which this listener does not speak
    old_client = client_context(ca)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # deprecated: that is the point
        old_client.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError):
        await served_certificate(proxy.proxy_port, old_client)


async def test_a_certificate_swapped_by_a_reload_is_served_to_the_next_connection(tmp_path, upstreams, ca, serve):
    certs = tmp_path / "certs"
    certs.mkdir()
    first = issue(ca, certs)
    proxy = await serve(tls_config(tmp_path, upstreams))
    assert (await served_certificate(proxy.proxy_port, client_context(ca)))[0] == first

    renewed = issue(ca, certs)  # certbot-style renewal in place, then SIGHUP
    assert renewed != first
    mark = len(proxy.events)
    proxy.proc.send_signal(signal.SIGHUP)
    await proxy.wait_for_event("tls_certificate_loaded", after=mark)
    assert (await served_certificate(proxy.proxy_port, client_context(ca)))[0] == renewed

    (certs / "proxy.pem").write_text("-----BEGIN CERTIFICATE-----\ntruncated\n")
    mark = len(proxy.events)
    proxy.proc.send_signal(signal.SIGHUP)
    rejected = await proxy.wait_for_event("config_rejected", after=mark)
    assert any("tls.cert" in problem and "not a PEM certificate chain" in problem for problem in rejected["problems"])
    # the renewed certificate keeps serving new connections and requests
    assert (await served_certificate(proxy.proxy_port, client_context(ca)))[0] == renewed
    connector = aiohttp.TCPConnector(ssl=client_context(ca))
    async with (
        aiohttp.ClientSession(connector=connector) as client,
        client.get(f"https://127.0.0.1:{proxy.proxy_port}/echo") as resp,
    ):
        assert resp.status == 200


def test_validate_names_a_missing_unparsable_or_mismatched_file(tmp_path, ca):
    certs = tmp_path / "certs"
    certs.mkdir()
    issue(ca, certs)
    issue(ca, certs, name="other")
    config = tmp_path / "canary.yaml"

    def problems(cert: str, key: str) -> list[str]:
        config.write_text(
            'upstreams: {baseline: {url: "http://127.0.0.1:1"}, canary: {url: "http://127.0.0.1:2"}}\n'
            f'tls: {{cert: "{cert}", key: "{key}"}}\n'
        )
        try:
            settings = load_settings(config)
        except ConfigError as exc:
            return [str(problem) for problem in exc.problems]
        assert settings.tls is not None and settings.tls.cert == certs / "proxy.pem"
        return []

    assert problems("certs/proxy.pem", "certs/proxy-key.pem") == []
    assert problems("certs/missing.pem", "certs/proxy-key.pem") == [
        (
            f"{config}:2: tls.cert: {certs / 'missing.pem'}: no such file (give the PEM certificate chain; "
            "a relative path is taken from the config file's folder)"
        )
    ]
    assert problems("certs", "certs/proxy-key.pem") == [
        f"{config}:2: tls.cert: {certs}: not a file (give the PEM file itself, not a folder)"
    ]
    assert problems("certs/proxy-key.pem", "certs/proxy-key.pem")[0].endswith(
        "not a PEM certificate chain (no certificate or crl found)"
    )
    assert problems("certs/proxy.pem", "certs/other-key.pem") == [
        f"{config}:2: tls.key: {certs / 'other-key.pem'}: does not match the certificate in {certs / 'proxy.pem'}"
    ]
    assert "tls.key" in problems("certs/proxy.pem", "certs/proxy.pem")[0]
