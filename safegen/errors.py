"""The one base class of safegen's errors about the user's input.

Every error that a user's file, option, policy, model folder or configuration can cause derives
from SafegenError, so a caller (the CLI, a benchmark, a notebook) catches them all at once and
prints the message, which names the file, line, key or argument at fault. SafegenError is a
ValueError; LoadError is also a RuntimeError, as it was before this base existed.
"""


class SafegenError(ValueError):
    """Bad input or configuration: the message says what and where."""
