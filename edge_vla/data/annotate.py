"""Replay-annotate a LIBERO demo file: ECoT reasoning for every step from its stored sim states.

    annotate_file("KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5", "reasoning.json")

The task comes from the file (attrs, or LIBERO's file name `<TASK>_demo.hdf5`); the suite is
looked up among LIBERO's suites unless given. Pixel coordinates are for the file's image size.
"""

from __future__ import annotations

from pathlib import Path

from edge_vla.data.ecot_json import EcotAnnotations
from edge_vla.data.libero_hdf5 import LiberoHDF5
from edge_vla.errors import EdgeVLAError


def find_task(task_name: str, suite: str | None = None) -> tuple[str, str]:
    from edge_vla.sim.env import list_suites, list_tasks

    suites = [suite] if suite else ["libero_90", *[s for s in list_suites() if s != "libero_90"]]
    for s in suites:
        if task_name in list_tasks(s):
            return s, task_name
    if suite:
        from edge_vla.sim.env import resolve_task

        return suite, list_tasks(suite)[resolve_task(suite, task_name)]  # raises with a suggestion
    raise EdgeVLAError(f"no LIBERO suite has a task named `{task_name}`",
                       "pass --suite and --task (the file name should be `<TASK>_demo.hdf5`)")


def annotate_file(path: str | Path, out: str | Path, suite: str | None = None, task: str | None = None,
                  image_size: int | None = None, progress: bool = True, file_key: str | None = None) -> Path:
    """Write the ECoT annotation JSON for every demo of one LIBERO hdf5 file."""
    from edge_vla.sim.annotator import ReasoningAnnotator
    from edge_vla.sim.env import LiberoEnv

    path = Path(path)
    with LiberoHDF5(path) as h:
        task = task or h.task_name
        suite = suite or h.suite or None
        suite, task = find_task(task, suite)
        size = int(image_size or h.image_size() or 128)
        demos = list(h.demos)
        for d in demos:
            h.states(d)  # fail before the slow part if a demo has no states
        # No camera observations (replay needs none), but an offscreen renderer for segmentation boxes.
        env = LiberoEnv(suite, task, image_size=size, cameras=(), settle_steps=0, offscreen=True)
        try:
            env.reset(options={"init_state": 0})
            ann = EcotAnnotations({})
            annotator = ReasoningAnnotator(env, image_size=size)
            it = demos
            if progress:
                from rich.progress import track

                it = track(demos, description=f"annotating {path.name}")
            for d in it:
                steps, gripper_px, moves = annotator.replay(h.states(d), h.actions(d))
                ann.set_episode(file_key or path.name, d.split("_")[1], steps, gripper_px, moves, meta=annotator.meta)
        finally:
            env.close()
    return ann.save(out)


__all__ = ["annotate_file", "find_task"]
