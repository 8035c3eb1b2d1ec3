"""How a training/inference token sequence is laid out, shared by recipes and every runtime.

    prompt_ids                     [bos] "In: What action should the robot take to ...?\nOut:"
    + reasoning ids  (optional)    " TASK: ... GRIPPER POSITION: [...]"
    + action prefix                " ACTION:"
    + action ids                   <act_i> x (action_chunk * action_dim)
    + eos

At test time `direct` mode forces prompt + action prefix and decodes only action tokens;
`full` mode decodes reasoning freely from the prompt until the first action token.

Parallel action decoding (a model with `parallel_actions`, as OpenVLA-OFT): the inputs at the action
tokens' positions are a placeholder (the pad token) instead of the previous action token, with the
same labels. Position " ACTION:" still predicts the first action token and placeholder i the
(i+1)-th, so the runtime feeds n-1 placeholders in one pass and reads every action token at once.
"""

from __future__ import annotations

from edge_vla.tokens.reasoning import ACTION_TAG, TAGS, Reasoning

ACTION_PREFIX = " " + ACTION_TAG
# What full-mode decoding forces after the prompt for a model that learned to write reasoning:
# a reasoning-dropout model, left free, takes the short path (" ACTION:") about as often as not.
REASONING_PREFIX = " " + TAGS[0][1]
# The recipes that learn to write the reasoning (Recipe.writes_reasoning; the runtime reads it too
# for recipe.json written before `reasoning_prefix_ids` existed).
WRITES_REASONING = ("ecot", "ecot-lite-dropout", "ecot-lite-pretrain")
IGNORE = -100


def reasoning_ids(tokenizer, reasoning: Reasoning | None) -> list[int]:
    if reasoning is None or reasoning.is_empty():
        return []
    return tokenizer.encode(" " + reasoning.to_text(include_action_tag=False))


def action_prefix_ids(tokenizer) -> list[int]:
    return tokenizer.encode(ACTION_PREFIX)


def reasoning_prefix_ids(tokenizer) -> list[int]:
    return tokenizer.encode(REASONING_PREFIX)


def build_sequence(prompt_ids: list[int], middle_ids: list[int], action_ids: list[int], eos_id: int,
                   loss_on_middle: bool) -> tuple[list[int], list[int]]:
    """Concatenate the parts and mark where loss is taken (labels == ids) or not (IGNORE).

    `action_ids` is the action prefix followed by the action tokens.
    Loss is never taken on the prompt. `middle_ids` (reasoning, or filler) gets loss only when
    `loss_on_middle`; the action prefix, the action tokens and eos always do.
    """
    input_ids = list(prompt_ids) + list(middle_ids) + list(action_ids) + [eos_id]
    labels = [IGNORE] * len(prompt_ids)
    labels += list(middle_ids) if loss_on_middle else [IGNORE] * len(middle_ids)
    labels += list(action_ids) + [eos_id]
    return input_ids, labels


def placeholder_id(tokenizer) -> int:
    """The input token at action positions of a parallel-decoding model."""
    return tokenizer.pad_id


def parallel_action_inputs(input_ids: list[int], n_action_tokens: int, placeholder: int) -> list[int]:
    """`input_ids` of a build_sequence row (ending action tokens + eos) with the action tokens' inputs
    replaced by `placeholder`; the labels stay as they are."""
    if len(input_ids) < n_action_tokens + 1:
        raise ValueError(f"row of {len(input_ids)} tokens cannot hold {n_action_tokens} action tokens and eos")
    ids = list(input_ids)
    ids[-(n_action_tokens + 1):-1] = [placeholder] * n_action_tokens
    return ids
