"""Offline lm-evaluation-harness tasks (see tasks.py); TASKS_DIR is the path for --include_path."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
