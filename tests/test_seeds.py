"""Seed derivation: stable values, the documented hash, and the batched form equal to the single one."""

from __future__ import annotations

import hashlib

import pytest

from bench.seeds import STREAMS, SeedBundle


def test_seed_is_sha256_of_the_stream_name() -> None:
    text = b"trickbench/3/data/17/1"
    expected = int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
    assert SeedBundle(3).seed_for("data", 17, 1) == expected


def test_seeds_for_equals_seed_for_per_step() -> None:
    bundle = SeedBundle(5)
    assert bundle.seeds_for("global", 40, 60) == [bundle.seed_for("global", i) for i in range(40, 60)]
    assert len(set(bundle.seeds_for("global", 0, 1000))) == 1000


def test_streams_differ_by_purpose_seed_and_index() -> None:
    a = SeedBundle(0)
    values = {a.seed_for(p, 0) for p in STREAMS} | {SeedBundle(1).seed_for("data", 0), a.seed_for("data", 1)}
    assert len(values) == len(STREAMS) + 2


def test_unknown_stream_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown random stream 'dta'"):
        SeedBundle(0).seeds_for("dta", 0, 2)
