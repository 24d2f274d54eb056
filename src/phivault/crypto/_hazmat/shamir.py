"""Shamir secret sharing over GF(2^8), byte by byte, with checksummed, committed shares.

Why our own: no maintained, typed Python library fits (see
``docs/decisions/crypto-shamir-gf256.md``); the math is forty lines. The field is GF(2^8) with
the AES polynomial x^8 + x^4 + x^3 + x + 1, so each byte of the secret is shared with its own
random polynomial of degree M-1 and shares are exactly as long as the secret.

A share's text form is ``pvs1-<set>-<M>-<x>-<y hex>-<check>`` where ``check`` is the first
4 bytes of SHA-256 over the rest (catches typos before any math). Each share also has a
*commitment* (SHA-256 of set, x and y) that the keystore records at split time: a share that
was altered, even with a recomputed check, is named precisely at unseal time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from phivault.crypto._hazmat.keys import KEY_BYTES, SecretKey
from phivault.crypto.errors import InvalidShares

__all__ = ["MAX_SHARES", "Share", "combine", "gf_mul", "interpolate_at", "split"]

MAX_SHARES = 255


def _tables() -> tuple[list[int], list[int]]:
    exp = [0] * 512
    log = [0] * 256
    value = 1
    for power in range(255):
        exp[power] = value
        log[value] = power
        # multiply by the generator 3 = x + 1
        doubled = value << 1
        if doubled & 0x100:
            doubled ^= 0x11B
        value = doubled ^ value
    for power in range(255, 512):
        exp[power] = exp[power - 255]
    return exp, log


_EXP, _LOG = _tables()


def gf_mul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


def _gf_inv(a: int) -> int:
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(256)")
    return _EXP[255 - _LOG[a]]


# _MUL_ROWS[c] maps every byte b to c*b: multiplying a whole vector is one bytes.translate.
_MUL_ROWS = [bytes(gf_mul(c, b) for b in range(256)) for c in range(256)]


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


_SHARE_RE = re.compile(
    r"^pvs1-(?P<set>[0-9a-f]{8})-(?P<m>[0-9]{1,3})-(?P<x>[0-9]{1,3})-"
    r"(?P<y>[0-9a-f]{64})-(?P<check>[0-9a-f]{8})$"
)


@dataclass(frozen=True)
class Share:
    """One share of a split secret. Its repr shows where it belongs, never its value."""

    set_id: str
    threshold: int
    x: int
    y: bytes = field(repr=False)

    def _body(self) -> str:
        return f"pvs1-{self.set_id}-{self.threshold}-{self.x}-{self.y.hex()}"

    def encode(self) -> str:
        body = self._body()
        return f"{body}-{hashlib.sha256(body.encode()).hexdigest()[:8]}"

    def commitment(self) -> str:
        material = f"phivault.share.v1|{self.set_id}|{self.x}|".encode() + self.y
        return hashlib.sha256(material).hexdigest()

    @classmethod
    def parse(cls, text: str, *, position: int | None = None) -> Share:
        where = "share" if position is None else f"share #{position}"
        match = _SHARE_RE.match(text.strip())
        if match is None:
            raise InvalidShares(f"{where} is not a phivault share (expected pvs1-...)")
        body, check = text.strip().rsplit("-", 1)
        if not hmac.compare_digest(hashlib.sha256(body.encode()).hexdigest()[:8], check):
            raise InvalidShares(f"{where} has a bad checksum (mistyped or corrupted)")
        x, m = int(match["x"]), int(match["m"])
        if not 1 <= x <= MAX_SHARES or not 1 <= m <= MAX_SHARES:
            raise InvalidShares(f"{where} has an out-of-range index")
        return cls(set_id=match["set"], threshold=m, x=x, y=bytes.fromhex(match["y"]))


def split(secret: SecretKey, *, threshold: int, shares: int) -> list[Share]:
    """Split ``secret`` into ``shares`` shares, any ``threshold`` of which recover it."""
    if not 1 <= threshold <= shares <= MAX_SHARES:
        raise ValueError("need 1 <= threshold <= shares <= 255")
    set_id = secrets.token_hex(4)
    coefficients = [secret.reveal()] + [
        secrets.token_bytes(KEY_BYTES) for _ in range(threshold - 1)
    ]
    result = []
    for x in range(1, shares + 1):
        row = _MUL_ROWS[x]
        y = coefficients[-1]
        for coefficient in reversed(coefficients[:-1]):  # Horner
            y = _xor(y.translate(row), coefficient)
        result.append(Share(set_id=set_id, threshold=threshold, x=x, y=y))
    return result


def interpolate_at(points: Sequence[tuple[int, bytes]], at: int) -> bytes:
    """Evaluate, at ``at``, the unique polynomial through ``points`` (distinct x's)."""
    xs = [x for x, _ in points]
    if len(set(xs)) != len(xs):
        raise InvalidShares("two shares have the same index")
    length = len(points[0][1])
    accumulator = bytes(length)
    for i, (x_i, y_i) in enumerate(points):
        numerator, denominator = 1, 1
        for j, x_j in enumerate(xs):
            if i != j:
                numerator = gf_mul(numerator, at ^ x_j)
                denominator = gf_mul(denominator, x_i ^ x_j)
        basis = gf_mul(numerator, _gf_inv(denominator))
        accumulator = _xor(accumulator, y_i.translate(_MUL_ROWS[basis]))
    return accumulator


def combine(shares: Sequence[Share]) -> SecretKey:
    """Recover the secret from at least ``threshold`` shares of one set.

    Raises :class:`InvalidShares` for too few shares, mixed sets or duplicates. A wrong but
    well-formed share yields a wrong secret: the caller checks the result against its
    commitments and check value.
    """
    if not shares:
        raise InvalidShares("no shares given")
    set_ids = {share.set_id for share in shares}
    if len(set_ids) != 1:
        raise InvalidShares("the shares come from different splits")
    threshold = shares[0].threshold
    if any(share.threshold != threshold for share in shares):
        raise InvalidShares("the shares disagree on the threshold")
    if len({share.x for share in shares}) != len(shares):
        raise InvalidShares("the same share was given twice")
    if len(shares) < threshold:
        raise InvalidShares(f"{len(shares)} share(s) given; {threshold} are needed")
    points = [(share.x, share.y) for share in shares[:threshold]]
    return SecretKey(interpolate_at(points, 0), label="root")
