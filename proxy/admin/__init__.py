"""The admin HTTP API: a thin layer over the engine."""
