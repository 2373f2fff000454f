"""Error types. Every user-facing failure is a GradspaceError with a message that names
the offending file, config key or sample."""


class GradspaceError(Exception):
    """Bad input or a broken invariant that the user can fix."""


class ConfigError(GradspaceError):
    """Invalid configuration (unknown key, wrong type, inconsistent settings)."""


class DataError(GradspaceError):
    """Missing or unreadable data, wrong class count, bad manifest."""


class StoreError(GradspaceError):
    """A Zarr store that is missing, incomplete, truncated or inconsistent."""


class ModelError(GradspaceError):
    """Missing weights, unknown architecture, model/config mismatch."""


class NumericalError(GradspaceError):
    """NaN or inf values where finite numbers are required."""
