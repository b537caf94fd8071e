"""mongobranch: Git-style branches for MongoDB behind a wire-protocol proxy."""

__version__ = "0.1.0"
