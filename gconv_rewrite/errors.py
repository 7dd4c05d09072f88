"""The errors the tool reports, by whose fault they are.

GconvError: the user's input or environment (one line, exit 2). VerificationError: the rewrite
failed parity (exit 1). InternalError: the tool itself went wrong (a bug: exit 3, with the
version and how to report it); any other exception reaching the CLI is treated the same way.
"""


class GconvError(Exception):
    """A problem with the user's input or environment; its message is shown as is."""

    exit_code = 2


class VerificationError(GconvError):
    """The rewritten model failed numeric parity with the original."""

    exit_code = 1


class InternalError(Exception):
    """The tool produced something wrong (e.g. a rewritten model onnxruntime cannot load): a bug, not bad input."""

    exit_code = 3
