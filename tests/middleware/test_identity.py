"""middleware/identity.py: every header value is hostile input, validated and replaced or
dropped, never reflected as is."""

from __future__ import annotations

from tracewire.middleware import identity


def test_an_incoming_request_id_is_kept_only_when_safe() -> None:
    assert identity.request_id(b"req-1.2:3_x") == "req-1.2:3_x"
    for hostile in (
        b"",
        b"-starts-with-dash",
        b"has space",
        b"new\nline",
        b"\xff\xfe",
        b"x" * 1000,
        b'quote"d',
    ):
        assert identity.request_id(hostile) is None, hostile  # the caller makes a fresh one


def test_traceparent_accepts_only_wellformed_w3c_values() -> None:
    good = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert identity.traceparent(good) == (0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7)
    assert (
        identity.traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x")
        is not None
    )  # a later version may append fields
    for bad in (
        good.upper(),
        good[:-1],
        good + b"x",
        b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        None,
    ):
        assert identity.traceparent(bad) is None, bad


def test_header_text_drops_what_a_store_or_a_log_could_misread() -> None:
    assert identity.header_text(b"alice@example.com", 64) == "alice@example.com"
    for bad in (b"", b"x" * 65, b"tab\there", b"\xc3\xa9t\xc3\xa9", b"bell\x07", None):
        assert identity.header_text(bad, 64) is None, bad


def test_a_session_cookie_becomes_a_keyed_hash_never_the_cookie() -> None:
    header = b'theme=dark; session="s3cr3t-cookie-value"; other=1'
    value = identity.cookie(header, "session")
    assert value == b"s3cr3t-cookie-value"
    assert identity.cookie(header, "missing") is None and identity.cookie(None, "x") is None
    first = identity.cookie_session(value, b"key-1")
    assert (
        first
        == identity.cookie_session(value, b"key-1")
        != identity.cookie_session(value, b"key-2")
    )
    assert first is not None and b"s3cr3t" not in first.encode() and len(first) == 32
    assert identity.cookie_session(b"x" * 5000, b"key-1") is None
