"""Prefect tasks: one pipeline step each, pure in their inputs so caching and retries are safe."""
