"""Prompts from a dataset file, for the sweep runner (:mod:`sdbayes.sweep`).

Speculative decoding's acceptance depends on the text: random token ids make the drafter
guess noise, so a sweep that should measure the acceptance a service will see sends real
prompts. :func:`read_prompts` reads the formats ``vllm bench serve`` takes:

- ShareGPT JSON (``--dataset-name sharegpt``): a list of ``{"conversations": [{"from":
  "human", "value": ...}, ...]}``; the first turn from ``human`` or ``user`` is the prompt;
- JSON Lines (``--dataset-name custom``), one object a line with ``"prompt"`` (or
  ``"text"``), or a JSON list of such objects or of strings.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


class PromptError(ValueError):
    """A dataset file that holds no usable prompts; the message names the file and item."""


def read_prompts(path: str | Path) -> tuple[tuple[str, ...], str]:
    """The prompts of a dataset file, in file order, and the file's content digest (the first
    12 hex digits of its SHA-256), which tells a changed file from the one a sweep used.

    Raises:
      PromptError: naming the file, and the item or line, for anything unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"{path}: no such file")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()[:12]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PromptError(f"{path}: not UTF-8 text ({err})") from None
    try:
        items = json.loads(text)
        where = "item"
        if isinstance(items, dict):  # JSON Lines of one line
            items, where = [items], "line"
        if not isinstance(items, list):
            raise PromptError(f"{path}: a JSON dataset must be a list of prompts, found "
                              f"{type(items).__name__}")
    except json.JSONDecodeError:
        items, where = [], "line"
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((number, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise PromptError(f"{path}: line {number}: not JSON ({err.msg}); "
                                      "expected ShareGPT JSON or JSON Lines") from None
    else:
        items = list(enumerate(items, 1))
    prompts = tuple(_prompt(item, f"{path}: {where} {number}") for number, item in items)
    if not prompts:
        raise PromptError(f"{path}: no prompts")
    return prompts, digest


def _prompt(item, where: str) -> str:
    """The prompt of one dataset item (module docstring's formats)."""
    if isinstance(item, str):
        found = item
    elif isinstance(item, dict) and "conversations" in item:
        turns = item["conversations"]
        asked = [t.get("value") for t in turns if isinstance(t, dict)
                 and t.get("from") in ("human", "user")] if isinstance(turns, list) else []
        if not asked:
            raise PromptError(f"{where}: 'conversations' has no turn from 'human' or 'user'")
        found = asked[0]
    elif isinstance(item, dict) and ("prompt" in item or "text" in item):
        found = item.get("prompt", item.get("text"))
    else:
        raise PromptError(f"{where}: expected a string, or an object with 'prompt', 'text' "
                          "or ShareGPT's 'conversations'")
    if not isinstance(found, str) or not found.strip():
        raise PromptError(f"{where}: the prompt is empty or not text")
    return found
