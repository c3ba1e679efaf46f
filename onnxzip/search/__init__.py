"""Search: loops that compress until the quality limit (and, later, agents choosing per-layer
decisions). Above passes, evaluators and training; below the API and CLI."""
