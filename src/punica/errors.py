"""The exceptions a user can cause. Each message names the cause and, where there is one, the fix."""


class PunicaError(Exception):
    """Base of every error the package raises on purpose."""


class ConfigError(PunicaError, ValueError):
    """A configuration value is out of range or inconsistent."""


class ModelLoadError(PunicaError):
    """The base model directory is missing, incomplete or of an unsupported architecture."""


class UnknownModelError(PunicaError, KeyError):
    """A request names a model or adapter the server does not know."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class AdapterError(PunicaError):
    """A LoRA adapter is missing files, malformed, or uses an option Punica does not support."""


class BadRequestError(PunicaError, ValueError):
    """A request is malformed: bad sampling parameters, empty or too long prompt, ..."""


class CapacityError(PunicaError):
    """The engine cannot take the request now (queue full) or ever (needs more KV than exists)."""
