"""Page tokens and request validation: pure, no I/O."""

from __future__ import annotations

import pytest

from core import validation
from core.errors import InvalidArgument
from core.pagetokens import PageTokens


def test_token_round_trips_for_the_same_filters() -> None:
    tokens = PageTokens("s3cret")
    token = tokens.encode("p0000042", "c1", "")
    assert "p0000042" not in token, "opaque"
    assert tokens.decode(token, "c1", "") == "p0000042"
    assert tokens.encode("", "c1", "") == "", "no next page, no token"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t[:-1],
        lambda t: t[:-2] + ("A" if t[-2] != "A" else "B") + t[-1],
        lambda t: "x" + t,
        lambda t: t + "==",
        lambda t: "!!!",
        lambda t: "A" * 40,
    ],
)
def test_modified_token_is_invalid_argument(mutate: object) -> None:
    tokens = PageTokens("s3cret")
    token = tokens.encode("p0000042", "", "")
    with pytest.raises(InvalidArgument):
        tokens.decode(mutate(token), "", "")  # type: ignore[operator]


def test_every_one_character_change_of_a_token_is_rejected() -> None:
    """Including the last character, whose unused low bits base64 decoders ignore."""
    tokens = PageTokens("s3cret")
    token = tokens.encode("p0000042", "", "")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for n, original in enumerate(token):
        for replacement in alphabet.replace(original, ""):
            with pytest.raises(InvalidArgument):
                tokens.decode(token[:n] + replacement + token[n + 1 :], "", "")


def test_token_from_other_filters_or_secret_is_rejected() -> None:
    token = PageTokens("s3cret").encode("p0000042", "c1", "")
    with pytest.raises(InvalidArgument):
        PageTokens("s3cret").decode(token, "c2", "")
    with pytest.raises(InvalidArgument):
        PageTokens("s3cret").decode(token, "c1", "b1")
    with pytest.raises(InvalidArgument):
        PageTokens("other").decode(token, "c1", "")


@pytest.mark.parametrize("bad", ["", "x" * 65, "a:b", "a*", "{a}", "a b", "a\x00", "é", "a/b"])
def test_malformed_ids_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        validation.check_id(bad)


@pytest.mark.parametrize("good", ["p0000001", "a", "A-b_9", "x" * 64])
def test_wellformed_ids_pass(good: str) -> None:
    assert validation.check_id(good) == good


@pytest.mark.parametrize(("asked", "got"), [(0, 20), (1, 1), (100, 100), (101, 100), (10**9, 100)])
def test_page_size_default_and_clamp(asked: int, got: int) -> None:
    assert validation.page_size(asked) == got


def test_negative_page_size_is_invalid() -> None:
    with pytest.raises(InvalidArgument):
        validation.page_size(-1)


def test_batch_limits() -> None:
    with pytest.raises(InvalidArgument):
        validation.batch_ids([])
    with pytest.raises(InvalidArgument):
        validation.batch_ids(["p1"] * 101)
    with pytest.raises(InvalidArgument, match=r"ids\[1\]"):
        validation.batch_ids(["p1", "bad id"])
    assert validation.batch_ids(["p1", "p1"]) == ["p1", "p1"]
