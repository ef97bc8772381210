"""One exception type for everything a user can get wrong.

The CLI prints ``UserError`` as a single line (no traceback) and exits non-zero. Anything else that escapes
is a bug in magicstudio and is shown with its traceback.
"""


class UserError(Exception):
    """Bad input, a missing file or model, an impossible setting: explained in one line."""
