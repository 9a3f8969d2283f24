"""Prompt data: built-in verifiable task generators, file/dataset sources and the checkpointable stream."""

from rlstack.data import code_tasks, tool_tasks  # noqa: F401  (register the code and python_tool tasks)
from rlstack.data.config import DataConfig
from rlstack.data.sources import DataError, PromptSource, load_rows, load_split, task_rows
from rlstack.data.tasks import TASKS, Problem, TaskGenerator, generate_rows, get_task, register_task

__all__ = [
    "TASKS",
    "DataConfig",
    "DataError",
    "Problem",
    "PromptSource",
    "TaskGenerator",
    "generate_rows",
    "get_task",
    "load_rows",
    "load_split",
    "register_task",
    "task_rows",
]
