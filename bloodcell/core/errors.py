"""The one exception type that entry points turn into a single-line message and a non-zero exit."""


class UserError(Exception):
    """A problem the user can fix (bad path, bad data, unknown name).

    The message is one line that names the problem and the fix; entry points print it as
    ``error: <message>`` and exit with status 2, without a traceback.
    """
