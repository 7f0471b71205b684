"""The error type for what the user set wrong, as opposed to a fault of csmd.

A `UsageError` is a bad command-line flag, setting or environment variable. Its message is one line that names
what the user set and what is allowed; the CLI prints it as `csmd: error: ...` and exits with status 2, without
a traceback. It is a ValueError, so code that catches bad values keeps catching it.
"""


class UsageError(ValueError):
    """A user's setting is wrong; the message names it and what it allows."""
