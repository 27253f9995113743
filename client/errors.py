"""What can go wrong for a client, each with its own process exit code.

Expected failures (a server that is down, a deadline, a bad model name, an unreadable image)
are reported as one line on stderr and one of these exit codes, never as a traceback.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit codes of ``client/grpc_client.py`` (also listed in its ``--help``)."""

    OK = 0
    USAGE = 2  # bad command line (argparse's own code)
    IMAGE = 3  # an image file is missing, unreadable or not an image
    UNREACHABLE = 4  # no connection to the server (down, wrong port, TLS mismatch)
    DEADLINE = 5  # no answer within --timeout-s
    NOT_FOUND = 6  # unknown model, version, label or signature
    INVALID_ARGUMENT = 7  # the server refused the request as malformed
    SERVER_ERROR = 8  # any other status: overloaded, unavailable, internal, ...


class ClientError(Exception):
    """A failure to report as one line on stderr; ``exit_code`` says which kind."""

    exit_code: ExitCode = ExitCode.SERVER_ERROR

    def __init__(self, message: str, exit_code: ExitCode | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ImageFileError(ClientError):
    exit_code = ExitCode.IMAGE


class UnreachableError(ClientError):
    exit_code = ExitCode.UNREACHABLE


class DeadlineError(ClientError):
    exit_code = ExitCode.DEADLINE


# gRPC status code name -> exit code; the REST transport maps HTTP statuses onto the same names.
_BY_STATUS = {
    "NOT_FOUND": ExitCode.NOT_FOUND,
    "INVALID_ARGUMENT": ExitCode.INVALID_ARGUMENT,
    "DEADLINE_EXCEEDED": ExitCode.DEADLINE,
}


def one_line(text: object, max_chars: int | None = None) -> str:
    """``text`` as one printable line (server text can hold anything), cut at ``max_chars``."""
    printable = "".join(c if c.isprintable() else "?" for c in " ".join(str(text or "").split()))
    return printable if max_chars is None else printable[:max_chars]


def status_error(code_name: str, details: str) -> ClientError:
    """The ClientError for a status the server answered with (``code_name`` like ``NOT_FOUND``)."""
    details = one_line(details) or "(no details)"
    return ClientError(
        f"server answered {code_name}: {details}", _BY_STATUS.get(code_name, ExitCode.SERVER_ERROR)
    )
