"""The one exception type that reaches the user as a single line."""


class NmtError(Exception):
    """A problem the user can fix: the message names what, where and what to do.

    The CLI prints ``nmt: error: <message>`` and exits with status 1; it never shows a
    traceback for this type.
    """
