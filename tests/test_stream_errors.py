"""Which failures the stream loop rides out (reconnect from the checkpoint) and which stop it."""

from __future__ import annotations

from pymongo.errors import AutoReconnect, OperationFailure

from replicator.stream import _transient


def test_connection_errors_are_transient_even_from_concurrent_lanes() -> None:
    lost = AutoReconnect("127.0.0.1:1: connection closed")
    assert _transient(lost)
    assert _transient(ExceptionGroup("lanes", [lost, AutoReconnect("again")]))
    assert _transient(ExceptionGroup("outer", [ExceptionGroup("inner", [lost])]))


def test_labelled_server_errors_are_transient() -> None:
    stepdown = OperationFailure("not primary", code=10107)
    stepdown._add_error_label("RetryableWriteError")
    assert _transient(stepdown)


def test_real_failures_are_not() -> None:
    assert not _transient(OperationFailure("bad query", code=2))
    assert not _transient(ValueError("a bug"))
    assert not _transient(ExceptionGroup("lanes", [AutoReconnect("x"), ValueError("a bug")]))
