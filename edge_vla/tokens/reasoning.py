"""The embodied chain of thought (ECoT): fields, tag text, parsing, per-tag dropout.

The text form is ECoT's: tags in a fixed order, each followed by its value,

    TASK: ... PLAN: ... VISIBLE OBJECTS: bowl [10, 12, 30, 40], ... SUBTASK REASONING: ...
    SUBTASK: ... MOVE REASONING: ... MOVE: ... GRIPPER POSITION: [x1, y1, x2, y2, ...] ACTION:

and the action tokens follow `ACTION:`. Pixel coordinates are (x = column, y = row) in the
canonical upright frame of the images the model sees.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace

import numpy as np

from edge_vla.errors import EdgeVLAError

PROMPT_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"

# (field name, tag, ECoT database key) in the order ECoT writes them.
TAGS: tuple[tuple[str, str, str], ...] = (
    ("task", "TASK:", "task"),
    ("plan", "PLAN:", "plan"),
    ("visible_objects", "VISIBLE OBJECTS:", "bboxes"),
    ("subtask_reason", "SUBTASK REASONING:", "subtask_reason"),
    ("subtask", "SUBTASK:", "subtask"),
    ("move_reason", "MOVE REASONING:", "move_reason"),
    ("move", "MOVE:", "move"),
    ("gripper", "GRIPPER POSITION:", "gripper"),
)
ACTION_TAG = "ACTION:"
_FIELD_BY_TAG = {tag: name for name, tag, _ in TAGS}
# Longest tags first so "SUBTASK REASONING:" is not read as "SUBTASK:".
_TAG_RE = re.compile("|".join(re.escape(t) for t in sorted([*_FIELD_BY_TAG, ACTION_TAG], key=len, reverse=True)))
_BOX_RE = re.compile(r"([^\[\],]+?)\s*\[\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*\]")
_INT_RE = re.compile(r"-?\d+")


def build_prompt(instruction: str) -> str:
    instruction = instruction.strip().rstrip("?.").strip()
    if not instruction:
        raise EdgeVLAError("the instruction is empty", "pass the task's language instruction")
    return PROMPT_TEMPLATE.format(instruction=instruction[0].lower() + instruction[1:])


@dataclass
class Reasoning:
    """One timestep's embodied reasoning. A field set to None is absent (e.g. dropped)."""

    task: str | None = None
    plan: str | None = None
    visible_objects: list[tuple[str, list[int]]] | None = None
    subtask_reason: str | None = None
    subtask: str | None = None
    move_reason: str | None = None
    move: str | None = None
    gripper: list[tuple[int, int]] | None = field(default=None)

    # --- text ---------------------------------------------------------------------------------
    def to_text(self, include_action_tag: bool = True) -> str:
        """ECoT tag text, ending with `ACTION:` (the action tokens follow it) unless told not to."""
        parts = []
        for name, tag, _ in TAGS:
            value = getattr(self, name)
            if value is None:
                continue
            parts.append(f"{tag} {self._format(name, value)}")
        if include_action_tag:
            parts.append(ACTION_TAG)
        return " ".join(parts)

    @staticmethod
    def _format(name: str, value) -> str:
        if name == "visible_objects":
            return ", ".join(f"{obj} [{', '.join(str(int(v)) for v in box)}]" for obj, box in value)
        if name == "gripper":
            return "[" + ", ".join(str(int(v)) for xy in value for v in xy) + "]"
        return str(value).strip()

    @classmethod
    def from_text(cls, text: str) -> "Reasoning":
        """Parse ECoT tag text (tolerant of a missing `ACTION:` and of absent tags)."""
        matches = list(_TAG_RE.finditer(text))
        if not matches:
            raise EdgeVLAError(
                f"no ECoT tag found in reasoning text {text[:60]!r}",
                "reasoning text starts with 'TASK:' (see edge_vla.tokens.reasoning.TAGS)",
            )
        values: dict = {}
        for i, m in enumerate(matches):
            tag = m.group(0)
            if tag == ACTION_TAG:
                break
            end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
            raw = text[m.end() : end].strip()
            name = _FIELD_BY_TAG[tag]
            values[name] = cls._parse_value(name, raw)
        return cls(**values)

    @classmethod
    def from_generated(cls, text: str, prompt_tail: str = "") -> "Reasoning | None":
        """What a model wrote, as Reasoning: None when it holds no ECoT tag. A prompt that ends in a
        tag (ECoT's own ends in `TASK:`) leaves that tag out of the text: `prompt_tail` puts it back."""
        tail = prompt_tail.rstrip()
        lead = next((t for t in _FIELD_BY_TAG if tail.endswith(t)), "")
        text = f"{lead} {text}" if lead and not text.lstrip().startswith(lead) else text
        return cls.from_text(text) if _TAG_RE.search(text) else None

    @staticmethod
    def _parse_value(name: str, raw: str):
        if name == "visible_objects":
            return [(m.group(1).strip(), [int(m.group(k)) for k in range(2, 6)]) for m in _BOX_RE.finditer(raw)]
        if name == "gripper":
            ints = [int(v) for v in _INT_RE.findall(raw)]
            return [(ints[i], ints[i + 1]) for i in range(0, len(ints) - 1, 2)]
        return raw

    # --- dict (ECoT database keys) ---------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {}
        for name, _, _ in TAGS:
            v = getattr(self, name)
            if v is None:
                continue
            if name == "visible_objects":
                v = [[obj, [int(x) for x in box]] for obj, box in v]
            elif name == "gripper":
                v = [[int(x), int(y)] for x, y in v]
            out[name] = v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Reasoning":
        kwargs = {}
        for name, _, _ in TAGS:
            if d.get(name) is None:
                continue
            v = d[name]
            if name == "visible_objects":
                v = [(str(obj), [int(x) for x in box]) for obj, box in v]
            elif name == "gripper":
                v = [(int(x), int(y)) for x, y in v]
            kwargs[name] = v
        return cls(**kwargs)

    # --- dropout ---------------------------------------------------------------------------------
    def present_fields(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def drop_tags(self, p: float, rng: np.random.Generator) -> "Reasoning":
        """Per-tag dropout: each present tag is removed independently with probability p."""
        if not 0.0 <= p <= 1.0:
            raise EdgeVLAError(f"tag dropout probability must be in [0, 1], got {p}")
        dropped = {name: None for name in self.present_fields() if rng.random() < p}
        return replace(self, **dropped)

    def is_empty(self) -> bool:
        return not self.present_fields()


__all__ = ["Reasoning", "TAGS", "ACTION_TAG", "PROMPT_TEMPLATE", "build_prompt"]
