from coreml_sd.runtime.errors import UserError


class ConversionError(UserError):
    """A problem with the model, the options or the output folder that the user can fix."""
