"""Check that lerobot's own `LeRobotDataset` loads what `edge-vla data export-lerobot` writes.

lerobot does not fit edge-vla's venv (lerobot 0.5+ needs Python >= 3.12; 0.4 pulls numpy 2), so
this runs in two venvs:

    # 1. in edge-vla's venv: export demos and dump what edge-vla reads from the SOURCE demos
    .venv/bin/edge-vla data export-lerobot DATA -o OUT
    .venv/bin/python scripts/check_lerobot_compat.py dump DATA expected.npz

    # 2. in a Python 3.12 venv with lerobot:
    #    python3.12 -m venv /work/lerobot-venv && /work/lerobot-venv/bin/pip install "lerobot[dataset]==0.6.1"
    /work/lerobot-venv/bin/python scripts/check_lerobot_compat.py check OUT expected.npz

`check` loads OUT with lerobot.datasets.lerobot_dataset.LeRobotDataset, reads every frame through
its __getitem__ (its own video decoding), and compares state, action, task, reasoning (exact)
and both cameras (mean absolute error, AV1 tolerance) with the source. Exit 0 and a last line
"COMPATIBLE ..." when everything matches.
"""

import json
import sys

import numpy as np

CAMERAS = {"agentview": "observation.images.image", "wrist": "observation.images.wrist_image"}
MAX_MEAN_ABS_ERR = 8.0  # per frame, in 0..255 units: AV1 at crf 30 on small smooth frames stays far below


def dump(data: str, out: str) -> None:
    from edge_vla.data.dataset import open_dataset

    ds = open_dataset(data, split="all", drop_noops=False, cameras=None, val_fraction=0.0)
    arrays = {"state": [], "action": [], "episode": [], "task": [], "reasoning": []}
    arrays.update({c: [] for c in ds.cameras})
    starts = np.cumsum([0] + [len(e.steps) for e in ds.episodes])
    for ei in range(len(ds.episodes)):
        for i in range(starts[ei], starts[ei + 1]):
            s = ds[int(i)]
            arrays["state"].append(s.state)
            arrays["action"].append(s.action)
            arrays["episode"].append(ei)
            arrays["task"].append(s.instruction)
            arrays["reasoning"].append(json.dumps(s.reasoning.to_dict()) if s.reasoning is not None else "")
            for c in ds.cameras:
                arrays[c].append(s.images[c])
    np.savez_compressed(out, **{k: np.asarray(v) for k, v in arrays.items()})
    print(f"wrote {out}: {len(arrays['state'])} frames, cameras {', '.join(ds.cameras)}")


def check(root: str, expected: str) -> int:
    import torch
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    import lerobot

    exp = np.load(expected)
    ds = LeRobotDataset(repo_id="edge-vla/export", root=root)
    problems = []
    n = len(exp["state"])
    if len(ds) != n:
        problems.append(f"{len(ds)} frames, expected {n}")
    errs = {c: [] for c in CAMERAS if c in exp}
    for i in range(min(len(ds), n)):
        item = ds[i]
        if not np.array_equal(item["observation.state"].numpy(), exp["state"][i]):
            problems.append(f"frame {i}: state differs")
        if not np.array_equal(item["action"].numpy(), exp["action"][i]):
            problems.append(f"frame {i}: action differs")
        if int(item["episode_index"]) != int(exp["episode"][i]):
            problems.append(f"frame {i}: episode {int(item['episode_index'])}, expected {int(exp['episode'][i])}")
        if item["task"] != str(exp["task"][i]):
            problems.append(f"frame {i}: task {item['task']!r}, expected {str(exp['task'][i])!r}")
        if "reasoning" in item and item["reasoning"] != str(exp["reasoning"][i]):
            problems.append(f"frame {i}: reasoning differs")
        for c in errs:
            img = item[CAMERAS[c]]  # float (3, H, W) in [0, 1]
            hwc = (img.permute(1, 2, 0).numpy() * 255.0).round()
            errs[c].append(float(np.abs(hwc - exp[c][i].astype(np.float64)).mean()))
    for c, e in errs.items():
        if e and max(e) > MAX_MEAN_ABS_ERR:
            problems.append(f"camera {c}: worst frame's mean abs error {max(e):.2f} > {MAX_MEAN_ABS_ERR}")
    for p in problems[:20]:
        print("MISMATCH", p)
    err_txt = ", ".join(f"{c} mean abs err {np.mean(e):.2f} (worst frame {max(e):.2f})" for c, e in errs.items() if e)
    if problems:
        print(f"INCOMPATIBLE: {len(problems)} problem(s)")
        return 1
    print(f"COMPATIBLE: lerobot {lerobot.__version__} (torch {torch.__version__}) loaded {len(ds)} frames, "
          f"{ds.meta.total_episodes} episodes, {ds.meta.total_tasks} tasks; state, action, task, reasoning exact; {err_txt}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("dump", "check"):
        print(__doc__)
        sys.exit(2)
    if sys.argv[1] == "dump":
        dump(sys.argv[2], sys.argv[3])
    else:
        sys.exit(check(sys.argv[2], sys.argv[3]))
