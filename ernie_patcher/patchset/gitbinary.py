"""git's binary patches (`GIT binary patch`, as `git diff --binary` writes them): the base85 lines,
the zlib stream they carry, git's delta format, and git's object ids.

Hand-written because no library reads them: git's base85 is RFC 1924's alphabet (base64's
b85decode's) but framed per line -- a length character, then the line's bytes zero-padded to a
multiple of 4 -- and b85decode, a Python loop per 5 characters, takes 0.65 s for 2 MB; here the
digits of all groups are summed as five big integers (C speed: 2 MB in ~20 ms). The delta is
git's copy/insert format (git's patch-delta.c).
"""
from __future__ import annotations

import hashlib
import zlib

MAX_INFLATED = 256 << 20  # one package file, as safeio.MAX_OBJECT
ALPHABET = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%&()*+-;<=>?@^_`{|}~"
_DIGITS = bytes(ALPHABET.index(c) if c in ALPHABET else 0xFF for c in range(256))


class BinaryError(ValueError):
    """A binary patch that does not decode, or a delta that does not fit the file it is applied to."""


_LENGTHS = {c: n for n, c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", start=1)}


def decode85(body: bytes) -> bytes:
    """The bytes of git's base85 lines BODY (each: a length character, then 5 characters per 4 bytes)."""
    lines = [line for line in body.replace(b"\r\n", b"\n").split(b"\n") if line]
    lengths = [_LENGTHS.get(line[0], 0) for line in lines]
    if not all(lengths) or any(len(line) != (n + 3) // 4 * 5 + 1 for line, n in zip(lines, lengths)):
        raise BinaryError("bad line in a binary patch (length character or line length)")
    if any(n % 4 for n in lengths[:-1]):  # not as git writes it: decode each line on its own
        return b"".join(_b85(line[1:])[:n] for line, n in zip(lines, lengths))
    return _b85(b"".join(line[1:] for line in lines))[:sum(lengths)]


def _b85(text: bytes) -> bytes:
    """Base85 TEXT (groups of 5 characters, each group 4 bytes big-endian) decoded: each group's
    digits are put in 5-byte lanes of five big integers, one per digit position, weighted by
    85**4 .. 1 and summed; no lane carries into the next (85**5 < 2**40)."""
    digits = text.translate(_DIGITS)
    if len(text) % 5 or b"\xff" in digits:
        raise BinaryError("bad base85 data")
    groups = len(text) // 5
    total = 0
    for position in range(5):
        lanes = bytearray(5 * groups)
        lanes[4::5] = digits[position::5]
        total += int.from_bytes(lanes, "big") * 85 ** (4 - position)
    raw = total.to_bytes(5 * groups, "big")
    if raw[0::5].strip(b"\0"):
        raise BinaryError("bad base85 data (a group above 2**32)")
    out = bytearray(4 * groups)
    for byte in range(4):
        out[byte::4] = raw[byte + 1::5]
    return bytes(out)


def inflate(body: bytes, size: int) -> bytes:
    """The inflated contents of one binary hunk BODY, which must be SIZE bytes (its header says so)."""
    if size > MAX_INFLATED:
        raise BinaryError(f"binary hunk of {size} bytes, more than the {MAX_INFLATED} ernie-patch takes")
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(decode85(body), size + 1)
    except zlib.error as exc:
        raise BinaryError(f"binary hunk does not inflate ({exc})") from None
    if len(data) != size or not inflater.eof:
        raise BinaryError(f"binary hunk inflates to {'more than ' if len(data) > size else ''}{len(data)} bytes, "
                          f"its header says {size}")
    return data


def _varint(delta: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(delta):
            raise BinaryError("delta ends inside its header")
        byte = delta[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def apply_delta(source: bytes, delta: bytes) -> bytes:
    """SOURCE with git's DELTA applied (patch-delta.c): a header of both sizes, then copy/insert ops."""
    expected, at = _varint(delta, 0)
    if expected != len(source):
        raise BinaryError(f"delta is for a file of {expected} bytes, this one has {len(source)}")
    size, at = _varint(delta, at)
    if size > MAX_INFLATED:
        raise BinaryError(f"delta makes {size} bytes, more than ernie-patch takes")
    out: list[bytes] = []
    while at < len(delta):
        command = delta[at]
        at += 1
        if command & 0x80:
            offset = length = 0
            for bit, shift in ((0x01, 0), (0x02, 8), (0x04, 16), (0x08, 24)):
                if command & bit:
                    offset |= delta[at] << shift if at < len(delta) else _short()
                    at += 1
            for bit, shift in ((0x10, 0), (0x20, 8), (0x40, 16)):
                if command & bit:
                    length |= delta[at] << shift if at < len(delta) else _short()
                    at += 1
            length = length or 0x10000
            if offset + length > len(source):
                raise BinaryError("delta copies beyond the end of the file")
            out.append(source[offset:offset + length])
        elif command:
            if at + command > len(delta):
                raise BinaryError("delta ends inside inserted data")
            out.append(delta[at:at + command])
            at += command
        else:
            raise BinaryError("delta has a reserved zero command")
    result = b"".join(out)
    if len(result) != size:
        raise BinaryError(f"delta makes {len(result)} bytes, its header says {size}")
    return result


def _short() -> int:
    raise BinaryError("delta ends inside a copy command")


def object_id(data: bytes | None, length: int) -> str:
    """git's id of DATA as a blob (sha1, or sha256 for LENGTH 64); all zeros for no file."""
    if data is None:
        return "0" * length
    algorithm = hashlib.sha256 if length == 64 else hashlib.sha1
    digest = algorithm(b"blob %d\x00" % len(data))
    digest.update(data)
    return digest.hexdigest()
