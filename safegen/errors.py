"""The base class of safegen's errors about the user's input, and the kinds every module shares.

Every error that a user's file, option, argument, policy, model folder or configuration can cause
derives from SafegenError, so a caller (the CLI, a benchmark, a notebook) catches them all at once
and prints the message, which names the file, line, key or argument at fault. SafegenError is a
ValueError; LoadError is also a RuntimeError, as it was before this base existed, and
ArgumentTypeError a TypeError, as Python's own error for a keyword a function does not take.

Errors that only a bug can cause (a custom reward or scorer that returns the wrong shape) stay
plain ValueError / RuntimeError: no input of the user's can fix them.
"""


class SafegenError(ValueError):
    """Bad input or configuration: the message says what and where."""


class ArgumentError(SafegenError):
    """An argument of a call has a value safegen cannot use; the message names the argument."""


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument of the wrong kind, or a keyword the call does not take."""


class LoadError(SafegenError, RuntimeError):
    """The model or tokenizer cannot be loaded; the message says why and what to do."""
