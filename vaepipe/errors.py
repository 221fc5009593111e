"""The one error type of vaepipe. Library code raises it; only the CLI turns it into an exit code."""


class VaepipeError(Exception):
    """Something failed while running (exit code 1)."""

    exit_code = 1


class BadInput(VaepipeError):
    """The input or the options are wrong; the message names the problem and the fix (exit code 2)."""

    exit_code = 2
