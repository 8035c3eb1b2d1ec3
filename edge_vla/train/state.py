"""The resumable training state, in files that cannot run code: safetensors and JSON, no pickle.

    out/state/
      trainer.json            the step, the run's clock, what a resume must match, `state_format`
      model.safetensors       every weight (frozen ones and LoRA adapters included)
      optimizer.json + .safetensors   the optimizer's state_dict: its tensors, and the rest as JSON
      scheduler.json          the LR scheduler's state_dict
      rng_<rank>.json + .safetensors  Python, NumPy and torch (CPU, CUDA) generators of each process,
                              and accelerate's step counter

A state_dict is split into a JSON skeleton and its tensors: JSON keeps the key types (the
optimizer's integer parameter ids) and tuples, and Python's float repr reads back to the same
bits, so a resumed run continues bit for bit. Reading a damaged or foreign file is one line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from edge_vla.errors import EdgeVLAError

STATE_FORMAT = "edge-vla-train-state/2"  # 1: accelerate's save_state (pickles), refused
MODEL_FILE = "model.safetensors"
OPTIMIZER = "optimizer"
SCHEDULER = "scheduler"
LEGACY_DIR = "accelerate"


def _damaged(path: Path, e: BaseException) -> EdgeVLAError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return EdgeVLAError(f"training state file {path} cannot be read ({first})",
                        f"the state is damaged: restore {path.parent} from a copy, or delete it to start over")


# --- state_dict <-> JSON skeleton + tensors --------------------------------------------------------
def _split(obj, key: str, tensors: dict):
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(obj, np.ndarray):
        return {"ndarray": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {"dict": [[k, _split(v, f"{key}.{i}", tensors)] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [_split(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
        return {"tuple": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in the training state")


def _join(node, tensors: dict):
    if isinstance(node, list):
        return [_join(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "ndarray" in node:
        return np.asarray(node["ndarray"], dtype=node["dtype"])
    if "tuple" in node:
        return tuple(_join(v, tensors) for v in node["tuple"])
    return {k: _join(v, tensors) for k, v in node["dict"]}


def save_tree(obj, stem: Path) -> None:
    """`obj` (a state_dict: dicts, lists, tuples, tensors, numbers) as stem.json (+ stem.safetensors)."""
    from safetensors.torch import save_file

    tensors: dict = {}
    skeleton = _split(obj, "t", tensors)
    if tensors:
        save_file(tensors, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps(skeleton))


def load_tree(stem: Path):
    from safetensors.torch import load_file

    f = stem.with_suffix(".json")
    try:
        skeleton = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise _damaged(f, e) from None
    tensors = {}
    st = stem.with_suffix(".safetensors")
    if st.exists():
        try:
            tensors = load_file(str(st))
        except Exception as e:  # safetensors' own error type, OSError, or a bad header's ValueError
            raise _damaged(st, e) from None
    try:
        return _join(skeleton, tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _damaged(f, e) from None


# --- the state -------------------------------------------------------------------------------------
def _rng_state(accelerator) -> dict:
    s = {"step": accelerator.step, "python": random.getstate(), "numpy": np.random.get_state(),
         "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["torch_cuda"] = torch.cuda.get_rng_state_all()
    return s


def write_state(directory: Path, accelerator, model, optimizer, scheduler) -> None:
    """Every process writes its generators; the main process the weights, optimizer and scheduler.
    The caller synchronises the processes around it and writes trainer.json last."""
    from safetensors.torch import save_model

    save_tree(_rng_state(accelerator), directory / f"rng_{accelerator.process_index}")
    if accelerator.is_main_process:
        save_model(model, str(directory / MODEL_FILE))
        save_tree(optimizer.state_dict(), directory / OPTIMIZER)
        save_tree(scheduler.state_dict(), directory / SCHEDULER)


def read_state(directory: Path, accelerator, model, optimizer, scheduler) -> None:
    """Load what write_state wrote into the live objects; anything damaged or foreign is one line."""
    from safetensors.torch import load_model

    if (directory / LEGACY_DIR).is_dir() and not (directory / MODEL_FILE).exists():
        raise EdgeVLAError(f"{directory} was saved by an earlier edge-vla as pickles (accelerate's save_state), "
                           "which this version does not load: a pickle can run code",
                           "resume it with the edge-vla that wrote it, or train again into a new --out")
    f = directory / MODEL_FILE
    try:
        load_model(model, str(f), strict=True, device=str(accelerator.device))
    except Exception as e:  # a damaged file (safetensors' error, OSError) or another model (RuntimeError)
        raise _damaged(f, e) from None
    for name, obj in ((OPTIMIZER, optimizer), (SCHEDULER, scheduler)):
        sd = load_tree(directory / name)
        try:
            obj.load_state_dict(sd)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise _damaged(directory / f"{name}.json", e) from None
    stem = directory / f"rng_{accelerator.process_index}"
    rng = load_tree(stem)
    try:
        accelerator.step = int(rng["step"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["torch_cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise _damaged(stem.with_suffix(".json"), e) from None


__all__ = ["STATE_FORMAT", "write_state", "read_state", "save_tree", "load_tree"]
