"""Prefect flows: orchestration only (no numerics here)."""
