"""Domain errors; the HTTP edge and the CLI translate them."""


class TenancyError(Exception):
    """Base class for tenancy errors."""


class NotFound(TenancyError):
    pass


class Conflict(TenancyError):
    pass


class InvalidInput(TenancyError, ValueError):
    pass


class DecryptionError(TenancyError):
    """Ciphertext failed authentication: wrong key, tampered bytes or wrong binding."""


class IntegrityError(TenancyError):
    """A stored blob does not match the SHA-256 recorded for it."""


class KeyProviderError(TenancyError):
    """The key-encryption key cannot be read or is malformed."""
