"""Shamir over GF(256): any M of N rebuild the secret, M-1 say nothing, damage is caught."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phivault.crypto._hazmat.keys import SecretKey
from phivault.crypto._hazmat.shamir import Share, combine, gf_mul, interpolate_at, split
from phivault.crypto.errors import InvalidShares
from phivault.crypto.providers.sealed import SealedLocalProvider

secrets_ = st.binary(min_size=32, max_size=32).filter(any)


@st.composite
def splits(draw: st.DrawFn) -> tuple[bytes, int, int, list[Share]]:
    n = draw(st.integers(min_value=1, max_value=10))
    m = draw(st.integers(min_value=1, max_value=n))
    secret = draw(secrets_)
    return secret, m, n, split(SecretKey(secret), threshold=m, shares=n)


def test_field_axioms_on_all_pairs() -> None:
    for a in range(256):
        assert gf_mul(a, 1) == a and gf_mul(a, 0) == 0
    for a, b in itertools.product(range(0, 256, 7), range(256)):
        assert gf_mul(a, b) == gf_mul(b, a)
    # every non-zero element has an inverse
    for a in range(1, 256):
        assert any(gf_mul(a, b) == 1 for b in range(1, 256))


@settings(max_examples=60, deadline=None)
@given(splits(), st.randoms(use_true_random=False))
def test_any_m_of_n_rebuild_the_secret(
    case: tuple[bytes, int, int, list[Share]], rnd: random.Random
) -> None:
    secret, m, _n, shares = case
    chosen = rnd.sample(shares, m)
    assert combine(chosen).reveal() == secret
    assert combine(shares).reveal() == secret  # more than M is fine too


@settings(max_examples=40, deadline=None)
@given(splits(), st.randoms(use_true_random=False))
def test_m_minus_one_shares_are_refused(
    case: tuple[bytes, int, int, list[Share]], rnd: random.Random
) -> None:
    _secret, m, _n, shares = case
    if m == 1:
        return
    with pytest.raises(InvalidShares, match="needed"):
        combine(rnd.sample(shares, m - 1))


@settings(max_examples=40, deadline=None)
@given(splits(), secrets_, st.randoms(use_true_random=False))
def test_m_minus_one_shares_are_consistent_with_every_secret(
    case: tuple[bytes, int, int, list[Share]], other: bytes, rnd: random.Random
) -> None:
    """Information-theoretic secrecy: for any other secret there is a full set of shares that
    agrees with the M-1 an attacker holds and rebuilds that other secret."""
    _secret, m, n, shares = case
    if m == 1 or n == m - 1:
        return
    held = rnd.sample(shares, m - 1)
    points = [(s.x, s.y) for s in held] + [(0, other)]
    missing_x = next(x for x in range(1, 256) if x not in {s.x for s in held})
    forged = Share(held[0].set_id, m, missing_x, interpolate_at(points, missing_x))
    assert combine([*held, forged]).reveal() == other


def test_share_text_round_trips_and_checksum_catches_typos() -> None:
    shares = split(SecretKey(bytes(range(1, 33))), threshold=2, shares=3)
    text = shares[0].encode()
    assert Share.parse(text) == shares[0]
    assert "y=" not in repr(shares[0]) and shares[0].y.hex() not in repr(shares[0])
    y_start = text.index("-", text.index("-", text.index("-", 5) + 1) + 1) + 1
    typo = text[:y_start] + ("0" if text[y_start] != "0" else "1") + text[y_start + 1 :]
    with pytest.raises(InvalidShares, match="checksum"):
        Share.parse(typo)
    with pytest.raises(InvalidShares, match="not a phivault share"):
        Share.parse("hello")


def test_mixed_or_duplicate_shares_are_refused() -> None:
    a = split(SecretKey(bytes(range(1, 33))), threshold=2, shares=3)
    b = split(SecretKey(bytes(range(2, 34))), threshold=2, shares=3)
    with pytest.raises(InvalidShares, match="different splits"):
        combine([a[0], b[1]])
    with pytest.raises(InvalidShares, match="twice"):
        combine([a[0], a[0]])


def test_keystore_names_a_corrupted_share_even_with_a_recomputed_checksum(tmp_path: Path) -> None:
    provider, texts = SealedLocalProvider.initialize(tmp_path, threshold=3, shares=5)
    good = [Share.parse(t) for t in texts]
    altered = Share(good[1].set_id, 3, good[1].x, bytes([good[1].y[0] ^ 0x40]) + good[1].y[1:])
    with pytest.raises(InvalidShares, match=r"share #2 \(index 2\) does not match its commitment"):
        provider.unseal([texts[0], altered.encode(), texts[2]])
    assert provider.sealed
    other, other_texts = SealedLocalProvider.initialize(tmp_path / "other", threshold=3, shares=5)
    with pytest.raises(InvalidShares, match="another keystore"):
        provider.unseal([texts[0], other_texts[1], texts[2]])
    with pytest.raises(InvalidShares, match="3 of 5 are needed"):
        provider.unseal(texts[:2])
    for subset in itertools.combinations(texts, 3):
        provider.unseal(list(subset))
        assert not provider.sealed
        provider.seal()
    assert "pvs1" not in repr(provider) and repr(other)
