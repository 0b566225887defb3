"""The package version (one home: the top level, the CLI, reports and model cards read it here)."""
__version__ = "0.1.0"
