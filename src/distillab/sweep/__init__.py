"""Experiment grids: teacher pools -> students (+ matched baselines) -> evaluation, resumable.

    grid.py      the grid spec (YAML) and its checks
    plan.py      the grid expanded into content-addressed runs; compute estimates
    execute.py   runs in dependency order on local workers or submitit (Slurm)
"""

from distillab.sweep.execute import execute_run, read_status, run_sweep
from distillab.sweep.grid import GridSpec, grid_from_dict, load_grid
from distillab.sweep.plan import Run, compute_summary, format_memory, format_notes, format_plan, plan

__all__ = ["execute_run", "read_status", "run_sweep", "GridSpec", "grid_from_dict", "load_grid", "Run",
           "compute_summary", "format_memory", "format_notes", "format_plan", "plan"]
