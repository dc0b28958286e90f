"""What can go wrong with a PDS call, as a small class hierarchy: one `except` per decision.

`classify` turns an XRPC answer (status, error name, message, Retry-After) into exactly one of
these, so callers decide by type:

- `AccountGone`: the account or repo was deleted (final): deletes count as done.
- `AccountUnavailable`: deactivated, taken down, suspended (reversible): park every write of
  that user, deletes included, until the account is back.
- `RateLimited`: 429: wait it out in place, or park the user when it is long.
- `InvalidSwap`: someone else wrote the record: re-read it and re-plan.
- `AuthFailed`: the account's password is refused: park the user.
- `TokenRejected`: the access token expired or was revoked: refresh the session once.
- `Transient`: no answer, 5xx: retry with backoff, then park the user.
- `Rejected`: the PDS refused this write for good (4xx): park the mood.

Messages never include request bodies or headers: they carry passwords and tokens.

Apart from those, what an operator has to fix rather than a bug, raised where the setting is
read or the server first contacted, and printed by the CLI as one line (commands/errors.py):

- `ConfigError`: a setting is missing or malformed (a URL without a scheme or a host): a usage
  error, exit 2, before anything is contacted.
- `Unavailable`: a server cannot be used as configured: unreachable, unknown host, credentials
  or privileges refused: the command's error exit code.

Their messages name what failed and what to check, and never hold a secret.
"""

from __future__ import annotations

# A rate limit that resets sooner than this is waited out in place; a longer one (an account's
# hourly or daily write budget) parks that account's work so the other accounts keep flowing.
MAX_INLINE_WAIT = 30.0

_GONE = frozenset({"RepoNotFound", "AccountNotFound"})
_UNAVAILABLE = {
    "AccountDeactivated": "deactivated",
    "RepoDeactivated": "deactivated",
    "AccountTakedown": "takendown",
    "RepoTakendown": "takendown",
    "RepoSuspended": "suspended",
    "AccountSuspended": "suspended",
}
_TOKEN = frozenset({"ExpiredToken", "InvalidToken"})


class OperatorError(Exception):
    """A problem of the deployment, not of the code: reported as its message alone."""


class ConfigError(OperatorError):
    """A setting is missing or malformed: nothing was contacted (exit 2, a usage error)."""


class Unavailable(OperatorError):
    """A server (MongoDB, the PDS) cannot be used as configured: retrying will not help
    until someone checks what the message names."""


class PdsError(Exception):
    """A PDS call failed. `status` 0 means no HTTP answer (refused, reset, timed out)."""

    def __init__(
        self,
        nsid: str,
        status: int,
        error: str | None = None,
        message: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.nsid = nsid
        self.status = status
        self.error = error
        self.message = message
        self.retry_after = retry_after
        what = f"HTTP {status}" if status else "no answer"
        detail = f" {error}" if error else ""
        text = f": {message}" if message else ""
        super().__init__(f"{nsid}: {what}{detail}{text}")


class AccountGone(PdsError):
    """The account no longer exists on this PDS: nothing of it can be written or deleted."""


class AccountUnavailable(PdsError):
    """Deactivated, taken down or suspended: reversible, so nothing counts as done."""

    @property
    def reason(self) -> str:
        return f"account {_UNAVAILABLE.get(self.error or '', 'unavailable')} on the PDS"


class RateLimited(PdsError):
    """429. `retry_after`: seconds until the window resets, when the server said."""

    @property
    def long(self) -> bool:
        """Longer than is worth waiting in place: the account's budget is spent."""
        return (self.retry_after or 0.0) > MAX_INLINE_WAIT


class InvalidSwap(PdsError):
    """`swapRecord` did not match: the record is not what the ledger says."""


class AuthFailed(PdsError):
    """The account's password was refused: its work is parked, others flow."""


class TokenRejected(PdsError):
    """The access (or refresh) token is expired or revoked: renew the session."""


class Transient(PdsError):
    """No answer or a server error: worth retrying."""


class Rejected(PdsError):
    """The PDS refused the request itself (a 4xx that none of the above explains)."""


def classify(
    nsid: str,
    status: int,
    error: str | None = None,
    message: str | None = None,
    retry_after: float | None = None,
) -> PdsError:
    """The one place that decides what an answer means. Account states come first: a
    deactivated account answers 401, which would otherwise read as a token problem."""
    kind: type[PdsError]
    if error in _GONE or (message is not None and "Could not find repo" in message):
        kind = AccountGone
    elif error in _UNAVAILABLE:
        kind = AccountUnavailable
    elif status == 429:
        kind = RateLimited
    elif error == "InvalidSwap":
        kind = InvalidSwap
    elif error in _TOKEN or status == 401:
        kind = TokenRejected
    elif status == 0 or status >= 500:
        kind = Transient
    else:
        kind = Rejected
    return kind(nsid, status, error, message, retry_after)
