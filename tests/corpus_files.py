"""Small random training files for the tests: learnable (word shapes, spaces) yet different every run."""

import json
import random
from pathlib import Path

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]


def write_text(path: Path, characters: int) -> str:
    """Random sentences of a few words, at least `characters` long."""
    text = ""
    while len(text) < characters:
        text += " ".join(random.choices(WORDS, k=random.randint(3, 8))) + ".\n"
    path.write_text(text)
    return str(path)


def write_chat(path: Path, conversations: int) -> str:
    """Short JSONL conversations, each answer the question in capitals: streams wrap around (and
    their state resets) within a few steps."""
    lines = []
    for _ in range(conversations):
        question = " ".join(random.choices(WORDS, k=random.randint(2, 5)))
        lines.append(json.dumps({"messages": [{"role": "user", "content": question},
                                              {"role": "assistant", "content": question.upper()}]}))
    path.write_text("\n".join(lines))
    return str(path)
