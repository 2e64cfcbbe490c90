"""Following WebSocket frames in a relayed byte stream without changing a byte (RFC 6455 §5).

The relay passes bytes through as they come; this only reads frame headers as they go
by, so it knows where frames end (the proxy may add its own close frame only between
two frames) and the status code of the first close frame. Payloads are skipped, never
copied, so a large binary message costs one header parse per frame.
"""

from __future__ import annotations

import os

__all__ = ["ABNORMAL_CLOSE_CODES", "FrameTracker", "close_frame"]

_CLOSE = 0x8
_NO_STATUS = 1005  # a close frame without a status code
ABNORMAL_CLOSE_CODES = frozenset({1006, 1011})  # an upstream closing with these failed


class FrameTracker:
    """One direction of one connection: frame boundaries and the first close code."""

    __slots__ = ("_code", "_code_wanted", "_header", "_mask", "_remaining", "close_code")

    def __init__(self) -> None:
        self._remaining = 0  # payload bytes of the current frame still to come
        self._header = b""  # a frame header split across reads
        self._mask = b""
        self._code = b""  # the close frame's first payload bytes (its status code)
        self._code_wanted = False
        self.close_code: int | None = None  # set once the first close frame has arrived

    @property
    def at_boundary(self) -> bool:
        return self._remaining == 0 and not self._header

    def feed(self, data: bytes, *, stop_at_boundary: bool = False) -> int:
        """Follow `data`; returns how many bytes were taken: all of them, or with
        `stop_at_boundary` only those up to the first frame boundary reached."""
        pos, end = 0, len(data)
        while pos < end:
            if stop_at_boundary and self.at_boundary:
                return pos
            if self._remaining:
                take = min(self._remaining, end - pos)
                if self._code_wanted:
                    self._collect_code(data[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining and self._code_wanted:
                    self._close_complete()
                continue
            pos = self._read_header(data, pos)
        return pos

    def _read_header(self, data: bytes, pos: int) -> int:
        buf = self._header + data[pos : pos + 14]
        if len(buf) < 2:
            self._header = buf
            return len(data)
        first, second = buf[0], buf[1]
        length = second & 0x7F
        size = 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if second & 0x80 else 0)
        if len(buf) < size:
            self._header = buf  # fewer than 14 bytes were left: all of them are in `buf`
            return len(data)
        if length == 126:
            length = int.from_bytes(buf[2:4], "big")
        elif length == 127:
            length = int.from_bytes(buf[2:10], "big")
        taken = size - len(self._header)
        self._mask = buf[size - 4 : size] if second & 0x80 else b""
        self._header = b""
        self._remaining = length
        if first & 0x0F == _CLOSE and self.close_code is None:
            self._code, self._code_wanted = b"", True
            if not length:
                self._close_complete()
        return pos + taken

    def _collect_code(self, chunk: bytes) -> None:
        if len(self._code) < 2:
            self._code += chunk[: 2 - len(self._code)]

    def _close_complete(self) -> None:
        self._code_wanted = False
        code = self._code
        if len(code) < 2:
            self.close_code = _NO_STATUS
            return
        if self._mask:
            code = bytes((code[0] ^ self._mask[0], code[1] ^ self._mask[1]))
        self.close_code = int.from_bytes(code, "big")


def close_frame(code: int, reason: str, *, masked: bool) -> bytes:
    """A close frame from the proxy: unmasked towards the client, masked (as a client
    must) towards the upstream."""
    payload = code.to_bytes(2, "big") + reason.encode()[:123]
    if not masked:
        return bytes((0x80 | _CLOSE, len(payload))) + payload
    key = os.urandom(4)
    return bytes((0x80 | _CLOSE, 0x80 | len(payload))) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))
