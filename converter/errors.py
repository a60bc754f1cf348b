"""The one error family of the converter: messages written for the person running it."""


class ConversionError(Exception):
    """A user-facing problem with the inputs or options; the message says what and where."""
