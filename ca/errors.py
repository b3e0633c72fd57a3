"""The two kinds of failure an admin sees, each with its exit code (contract: 1 refused/invalid, 2 input)."""

from __future__ import annotations


class CaError(Exception):
    """A failure to report as one line, ``ca: <message>``, and exit with ``exit_code``."""

    exit_code = 1


class Refused(CaError):
    """The request is well-formed but the CA will not do it (a CA already exists, TTL outlives the CA, ...)."""

    exit_code = 1


class InputError(CaError):
    """Bad input: usage, a missing or damaged file, a wrong passphrase, an invalid ID or duration."""

    exit_code = 2
