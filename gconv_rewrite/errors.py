"""Errors the tool reports to users as one line (exit code 2), never as a traceback."""


class GconvError(Exception):
    """A problem with the user's input or environment; its message is shown as is."""

    exit_code = 2


class VerificationError(GconvError):
    """The rewritten model failed numeric parity with the original."""

    exit_code = 1
