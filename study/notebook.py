"""Executing a notebook with papermill: the sweep's points and the study reports both run through here."""

from __future__ import annotations

from pathlib import Path

import jupytext
import papermill

__all__ = ["execute_notebook"]


def execute_notebook(source: Path, output: Path, parameters: dict, cwd: Path) -> None:
    """Execute a jupytext percent file (or .ipynb) with papermill into ``output`` (an .ipynb)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    if source.suffix == ".py":
        staged = output.with_name(output.stem + ".input.ipynb")
        notebook = jupytext.read(source)
        notebook.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
        notebook.metadata.setdefault("language_info", {"name": "python"})
        jupytext.write(notebook, staged)
    else:
        staged = source
    try:
        # the kernel logs a warning about its local TCP transport at every start (ipykernel 7), once per
        # sweep point in a sweep's log; its errors still show
        papermill.execute_notebook(str(staged), str(output), parameters=parameters, kernel_name="python3",
                                   cwd=str(cwd), progress_bar=False,
                                   extra_arguments=["--IPKernelApp.log_level=ERROR"])
    finally:
        if staged != source:
            staged.unlink(missing_ok=True)
