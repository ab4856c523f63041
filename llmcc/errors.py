"""User-facing errors.

Every problem a user can cause (a bad file, flag, input or artifact) is raised as an ``LlmccError`` whose message is
one line naming the thing at fault. The CLI prints it and exits with status 2; nothing deeper than this module's
message reaches the user.
"""


class LlmccError(Exception):
    """A problem with what the user gave llmcc; the message names the culprit."""

    exit_code = 2


class ImportFailure(LlmccError):
    """An ONNX graph (or a torch module traced to one) that llmcc cannot import."""


class LoraError(LlmccError):
    """A LoRA adapter that cannot be read, or that does not fit the model's weights."""


class BuildFailure(LlmccError):
    """The compiler could not build a module for the target."""


class ArtifactError(LlmccError):
    """A missing, truncated or mismatched artifact."""


class InputError(LlmccError):
    """Run-time inputs that do not fit the compiled module's signature."""


class VerificationFailure(LlmccError):
    """The compiled module disagrees with the reference beyond tolerance."""


class DeviceUnavailable(LlmccError):
    """The artifact's device (a GPU) is not present on this machine."""
