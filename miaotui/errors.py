"""User-facing errors. Every mistake a user can make raises a subclass of MiaotuiError whose
message names the offending value and what would be accepted."""


class MiaotuiError(Exception):
    """Base class of every error miaotui raises for bad input or a bad model file."""


class ModelNotFoundError(MiaotuiError):
    """The model name or path does not resolve to a file or directory."""


class ModelFormatError(MiaotuiError):
    """The file exists but is not a valid model file (not GGUF, truncated, inconsistent)."""


class UnsupportedModelError(MiaotuiError):
    """A valid model file that uses an architecture or tensor type miaotui does not support."""


class InvalidRequestError(MiaotuiError):
    """A request that cannot be served: empty prompt, too long for the context, bad parameter."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class CapacityError(MiaotuiError):
    """The engine is at capacity (queue full); retry later."""


class DistributedError(MiaotuiError):
    """Ranks could not meet or a rank died."""
