"""The project's one error type.

Everything a user can fix (bad config, bad input file, inconsistent checkpoint)
raises `PipelineError` with a message that says what is wrong and what to do.
CLIs catch it, print the message, and exit with status 2; anything else is a bug.
"""


class PipelineError(Exception):
    """A problem the user can act on; the message names the file/key and the fix."""
