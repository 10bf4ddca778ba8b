"""The one error type users see: a message that says what is wrong and what to do."""


class ToolkitError(Exception):
    """An error whose message is meant for the user, shown without a traceback."""


class SettingsError(ToolkitError):
    """A setting is missing or malformed; the message names the setting."""
