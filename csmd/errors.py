"""The one exception type for problems the user can fix.

`csmd`'s commands show a `UserError` as one line (`csmd: error: ...`) and exit with status 2; anything else
that escapes a command is a bug, shown with its traceback (status 1). Raise it where the cause is known to
lie outside csmd: a flag's value, a missing or unreadable file, the HF hub out of reach, a sound device.
The message says what is wrong and, where it can, what to do about it.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem outside csmd that the user can fix; the message is one line saying what and how."""
