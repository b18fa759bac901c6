"""Evaluation prompt sets: GenEval metadata JSONL or one prompt per line.

Every line becomes one ``PromptItem``; a malformed or empty line is an error naming file and line
(nothing is skipped silently; the Flow-GRPO text files have no trailing newline, which is fine).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

PROMPT_FORMATS = ("geneval", "text")  # GenEval metadata JSONL (a "prompt" key per line), or one prompt per line
PromptFormat = Literal[PROMPT_FORMATS]


@dataclass(frozen=True)
class PromptItem:
    """One evaluation prompt and its metadata (the GenEval line, or ``{"prompt": ...}``)."""

    index: int
    prompt: str
    metadata: dict[str, Any] = field(default_factory=dict)


def read_prompt_set(path: str | Path, fmt: str) -> list[PromptItem]:
    """Read a prompt file in format ``geneval`` (JSONL with a "prompt" key) or ``text``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt set not found: {path}")
    if fmt not in PROMPT_FORMATS:
        raise ValueError(f"{path}: unknown prompt-set format {fmt!r}")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    items = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            raise ValueError(f"{path}:{lineno}: empty line")
        if fmt == "text":
            items.append(PromptItem(len(items), line.strip(), {"prompt": line.strip()}))
            continue
        try:
            meta = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str) or not meta["prompt"].strip():
            raise ValueError(f"{path}:{lineno}: expected an object with a non-empty string 'prompt'")
        items.append(PromptItem(len(items), meta["prompt"], meta))
    if not items:
        raise ValueError(f"{path}: no prompts")
    return items
