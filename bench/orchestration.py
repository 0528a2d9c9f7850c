"""Orchestration overhead and cache benefit of `byoai run` on a recipe (default: the demo).

Prints two ratios:
  pipeline / plain  - cold `byoai run` wall time over a plain script making the same library calls
                      (bench/plain_demo.py: no Prefect, no MLflow, no registry)
  warm / cold       - an unchanged re-run (everything cached) over the cold run
Each is a fresh process, as a user would run it. The base model is materialized once beforehand
so neither side pays for it.

    python bench/orchestration.py [RECIPE]     (default: recipes/demo.yaml)
    python bench/orchestration.py --quick      (bench/recipes/quick.yaml: what CI runs, ~2 min)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


QUICK = "bench/recipes/quick.yaml"


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--quick"]
    recipe = QUICK if "--quick" in sys.argv[1:] else (args[0] if args else "recipes/demo.yaml")
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "BYOAI_HOME": home, "HF_HUB_OFFLINE": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        warmup = timed([sys.executable, "-c", f"from byoai.recipe import load_recipe; from byoai.settings import Settings; "
                        f"from byoai.tasks.model import resolve_model; resolve_model.fn(load_recipe('{recipe}').model, str(Settings().models_dir()))"], env)
        plain = timed([sys.executable, "bench/plain_demo.py", recipe], env)
        cold = timed([str(bin_dir / "byoai"), "run", recipe], env)
        warm = timed([str(bin_dir / "byoai"), "run", recipe], env)
    print(f"recipe: {recipe} (base model ready in {warmup:.1f}s)")
    print(f"plain script      {plain:7.1f} s")
    print(f"byoai run, cold   {cold:7.1f} s")
    print(f"byoai run, warm   {warm:7.1f} s")
    print(f"pipeline / plain  {cold / plain:7.2f}x  (orchestration + tracking + registry overhead)")
    print(f"warm / cold       {warm / cold:7.2f}x  (unchanged re-run, everything cached)")


if __name__ == "__main__":
    main()
