"""Errors a person can act on. The CLI prints them as one line and exits non-zero."""


class PTIError(Exception):
    """Base class for every error `pti` reports to the user (no traceback unless --debug)."""

    exit_code = 1


class CheckpointError(PTIError):
    """A generator checkpoint is missing, unreadable, hostile or unsupported."""


class ImageError(PTIError):
    """A photo is missing, not an image, truncated or too large."""


class FaceNotFoundError(PTIError):
    """No face was detected where one was needed."""


class WeightsError(PTIError):
    """A file from the weights registry is missing, corrupt or cannot be fetched."""


class IdentityError(PTIError):
    """A .pti identity file is unreadable or belongs to another base generator."""
