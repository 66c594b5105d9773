"""Prompt data, one job per module: `files` reads a file's rows (JSONL, JSON, Parquet, a saved `datasets`
directory), `prompts` turns rows into Prompts (the prompt and answer columns, conversations), `encoding` renders
them with the student's chat template, tokenizes and routes them; `answers` checks reference answers.
"""

from opd.data.answers import final_answer, last_number_correct
from opd.data.encoding import ChatFormat, Encoded, encode
from opd.data.files import FORMATS, DataError, source_problem
from opd.data.prompts import (
    MAX_NAMED_SKIPS,
    ON_ERROR,
    DuplicatePrompts,
    Prompt,
    SkippedLine,
    check_first_rows,
    load_prompts,
    repeats,
)

__all__ = [
    "FORMATS",
    "MAX_NAMED_SKIPS",
    "ON_ERROR",
    "ChatFormat",
    "DataError",
    "DuplicatePrompts",
    "Encoded",
    "Prompt",
    "SkippedLine",
    "check_first_rows",
    "encode",
    "final_answer",
    "last_number_correct",
    "load_prompts",
    "repeats",
    "source_problem",
]
