"""The released ECoT annotation JSON, in each layout it was released in: read and write.

Bridge layout (ECoT's `embodied_features_bridge.json`; what `edge-vla data annotate` writes):

    {file_path: {episode_id: {
        "reasoning": {"<step>": {"task", "plan", "subtask", "subtask_reason", "move", "move_reason"}},
        "features": {"gripper_position": [[x, y] per step],
                     "bboxes": [[[name, [x1, y1, x2, y2]], ...] per step],
                     "move_primitive": [name per step]},
        "metadata": {...}}}}                                   (metadata: optional, ignored)

LIBERO layout (`libero_reasonings.json` of Embodied-CoT/embodied_features_and_demos_libero, the
data the ECoT-Lite paper trained on): one flat record per step, other key names,

    {file_path: {demo_id: {"<step>": {"plan", "bboxes", "subtask_reasoning", "subtask",
                                      "movement_reasoning", "movement", "gripper"}}}}

The layout is detected per episode record, so one `EcotAnnotations` reads either. Variants met in
public loaders are read too: `plan` as a dict of numbered steps (read as "1. a 2. b"), `bboxes`
as [name, box] pairs, [prob, name, box] triples or a {name: box} dict, a box as [x1, y1, x2, y2]
or [[x1, y1], [x2, y2]], `gripper` as one [x, y] point per step or a list of points.

`file_path` is the demo file's path where it was annotated (an absolute path on the authors'
machines): files are matched by their name, so the released JSON works unchanged against a
local copy of the demos. `episode_id` is the demo index as a string (demo_3 -> "3").
The GRIPPER POSITION tag carries the gripper's pixel now and at the next few steps (5 in ECoT),
so where a file stores one point per step it is assembled from the per-step points.
A step without a record reuses the latest earlier step's (the released files skip some steps);
`check_episode` counts them so the dataset can say so.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from edge_vla.io import read_json
from edge_vla.errors import EdgeVLAError
from edge_vla.io import atomic_write_text
from edge_vla.tokens.reasoning import Reasoning

GRIPPER_LOOKAHEAD = 5  # positions in the GRIPPER POSITION tag: now and the next 4 (ECoT's default)
_TEXT_FIELDS = ("task", "plan", "subtask", "subtask_reason", "move", "move_reason")
# Our field -> the key names the released files and public loaders use for it (first match wins).
_ALIASES = {
    "task": ("task",),
    "plan": ("plan",),
    "subtask_reason": ("subtask_reason", "subtask_reasoning"),
    "subtask": ("subtask",),
    "move_reason": ("move_reason", "movement_reasoning", "move_reasoning"),
    "move": ("move", "movement"),
    "bboxes": ("bboxes", "visible_objects"),
    "gripper": ("gripper", "gripper_position"),
}
_EPISODE_META_KEYS = ("meta", "metadata")


class EcotAnnotations:
    """Annotations for one or more demo files, looked up by (file name, demo index, step)."""

    def __init__(self, data: dict, source: str = "ECoT annotations"):
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise EdgeVLAError(f"{source} is not ECoT annotation JSON",
                               "expected {file_path: {episode_id: {reasoning, features}}}")
        self.source = source
        self.data = data
        self._by_name = {Path(k).name: k for k in data}
        self._by_lower = {Path(k).name.lower(): k for k in data}

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
        name = Path(demo_file).name
        return self._by_name.get(name) or self._by_lower.get(name.lower())

    def looks_like_ecot(self) -> bool:
        """Whether some episode record is in a known layout (a stray JSON beside the demos is not)."""
        for eps in self.data.values():
            for ep in eps.values():
                if isinstance(ep, dict) and episode_layout(ep) is not None:
                    return True
        return False

    def episode(self, demo_file: str | Path, episode: int | str) -> dict | None:
        key = self.file_key(demo_file)
        if key is None:
            return None
        return self.data[key].get(str(episode))

    def check_episode(self, demo_file, episode, n_steps: int) -> list[int]:
        """Raise if the annotation's step count disagrees with the demo's (a mismatched JSON); return
        the steps of the demo that have no record of their own (they reuse an earlier step's)."""
        ep = self.episode(demo_file, episode)
        if ep is None:
            return []
        records = step_records(ep)
        if episode_layout(ep) == "bridge":
            n = len(ep.get("features", {}).get("gripper_position", [])) or len(records)
        else:  # per-step records: the last annotated step bounds the demo
            n = max(records) + 1 if records else 0
        if (n and n != n_steps) if episode_layout(ep) == "bridge" else n > n_steps:
            raise EdgeVLAError(
                f"{self.source}: episode {episode} of {Path(str(demo_file)).name} has {n} annotated steps, "
                f"the demo has {n_steps}",
                "use the annotation JSON made for these demo files (or re-annotate with `edge-vla data annotate`)",
            )
        return [t for t in range(n_steps) if t not in records]

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


def episode_layout(ep: dict) -> str | None:
    """"bridge" ({reasoning, features}), "per_step" ({"<step>": record}) or None (not ECoT)."""
    if "reasoning" in ep or "features" in ep:
        return "bridge"
    steps = [k for k in ep if k not in _EPISODE_META_KEYS]
    if steps and all(str(k).isdigit() and isinstance(ep[k], dict) for k in steps):
        return "per_step"
    return None


def step_records(ep: dict) -> dict[int, dict]:
    """{step: raw text record} of an episode in either layout."""
    recs = ep.get("reasoning", {}) if episode_layout(ep) == "bridge" else ep
    return {int(k): v for k, v in recs.items() if str(k).isdigit() and isinstance(v, dict)}


def _field(rec: dict, name: str):
    for key in _ALIASES[name]:
        if rec.get(key) is not None:
            return rec[key]
    return None


def _text(v) -> str | None:
    """A text field; a plan given as {"1": "reach", "2": "grasp"} reads as "1. reach 2. grasp"."""
    if v is None:
        return None
    if isinstance(v, dict):
        items = sorted(v.items(), key=lambda kv: int(re.sub(r"\D", "", str(kv[0])) or 0))
        return " ".join(f"{i + 1}. {str(x).strip()}" for i, (_, x) in enumerate(items))
    if isinstance(v, (list, tuple)):
        return " ".join(f"{i + 1}. {str(x).strip()}" for i, x in enumerate(v))
    return str(v)


def _box(b) -> list[int]:
    flat = [v for xy in b for v in xy] if b and isinstance(b[0], (list, tuple)) else list(b)
    if len(flat) != 4:
        raise EdgeVLAError(f"a bounding box must hold 4 numbers, got {b!r}", "write boxes as [x1, y1, x2, y2]")
    return [int(round(float(v))) for v in flat]


def parse_bboxes(v) -> list[tuple[str, list[int]]] | None:
    """[name, box] pairs, [prob, name, box] triples or a {name: box} dict -> [(name, box)]."""
    if v is None:
        return None
    if isinstance(v, dict):
        return [(str(name), _box(box)) for name, box in v.items()]
    out = []
    for item in v:
        if isinstance(item, dict):
            out.extend((str(n), _box(b)) for n, b in item.items())
        elif len(item) == 3:
            _, name, box = item
            out.append((str(name), _box(box)))
        else:
            name, box = item
            out.append((str(name), _box(box)))
    return out


def _points(v) -> list[tuple[int, int]] | None:
    """One [x, y] point or a list of points -> [(x, y)]; None where the gripper was not seen."""
    if v is None or len(v) == 0:
        return None
    if not isinstance(v[0], (list, tuple)):
        v = [v]
    pts = [(int(round(float(p[0]))), int(round(float(p[1])))) for p in v if p is not None and None not in p[:2]]
    return pts or None


def episode_step_reasoning(ep: dict, step: int, lookahead: int = GRIPPER_LOOKAHEAD) -> Reasoning | None:
    """The Reasoning of one step of an episode record in either layout (None: nothing annotated)."""
    records = step_records(ep)
    text = records.get(step)
    if text is None:
        # The released files skip some steps: use the latest annotated step before this one.
        earlier = [k for k in records if k <= step]
        text = records[max(earlier)] if earlier else {}
    if episode_layout(ep) == "bridge":
        feats = ep.get("features", {})
        grip = feats.get("gripper_position") or []
        boxes = feats.get("bboxes") or []
        visible = parse_bboxes(boxes[step]) if boxes and step < len(boxes) and boxes[step] is not None else None
        gripper = None
        if grip and step < len(grip):
            gripper = [(int(x), int(y)) for x, y in grip[step : step + lookahead] if x is not None and y is not None]
    else:
        visible, gripper = None, _points(_field(text, "gripper"))
        if gripper is not None and len(gripper) == 1:  # one point per step: now and the next steps' points
            for k in range(step + 1, step + lookahead):
                nxt = _points(_field(records.get(k) or {}, "gripper"))
                if nxt is None:
                    break
                gripper.append(nxt[0])
        gripper = gripper[:lookahead] if gripper else None
    if visible is None:
        visible = parse_bboxes(_field(text, "bboxes"))
    r = Reasoning(
        task=_text(_field(text, "task")), plan=_text(_field(text, "plan")), visible_objects=visible,
        subtask_reason=_text(_field(text, "subtask_reason")), subtask=_text(_field(text, "subtask")),
        move_reason=_text(_field(text, "move_reason")), move=_text(_field(text, "move")), gripper=gripper or None,
    )
    return None if r.is_empty() else r


__all__ = ["EcotAnnotations", "episode_record", "episode_step_reasoning", "episode_layout", "step_records",
           "parse_bboxes", "GRIPPER_LOOKAHEAD"]
