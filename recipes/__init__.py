"""Recipes and hardware target profiles shipped with byoai (YAML files beside this module)."""

from pathlib import Path

RECIPES_DIR = Path(__file__).parent
TARGETS_DIR = RECIPES_DIR / "targets"
