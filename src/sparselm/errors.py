"""The one exception type that reaches users as a single clear line."""


class SparselmError(Exception):
    """A problem with the user's input or environment. The message names the problem and the fix."""
