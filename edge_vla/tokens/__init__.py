from edge_vla.tokens.action import ActionStats, ActionTokenizer, action_token_strings
from edge_vla.tokens.reasoning import ACTION_TAG, TAGS, Reasoning, build_prompt

__all__ = ["ActionStats", "ActionTokenizer", "action_token_strings", "Reasoning", "TAGS", "ACTION_TAG", "build_prompt"]
