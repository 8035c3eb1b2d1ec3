"""Training recipes: how a Sample becomes a token sequence with a loss mask, and how to decode.

One small class per recipe, registered by name in `RECIPES` (ECoT-Lite, Chen et al. 2025):

    vla                 prompt -> ACTION: actions                        decode: direct
    ecot                prompt -> reasoning -> ACTION: actions            decode: full
    ecot-lite-dropout   ecot, with the whole reasoning dropped with p      decode: direct
    ecot-lite-pretrain  stage 1 = ecot, stage 2 = vla (one run)           decode: direct
    scaffold            reasoning as input, no loss on it                 decode: direct
    thinking-tokens     prompt -> N filler tokens -> ACTION: actions      decode: direct (filler forced)

Every recipe builds its sequence with `edge_vla.tokens.sequence.build_sequence`, so the runtime
and every recipe agree on the layout. A recipe's randomness (dropout) comes from an rng the
caller seeds per (sample, epoch): the same run always sees the same sequences, which is what
makes resume exact.
"""

from __future__ import annotations

import inspect

import numpy as np

from edge_vla.config import unknown_name_error
from edge_vla.data.sample import Sample
from edge_vla.errors import EdgeVLAError
from edge_vla.tokens.action import ActionTokenizer
from edge_vla.tokens.sequence import (ACTION_PREFIX, IGNORE, WRITES_REASONING, action_prefix_ids, build_sequence,
                                      reasoning_ids, reasoning_prefix_ids)

# Full ECoT writes ~250 reasoning tokens per action with a large tokenizer; the tiny tokenizer
# splits digits (boxes, gripper points) one by one, so leave generous room.
DEFAULT_MAX_REASONING_TOKENS = 768


class Recipe:
    """Base recipe: `vla` (prompt -> action tokens). Subclasses change `middle` and decoding."""

    name = "vla"
    needs_reasoning = False  # the data must carry Reasoning
    decode_mode = "direct"  # "direct": force the inference prefix, decode actions; "full": decode freely first
    stages: tuple[str, ...] = ("main",)

    def __init__(self):
        self.options: dict = {}

    @property
    def writes_reasoning(self) -> bool:
        """The model learns to write the reasoning, so full mode can force it to start."""
        return self.name in WRITES_REASONING

    # --- the sequence ----------------------------------------------------------------------------
    def middle(self, sample: Sample, tokenizer, rng: np.random.Generator, stage: str) -> tuple[list[int], bool]:
        """Token ids between the prompt and " ACTION:", and whether loss is taken on them."""
        return [], False

    def action_loss(self, stage: str) -> bool:
        return True

    def encode(self, sample: Sample, tokenizer, action_tokenizer: ActionTokenizer, prompt_ids: list[int],
               rng: np.random.Generator, stage: str | None = None) -> dict:
        """-> {"input_ids", "labels", "attention_mask"} (lists of ints, one row, unpadded)."""
        stage = stage or self.stages[0]
        if stage not in self.stages:
            raise EdgeVLAError(f"recipe `{self.name}` has no stage `{stage}`", f"stages: {', '.join(self.stages)}")
        if self.needs_reasoning and (sample.reasoning is None or sample.reasoning.is_empty()):
            raise EdgeVLAError(
                f"recipe `{self.name}` needs reasoning but sample {sample.episode or '?'} step {sample.step} has none",
                "annotate the dataset with reasoning (ECoT JSON), or train with --recipe vla",
            )
        middle, loss_on_middle = self.middle(sample, tokenizer, rng, stage)
        acts = action_tokenizer.encode(np.asarray(sample.action)).reshape(-1).tolist()
        action_part = action_prefix_ids(tokenizer) + acts
        input_ids, labels = build_sequence(prompt_ids, middle, action_part, tokenizer.eos_id, loss_on_middle)
        if not self.action_loss(stage):
            # Mask the action prefix, the action tokens and eos (they sit at the end of the row).
            n = len(action_part) + 1
            labels = labels[:-n] + [IGNORE] * n
        return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}

    # --- test-time decoding ----------------------------------------------------------------------
    @property
    def max_free_tokens(self) -> int:
        """How many tokens the runtime may decode freely (reasoning) before the action tokens: the
        reasoning budget of any recipe whose model learns to write reasoning, full mode on demand
        (a dropout model) included; 0 for the others."""
        if not self.writes_reasoning:
            return 0
        return int(self.options.get("max_reasoning_tokens", DEFAULT_MAX_REASONING_TOKENS))

    def inference_prefix_ids(self, tokenizer) -> list[int]:
        """What is forced after the prompt at test time."""
        return action_prefix_ids(tokenizer) if self.decode_mode == "direct" else []

    def stage_at(self, step: int, total_steps: int) -> str:
        return self.stages[0]

    def stage_bounds(self, total_steps: int) -> list[tuple[str, int, int]]:
        """[(stage, first step, end step)] covering 0..total_steps (steps are 0-based, end exclusive)."""
        return [(self.stages[0], 0, total_steps)]

    def info(self, tokenizer) -> dict:
        """What the checkpoint's recipe.json records; runtime.Policy reads it to decode."""
        ids = self.inference_prefix_ids(tokenizer)
        return {
            "name": self.name,
            "options": dict(self.options),
            "decode_mode": self.decode_mode,
            "max_free_tokens": self.max_free_tokens,
            "inference_prefix": tokenizer.tokenizer.decode(ids, skip_special_tokens=False) if ids else "",
            # Exact ids too: re-encoding repeated filler text can merge tokens differently.
            "inference_prefix_ids": list(ids),
            # Forced at the start of full-mode decoding (the reasoning's first tag), or nothing.
            "reasoning_prefix_ids": reasoning_prefix_ids(tokenizer) if self.writes_reasoning else [],
        }


def _probability(name: str, value, recipe: str) -> float:
    try:
        p = float(value)
    except (TypeError, ValueError):
        p = -1.0
    if not 0.0 <= p <= 1.0:
        raise EdgeVLAError(f"recipe `{recipe}`: option {name} must be a probability in [0, 1], got {value!r}")
    return p


class VLARecipe(Recipe):
    """The standard VLA baseline: prompt -> action tokens."""

    name = "vla"


class ECoTRecipe(Recipe):
    """Full embodied chain-of-thought: the model writes all reasoning, then acts (slow at test time)."""

    name = "ecot"
    needs_reasoning = True
    decode_mode = "full"

    def __init__(self, max_reasoning_tokens: int = DEFAULT_MAX_REASONING_TOKENS):
        super().__init__()
        self.options = {"max_reasoning_tokens": int(max_reasoning_tokens)}

    def middle(self, sample, tokenizer, rng, stage):
        return reasoning_ids(tokenizer, sample.reasoning), True


class ReasoningDropoutRecipe(Recipe):
    """ECoT-Lite reasoning dropout: keep the whole reasoning with probability 1-p, else none.

    One model learns both paths: it acts directly at test time (fast), and can still reason
    on demand (decode in `full` mode). With `per_tag=True` each ECoT tag is dropped on its own
    with probability p instead (a sample can keep e.g. the plan but lose the boxes). With
    `per_batch=True` the draw is shared by a whole micro-batch: a batch is then all-short or
    all-long. (Per-sample draws no longer pad short rows to the reasoning length: the training
    loop's split_by_length runs each micro-batch's short and long rows as separate groups.)
    """

    name = "ecot-lite-dropout"
    needs_reasoning = True
    decode_mode = "direct"

    def __init__(self, p: float = 0.5, per_tag: bool = False, per_batch: bool = False,
                 max_reasoning_tokens: int = DEFAULT_MAX_REASONING_TOKENS):
        super().__init__()
        self.options = {"p": _probability("p", p, self.name), "per_tag": bool(per_tag), "per_batch": bool(per_batch),
                        "max_reasoning_tokens": int(max_reasoning_tokens)}

    @property
    def draws_per_batch(self) -> bool:
        return self.options["per_batch"]

    def middle(self, sample, tokenizer, rng, stage):
        p = self.options["p"]
        if self.options["per_tag"]:
            return reasoning_ids(tokenizer, sample.reasoning.drop_tags(p, rng)), True
        if rng.random() < p:
            return [], True
        return reasoning_ids(tokenizer, sample.reasoning), True


class ReasoningPretrainRecipe(Recipe):
    """ECoT-Lite reasoning pre-training, both stages in one run.

    Stage `reasoning` (the first `stage1_fraction` of the steps) trains the full ECoT sequence.
    Choice: by default it takes loss on the actions too (`stage1_action_loss=True`), i.e. stage 1
    is exactly the `ecot` objective, as the paper pre-trains on the full reasoning data; with
    False it learns only the reasoning text. Stage `actions` then fine-tunes on prompt -> actions
    (the `vla` sequence), and the policy acts directly at test time. The learning-rate schedule
    restarts (warmup + cosine) at the stage boundary, as two separate runs would.
    """

    name = "ecot-lite-pretrain"
    needs_reasoning = True
    decode_mode = "direct"
    stages = ("reasoning", "actions")

    def __init__(self, stage1_fraction: float = 0.5, stage1_action_loss: bool = True):
        super().__init__()
        f = float(stage1_fraction)
        if not 0.0 < f < 1.0:
            raise EdgeVLAError(f"recipe `{self.name}`: stage1_fraction must be in (0, 1), got {stage1_fraction!r}")
        self.options = {"stage1_fraction": f, "stage1_action_loss": bool(stage1_action_loss)}

    def middle(self, sample, tokenizer, rng, stage):
        if stage == "reasoning":
            return reasoning_ids(tokenizer, sample.reasoning), True
        return [], False

    def action_loss(self, stage):
        return stage == "actions" or self.options["stage1_action_loss"]

    def stage_bounds(self, total_steps):
        split = min(max(1, round(self.options["stage1_fraction"] * total_steps)), max(total_steps - 1, 1))
        return [("reasoning", 0, split), ("actions", split, total_steps)]

    def stage_at(self, step, total_steps):
        for name, lo, hi in self.stage_bounds(total_steps):
            if lo <= step < hi:
                return name
        return self.stages[-1]


class ScaffoldRecipe(Recipe):
    """Reasoning scaffolding: reasoning sits in the input, with no loss on it.

    The model may attend to the reasoning but is never trained to write it, so at test time it
    cannot produce it and acts directly. To make that direct path part of training, the
    reasoning is left out of the input with probability `p` (default 0.5; p=0 is the pure
    scaffold, whose direct-mode test is then out of distribution).
    """

    name = "scaffold"
    needs_reasoning = True
    decode_mode = "direct"

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.options = {"p": _probability("p", p, self.name)}

    def middle(self, sample, tokenizer, rng, stage):
        if rng.random() < self.options["p"]:
            return [], False
        return reasoning_ids(tokenizer, sample.reasoning), False


# Filler candidates, in order of preference. The runtime re-encodes recipe.json's
# `inference_prefix` text, so the filler must be one token that does not merge with itself
# when repeated ("...." is one token in many BPE vocabularies; " . . ." stays split).
FILLER_CANDIDATES = (".", " .", " -", " _")
FILLER_TEXT = FILLER_CANDIDATES[0]


class ThinkingTokensRecipe(Recipe):
    """N filler tokens before the action: extra computation without reasoning content
    (the paper's expressivity control). The filler is forced at test time, so no loss on it."""

    name = "thinking-tokens"
    decode_mode = "direct"

    def __init__(self, n: int = 32):
        super().__init__()
        if int(n) < 1:
            raise EdgeVLAError(f"recipe `{self.name}`: option n (filler tokens) must be >= 1, got {n!r}")
        self.options = {"n": int(n)}

    @staticmethod
    def filler_id(tokenizer) -> int:
        prefix = action_prefix_ids(tokenizer)
        for text in FILLER_CANDIDATES:
            ids = tokenizer.encode(text)
            if len(ids) == 1 and tokenizer.encode(text * 4 + ACTION_PREFIX) == ids * 4 + prefix:
                return ids[0]
        raise EdgeVLAError("no filler token of this tokenizer survives repetition unmerged "
                           f"(tried {list(FILLER_CANDIDATES)})", "use another recipe or tokenizer")

    def middle(self, sample, tokenizer, rng, stage):
        return [self.filler_id(tokenizer)] * self.options["n"], False

    def inference_prefix_ids(self, tokenizer):
        return [self.filler_id(tokenizer)] * self.options["n"] + action_prefix_ids(tokenizer)


RECIPES: dict[str, type[Recipe]] = {
    cls.name: cls
    for cls in (VLARecipe, ECoTRecipe, ReasoningDropoutRecipe, ReasoningPretrainRecipe, ScaffoldRecipe, ThinkingTokensRecipe)
}


def recipe_options(name: str) -> dict:
    """The options a recipe takes, with their defaults."""
    cls = _recipe_class(name)
    return {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items() if k != "self"}


def _recipe_class(name: str) -> type[Recipe]:
    if name not in RECIPES:
        raise unknown_name_error("recipe", name, RECIPES)
    return RECIPES[name]


def get_recipe(name: str, **options) -> Recipe:
    cls = _recipe_class(name)
    valid = recipe_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise EdgeVLAError(f"recipe `{name}` has no option(s) {unknown}",
                           f"its options: {', '.join(f'{k}={v!r}' for k, v in valid.items()) or 'none'}")
    return cls(**options)


__all__ = ["RECIPES", "Recipe", "get_recipe", "recipe_options", "FILLER_TEXT"]
