"""Errors that end a command with one line addressed to the user.

Anything raised as :class:`NeuralheadError` (or a subclass) is caught by the CLI
and printed as ``error: <message>`` without a traceback: the message must name
the problem and, where it can, the fix.
"""


class NeuralheadError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class InputError(NeuralheadError):
    """A file or argument the user gave cannot be used."""


class NoFaceError(InputError):
    """A face was required but not found."""


class WeightsMissingError(NeuralheadError):
    """A pretrained network's weight file is not present."""
