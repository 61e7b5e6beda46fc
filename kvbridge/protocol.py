"""kvbridge's wire protocol: length-prefixed, versioned msgpack frames (never pickle).

A frame is a 10-byte header ``MAGIC (4s) | version (u16) | body length (u32)``, big-endian,
followed by a msgpack body ``[tag, field_0, field_1, ...]``. Every message is a frozen slotted
dataclass registered with :func:`message`; its fields are encoded in declaration order and
each is type-checked on decode, so a peer can never hand us an unexpected type. Nested
records (e.g. a load report) are encoded as a plain list of their fields, without a tag.

Reading rejects a wrong magic, a wrong version, a body over ``max_frame_bytes``, undecodable
msgpack, unknown tags and ill-typed fields with :class:`ProtocolError` naming the offending
value. Connections authenticate first (auth.py: Hello, check_hello, check_bind).
This module never imports torch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack

from kvbridge.errors import PeerClosed, ProtocolError

MAGIC = b"KVBR"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("!4sHI")
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
MAX_STR_LEN = 4096
MAX_BYTES_LEN = 1024

M = TypeVar("M")
_REGISTRY: dict[str, type] = {}
_Decoder = Callable[[object, str], object]


def message(tag: str) -> Callable[[type[M]], type[M]]:
    """Class decorator: registers a frozen slotted dataclass as a wire message under ``tag``."""

    def register(cls: type[M]) -> type[M]:
        if tag in _REGISTRY:
            raise RuntimeError(f"duplicate message tag {tag!r}")
        if not dataclasses.is_dataclass(cls):
            raise RuntimeError(f"message {cls.__name__} must be a dataclass")
        cls._wire_tag = tag  # type: ignore[attr-defined]
        _REGISTRY[tag] = cls
        return cls

    return register


# ----- field codecs (one per annotation string; the decorator-free nested records use lists)

def _expect(kind: type, value: object, where: str) -> Any:
    # bool is an int subclass: refuse it where an int is expected, and vice versa.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"{where}: expected {kind.__name__}, got {type(value).__name__} {value!r:.80}")
    return value


def _dec_str(value: object, where: str) -> str:
    text = _expect(str, value, where)
    if len(text) > MAX_STR_LEN:
        raise ProtocolError(f"{where}: string of {len(text)} chars exceeds {MAX_STR_LEN}")
    return text


def _dec_int(value: object, where: str) -> int:
    return int(_expect(int, value, where))


def _dec_float(value: object, where: str) -> float:
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return float(_expect(float, value, where))


def _dec_bool(value: object, where: str) -> bool:
    return bool(_expect(bool, value, where))


def _dec_bytes(value: object, where: str) -> bytes:
    data = _expect(bytes, value, where)
    if len(data) > MAX_BYTES_LEN:
        raise ProtocolError(f"{where}: {len(data)} bytes exceeds {MAX_BYTES_LEN}")
    return data


def _tuple_of(inner: _Decoder) -> _Decoder:
    def decode(value: object, where: str) -> tuple[object, ...]:
        items = _expect(list, value, where)
        return tuple(inner(item, f"{where}[{i}]") for i, item in enumerate(items))

    return decode


_SCALARS: dict[str, _Decoder] = {
    "str": _dec_str, "int": _dec_int, "float": _dec_float, "bool": _dec_bool, "bytes": _dec_bytes,
}


def _decoder_for(annotation: str) -> _Decoder:
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    if annotation.startswith("tuple[") and annotation.endswith(", ...]"):
        return _tuple_of(_decoder_for(annotation[len("tuple["):-len(", ...]")]))
    nested = _RECORDS.get(annotation)
    if nested is None:
        raise RuntimeError(f"no wire codec for field annotation {annotation!r}")
    return lambda value, where: decode_fields(nested, value, where)


_RECORDS: dict[str, type] = {}


def record(cls: type[M]) -> type[M]:
    """Class decorator: a dataclass that may be nested inside messages (encoded as a list)."""
    _RECORDS[cls.__name__] = cls
    return cls


_SCALAR_FIELDS: dict[type, tuple[str, ...] | None] = {}


def _is_flat(annotation: str) -> bool:
    """A scalar or a tuple of scalars: encoded as is (msgpack writes a tuple as an array)."""
    inner = annotation[len("tuple["):-len(", ...]")] if annotation.startswith("tuple[") else annotation
    return inner in _SCALARS


def _scalar_fields(cls: type) -> tuple[str, ...] | None:
    """The field names of ``cls`` when no field nests a record (fast path), else None."""
    if cls not in _SCALAR_FIELDS:
        fields = dataclasses.fields(cls)
        flat = all(_is_flat(str(f.type)) for f in fields)
        _SCALAR_FIELDS[cls] = tuple(f.name for f in fields) if flat else None
    return _SCALAR_FIELDS[cls]


def encode_fields(obj: object) -> list[object]:
    """The wire list of a message or record's fields, in declaration order."""
    names = _scalar_fields(type(obj))
    if names is not None:
        return [getattr(obj, name) for name in names]
    out: list[object] = []
    for field in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, field.name)
        if dataclasses.is_dataclass(value):
            out.append(encode_fields(value))
        elif isinstance(value, tuple):
            out.append([encode_fields(v) if dataclasses.is_dataclass(v) else v for v in value])
        else:
            out.append(value)
    return out


_FieldCodec = tuple[str, _Decoder, str]  # field name, decoder, name for error messages
_CODECS: dict[type, tuple[_FieldCodec, ...]] = {}


def _codec(cls: type) -> tuple[_FieldCodec, ...]:
    """The field decoders of ``cls``, built once per class (decoding is on the hot path)."""
    codec = _CODECS.get(cls)
    if codec is None:
        fields = dataclasses.fields(cls)
        codec = _CODECS[cls] = tuple((f.name, _decoder_for(str(f.type)), f"{cls.__name__}.{f.name}") for f in fields)
    return codec


def decode_fields(cls: type[M], items: object, where: str) -> M:
    """Builds ``cls`` from its wire list, checking the field count and every field's type."""
    values = _expect(list, items, where)
    codec = _codec(cls)
    if len(values) != len(codec):
        raise ProtocolError(f"{where}: {cls.__name__} needs {len(codec)} fields, got {len(values)}")
    kwargs = {name: decode(v, name_in_errors) for (name, decode, name_in_errors), v in zip(codec, values, strict=True)}
    try:
        return cls(**kwargs)
    except ValueError as exc:  # the dataclass's own validation
        raise ProtocolError(f"{where}: invalid {cls.__name__}: {exc}") from exc


# ----- frames

def encode_frame(msg: object) -> bytes:
    """Header + msgpack body of a registered message."""
    tag = getattr(type(msg), "_wire_tag", None)
    if tag is None:
        raise ValueError(f"msg: {type(msg).__name__} is not a registered wire message")
    body = msgpack.packb([tag, *encode_fields(msg)], use_bin_type=True)
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, len(body)) + body


def decode_header(header: bytes, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> int:
    """Validates a frame header; returns the body length."""
    if len(header) != HEADER.size:
        raise ProtocolError(f"frame header: expected {HEADER.size} bytes, got {len(header)}")
    magic, version, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(f"frame header: bad magic {magic!r} (expected {MAGIC!r})")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"frame header: unsupported protocol version {version} (expected {PROTOCOL_VERSION})")
    if length > max_frame_bytes:
        raise ProtocolError(f"frame header: body of {length} bytes exceeds max_frame_bytes={max_frame_bytes}")
    return int(length)


def decode_body(body: bytes) -> object:
    """Decodes a msgpack body into its registered message."""
    try:
        items = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"frame body: undecodable msgpack ({exc})") from exc
    if not isinstance(items, list) or not items or not isinstance(items[0], str):
        raise ProtocolError(f"frame body: expected [tag, fields...], got {items!r:.80}")
    cls = _REGISTRY.get(items[0])
    if cls is None:
        raise ProtocolError(f"frame body: unknown message tag {items[0]!r:.80}")
    return decode_fields(cls, items[1:], items[0])


def expect_message(msg: object, cls: type[M]) -> M:
    """Returns ``msg`` if it is a ``cls``; a ProtocolError naming both types otherwise."""
    if not isinstance(msg, cls):
        raise ProtocolError(f"expected {cls.__name__}, got {type(msg).__name__}")
    return msg


# ----- blocking sockets (the caller sets the socket timeout from its deadline)

def recv_exactly(sock: socket.socket, nbytes: int, deadline: float | None = None) -> bytearray:
    """``nbytes`` bytes; with a ``time.monotonic()`` deadline, TimeoutError once it passed (the
    socket's timeout then bounds the whole read, not each recv: a trickling peer cannot stretch
    it)."""
    buf = bytearray(nbytes)
    view = memoryview(buf)
    got = 0
    while got < nbytes:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"frame not complete in time: {got} of {nbytes} bytes")
            sock.settimeout(left)
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ProtocolError(f"connection closed after {got} of {nbytes} bytes")
        got += n
    return buf


def send_message(sock: socket.socket, msg: object) -> None:
    sock.sendall(encode_frame(msg))


def recv_message(sock: socket.socket, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 deadline: float | None = None) -> object:
    length = decode_header(bytes(recv_exactly(sock, HEADER.size, deadline)), max_frame_bytes)
    return decode_body(bytes(recv_exactly(sock, length, deadline)))


# ----- asyncio streams

async def read_message(
    reader: asyncio.StreamReader, timeout_s: float, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> object:
    """Reads one frame; TimeoutError past ``timeout_s``, ProtocolError on a bad frame or EOF."""
    try:
        header = await asyncio.wait_for(reader.readexactly(HEADER.size), timeout_s)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise PeerClosed("the peer closed the connection between frames") from exc
        raise ProtocolError(f"connection closed mid-frame after {len(exc.partial)} bytes") from exc
    try:
        length = decode_header(header, max_frame_bytes)
        body = await asyncio.wait_for(reader.readexactly(length), timeout_s)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError(f"connection closed mid-frame after {len(exc.partial)} bytes") from exc
    return decode_body(body)


async def write_message(writer: asyncio.StreamWriter, msg: object, timeout_s: float) -> None:
    writer.write(encode_frame(msg))
    await asyncio.wait_for(writer.drain(), timeout_s)


@message("ok")
@dataclasses.dataclass(frozen=True, slots=True)
class Ok:
    pass


@message("error")
@dataclasses.dataclass(frozen=True, slots=True)
class ErrorReply:
    """Answer to a failed request: ``code`` in {protocol, auth, invalid, internal}."""

    code: str
    message: str
