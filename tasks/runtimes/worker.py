"""`python -m byoai.tasks.runtimes.worker REQUEST.json RESULT.json`: measure one artifact in this process.

tasks.evaluate starts it for runtimes measured in a process of their own (a compiled build is
first on PYTHONPATH); it writes tasks.runtimes.base.Measured as JSON, or exits non-zero with the
error on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path

from byoai.tasks.runtimes import MeasureRequest, measure_request


def main(request_file: str, result_file: str) -> None:
    request = MeasureRequest.model_validate_json(Path(request_file).read_text())
    Path(result_file).write_text(measure_request(request).model_dump_json())


if __name__ == "__main__":
    main(*sys.argv[1:])
