"""Frame encoding/decoding and rejection of bad frames (no sockets needed)."""

from __future__ import annotations

import socket
import struct

import msgpack
import pytest

from kvbridge.auth import Hello, check_bind, check_hello
from kvbridge.errors import AuthError, ProtocolError
from kvbridge.protocol import (
    HEADER,
    MAGIC,
    PROTOCOL_VERSION,
    ErrorReply,
    Ok,
    decode_body,
    decode_header,
    encode_frame,
    recv_message,
    send_message,
)


def roundtrip(msg: object) -> object:
    frame = encode_frame(msg)
    length = decode_header(frame[: HEADER.size])
    assert length == len(frame) - HEADER.size
    return decode_body(frame[HEADER.size :])


def test_roundtrip_messages() -> None:
    assert roundtrip(Hello(token="t", peer="node-a")) == Hello(token="t", peer="node-a")
    assert roundtrip(Ok()) == Ok()
    assert roundtrip(ErrorReply(code="invalid", message="x")) == ErrorReply("invalid", "x")


def test_header_layout() -> None:
    frame = encode_frame(Ok())
    assert frame[:4] == MAGIC
    assert struct.unpack("!H", frame[4:6]) == (PROTOCOL_VERSION,)


def test_rejects_bad_magic() -> None:
    with pytest.raises(ProtocolError, match=r"bad magic b'XXXX'"):
        decode_header(HEADER.pack(b"XXXX", PROTOCOL_VERSION, 1))


def test_rejects_wrong_version() -> None:
    with pytest.raises(ProtocolError, match=r"unsupported protocol version 7 \(expected 1\)"):
        decode_header(HEADER.pack(MAGIC, 7, 1))


def test_rejects_oversized() -> None:
    with pytest.raises(ProtocolError, match=r"body of 2000 bytes exceeds max_frame_bytes=1000"):
        decode_header(HEADER.pack(MAGIC, PROTOCOL_VERSION, 2000), max_frame_bytes=1000)


def test_rejects_malformed_bodies() -> None:
    with pytest.raises(ProtocolError, match="undecodable msgpack"):
        decode_body(b"\xc1")
    with pytest.raises(ProtocolError, match=r"unknown message tag 'nope'"):
        decode_body(msgpack.packb(["nope"]))
    with pytest.raises(ProtocolError, match=r"Hello needs 2 fields, got 1"):
        decode_body(msgpack.packb(["hello", "t"]))
    with pytest.raises(ProtocolError, match=r"Hello.peer: expected str, got int 5"):
        decode_body(msgpack.packb(["hello", "t", 5]))
    with pytest.raises(ProtocolError, match=r"expected \[tag, fields...\], got \{"):
        decode_body(msgpack.packb({"a": 1}))


def test_unregistered_message_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="msg: str is not a registered wire message"):
        encode_frame("hello")


def test_check_bind_requires_token_beyond_loopback() -> None:
    check_bind("127.0.0.1", None)
    check_bind("localhost", None)
    check_bind("0.0.0.0", "secret")
    with pytest.raises(ValueError, match=r"binding '0.0.0.0' beyond loopback requires a token"):
        check_bind("0.0.0.0", None)


def test_check_hello() -> None:
    assert check_hello(Hello("s", "p"), "s") == Hello("s", "p")
    assert check_hello(Hello("", "p"), None) == Hello("", "p")
    with pytest.raises(AuthError, match="bad token from peer 'p'"):
        check_hello(Hello("wrong", "p"), "s")
    with pytest.raises(AuthError, match="expected Hello as the first frame, got Ok"):
        check_hello(Ok(), "s")


def test_socket_helpers() -> None:
    left, right = socket.socketpair()
    with left, right:
        send_message(left, Hello("t", "me"))
        assert recv_message(right) == Hello("t", "me")
        left.close()
        with pytest.raises(ProtocolError, match="connection closed after 0 of 10 bytes"):
            recv_message(right)
