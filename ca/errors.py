"""The two kinds of failure an admin sees, each with its exit code (contract: 1 refused/invalid, 2 input)."""

from __future__ import annotations


class CaError(Exception):
    """A failure to report as one line, ``ca: <message>``, and exit with ``exit_code``.

    ``code`` is a short machine-readable reason, for the JSON errors of ``ca serve``.
    """

    exit_code = 1
    default_code = "refused"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        self.code = code or self.default_code


class Refused(CaError):
    """The request is well-formed but the CA will not do it (a CA already exists, TTL outlives the CA, ...)."""

    exit_code = 1


class InputError(CaError):
    """Bad input: usage, a missing or damaged file, a wrong passphrase, an invalid ID or duration."""

    exit_code = 2
    default_code = "bad_request"
