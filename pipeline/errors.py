"""The one exception type for user mistakes: the CLI prints its message on one line, no traceback."""


class ClaspError(Exception):
    """Wrong input, configuration or environment; the message names the file/key and the fix."""
