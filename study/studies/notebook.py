"""Executing a notebook with papermill: the sweep's points and the study reports both run through here."""

from __future__ import annotations

from pathlib import Path

import jupytext
import papermill

__all__ = ["execute_notebook", "KERNEL_START_TRIES"]

KERNEL_START_TRIES = 3


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
        # The kernel's own log is start-up and shutdown chatter, once per sweep point: a warning about its
        # local TCP transport (ipykernel 7), and "ERROR | KeyboardInterrupt caught in kernel" whenever
        # jupyter_client's SIGINT at shutdown lands inside a message handler. A failing cell still reaches
        # the sweep's console through papermill's execution error, which does not go through this log.
        for attempt in range(KERNEL_START_TRIES):
            try:
                papermill.execute_notebook(str(staged), str(output), parameters=parameters, kernel_name="python3",
                                           cwd=str(cwd), progress_bar=False,
                                           extra_arguments=["--IPKernelApp.log_level=CRITICAL"])
                break
            except RuntimeError as exc:
                # a kernel that dies before it answers (two kernels picked the same free port) ran no cell:
                # starting another is safe; any other failure is the notebook's
                if "before replying to kernel_info" not in str(exc) or attempt == KERNEL_START_TRIES - 1:
                    raise
    finally:
        if staged != source:
            staged.unlink(missing_ok=True)
