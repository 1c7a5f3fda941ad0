"""The asynchronous inference core."""
