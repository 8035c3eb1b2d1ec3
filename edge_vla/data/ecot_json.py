"""The released ECoT annotation JSON: read and write.

Layout (as released with ECoT / MiniVLA's LIBERO-90 reasoning):

    {file_path: {episode_id: {
        "reasoning": {"<step>": {"task", "plan", "subtask", "subtask_reason", "move", "move_reason"}},
        "features": {"gripper_position": [[x, y] per step],
                     "bboxes": [[[name, [x1, y1, x2, y2]], ...] per step],
                     "move_primitive": [name per step]}}}}

`file_path` is the demo file's path where it was annotated (an absolute path on the authors'
machines): files are matched by their name, so the released JSON works unchanged against a
local copy of the demos. `episode_id` is the demo index as a string (demo_3 -> "3").
The GRIPPER POSITION tag carries the gripper's pixel now and at the next few steps (5 in ECoT),
so it is assembled from the per-step positions when a step's `Reasoning` is built.
"""

from __future__ import annotations

import json
from pathlib import Path

from edge_vla.io import read_json
from edge_vla.errors import EdgeVLAError
from edge_vla.io import atomic_write_text
from edge_vla.tokens.reasoning import Reasoning

GRIPPER_LOOKAHEAD = 5  # positions in the GRIPPER POSITION tag: now and the next 4 (ECoT's default)
_TEXT_FIELDS = ("task", "plan", "subtask", "subtask_reason", "move", "move_reason")


class EcotAnnotations:
    """Annotations for one or more demo files, looked up by (file name, demo index, step)."""

    def __init__(self, data: dict, source: str = "ECoT annotations"):
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise EdgeVLAError(f"{source} is not ECoT annotation JSON",
                               "expected {file_path: {episode_id: {reasoning, features}}}")
        self.source = source
        self.data = data
        self._by_name = {Path(k).name: k for k in data}

    @classmethod
    def load(cls, path: str | Path) -> "EcotAnnotations":
        p = Path(path)
        if not p.is_file():
            raise EdgeVLAError(f"ECoT annotation file not found: {p}", "pass an existing *.json file")
        data = read_json(p, "pass the ECoT reasoning JSON file")
        return cls(data, source=str(p))

    def save(self, path: str | Path) -> Path:
        atomic_write_text(path, json.dumps(self.data))
        return Path(path)

    # --- lookup -------------------------------------------------------------------------------
    def file_key(self, demo_file: str | Path) -> str | None:
        demo_file = str(demo_file)
        if demo_file in self.data:
            return demo_file
        return self._by_name.get(Path(demo_file).name)

    def episode(self, demo_file: str | Path, episode: int | str) -> dict | None:
        key = self.file_key(demo_file)
        if key is None:
            return None
        return self.data[key].get(str(episode))

    def check_episode(self, demo_file, episode, n_steps: int) -> None:
        """Raise if the annotation's step count disagrees with the demo's (a mismatched JSON)."""
        ep = self.episode(demo_file, episode)
        if ep is None:
            return
        n = len(ep.get("features", {}).get("gripper_position", [])) or len(ep.get("reasoning", {}))
        if n and n != n_steps:
            raise EdgeVLAError(
                f"{self.source}: episode {episode} of {Path(str(demo_file)).name} has {n} annotated steps, "
                f"the demo has {n_steps}",
                "use the annotation JSON made for these demo files (or re-annotate with `edge-vla data annotate`)",
            )

    def reasoning(self, demo_file, episode, step: int) -> Reasoning | None:
        ep = self.episode(demo_file, episode)
        if ep is None:
            return None
        return episode_step_reasoning(ep, step)

    # --- building -----------------------------------------------------------------------------
    def set_episode(self, demo_file: str | Path, episode: int | str, steps: list[Reasoning],
                    gripper_positions: list, move_primitives: list[str] | None = None,
                    meta: dict | None = None) -> None:
        self.data.setdefault(str(demo_file), {})[str(episode)] = episode_record(steps, gripper_positions,
                                                                                 move_primitives, meta)
        self._by_name[Path(str(demo_file)).name] = str(demo_file)

    def n_episodes(self) -> int:
        return sum(len(v) for v in self.data.values())


def episode_record(steps: list[Reasoning], gripper_positions: list, move_primitives: list[str] | None = None,
                   meta: dict | None = None) -> dict:
    """One episode in the released layout, from per-step Reasoning and per-step gripper pixels.

    `meta` (optional, e.g. {"bboxes": "segmentation"}) is stored under the episode's "meta" key,
    which readers of the released layout ignore."""
    if len(gripper_positions) != len(steps):
        raise EdgeVLAError(f"{len(steps)} reasoning steps but {len(gripper_positions)} gripper positions",
                           "give one gripper position per step")
    reasoning = {}
    for t, r in enumerate(steps):
        reasoning[str(t)] = {k: getattr(r, k) for k in _TEXT_FIELDS if getattr(r, k) is not None}
    extra = {"meta": dict(meta)} if meta else {}
    return {
        **extra,
        "reasoning": reasoning,
        "features": {
            "gripper_position": [[int(x), int(y)] for x, y in gripper_positions],
            "bboxes": [[[name, [int(v) for v in box]] for name, box in (r.visible_objects or [])] for r in steps],
            "move_primitive": list(move_primitives) if move_primitives is not None else [r.move for r in steps],
        },
    }


def episode_step_reasoning(ep: dict, step: int, lookahead: int = GRIPPER_LOOKAHEAD) -> Reasoning:
    """The Reasoning of one step of a released-layout episode record."""
    reasoning = ep.get("reasoning", {})
    text = reasoning.get(str(step))
    if text is None:
        # The released files skip some steps: use the latest annotated step before this one.
        earlier = [int(k) for k in reasoning if k.isdigit() and int(k) <= step]
        text = reasoning[str(max(earlier))] if earlier else {}
    feats = ep.get("features", {})
    grip = feats.get("gripper_position") or []
    boxes = feats.get("bboxes") or []
    gripper = None
    if grip and step < len(grip):
        track = grip[step : step + lookahead]
        gripper = [(int(x), int(y)) for x, y in track if x is not None and y is not None]
    visible = None
    if boxes and step < len(boxes) and boxes[step] is not None:
        visible = [(str(name), [int(v) for v in box]) for name, box in boxes[step]]
    return Reasoning(
        task=text.get("task"), plan=text.get("plan"), visible_objects=visible,
        subtask_reason=text.get("subtask_reason"), subtask=text.get("subtask"),
        move_reason=text.get("move_reason"), move=text.get("move"), gripper=gripper,
    )


__all__ = ["EcotAnnotations", "episode_record", "episode_step_reasoning", "GRIPPER_LOOKAHEAD"]
