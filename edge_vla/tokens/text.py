"""The text tokenizer: a `tokenizers.Tokenizer` plus the ids edge-vla needs.

numpy and `tokenizers` only: checkpoints, bundles and the torch-free runtime read it alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


from edge_vla.errors import EdgeVLAError
from edge_vla.tokens.action import action_token_strings
from edge_vla.tokens.reasoning import TAGS

SPECIAL_FILE = "edge_vla_tokens.json"
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"

# Words the tiny tokenizer must know well even before it sees a dataset: ECoT's tags, the
# movement primitives and the phrasing of the reasoning annotator, and numbers.
BASE_CORPUS = [
    *(tag for _, tag, _ in TAGS),
    "ACTION:",
    "In: What action should the robot take to",
    "move forward move backward move left move right move up move down",
    "rotate clockwise rotate counterclockwise tilt up tilt down stop",
    "close gripper open gripper",
    "move left down, move right up, move forward left, move backward right",
    "pick up the put it in the basket on the plate in the tray on top of the shelf cabinet drawer",
    "open the close the turn on the stove microwave",
    "the gripper is above the object, it needs to descend, grasp, lift, carry, place and release it",
    "the object is grasped, the robot should lift it and carry it to the target",
    "1. 2. 3. 4. 5. 6. 7. 8. 9. 10.",
    " ".join(str(i) for i in range(0, 256)),
]


@dataclass
class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the ids edge-vla needs (bos/eos/pad and the action block)."""

    tokenizer: object  # tokenizers.Tokenizer
    bos_id: int | None
    eos_id: int
    pad_id: int
    first_action_id: int
    n_bins: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if not (self.first_action_id <= int(i) < self.first_action_id + self.n_bins)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def train_tiny(cls, texts: list[str], vocab_size: int = 1024, n_bins: int = 256) -> "TextTokenizer":
        """Train a byte-level BPE (digits split one by one) on the base corpus plus `texts`."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[PAD, BOS, EOS, UNK],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator([*BASE_CORPUS, *texts], trainer=trainer)
        return cls._with_action_tokens(tok, bos=BOS, eos=EOS, pad=PAD, n_bins=n_bins)

    @classmethod
    def from_hf(cls, path: str, n_bins: int = 256) -> "TextTokenizer":
        """A Hugging Face tokenizer (local dir or hub id) with the action tokens added."""
        try:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise EdgeVLAError(
                f"could not load a tokenizer from `{path}` ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                "pass a local directory with tokenizer files or a reachable hub id",
            ) from None
        if not getattr(hf, "is_fast", False):
            raise EdgeVLAError(f"the tokenizer at `{path}` has no fast (tokenizer.json) version", "use a fast tokenizer")
        tok = hf.backend_tokenizer
        eos = hf.eos_token or hf.pad_token
        pad = hf.pad_token or eos
        if eos is None:
            raise EdgeVLAError(f"the tokenizer at `{path}` has no eos token", "pick a causal-LM tokenizer")
        return cls._with_action_tokens(tok, bos=hf.bos_token, eos=eos, pad=pad, n_bins=n_bins)

    @classmethod
    def _with_action_tokens(cls, tok, bos, eos, pad, n_bins) -> "TextTokenizer":
        from tokenizers import AddedToken

        strings = action_token_strings(n_bins)
        existing = tok.token_to_id(strings[0])
        if existing is None:
            tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in strings])
        ids = [tok.token_to_id(s) for s in strings]
        if ids != list(range(ids[0], ids[0] + n_bins)):
            raise EdgeVLAError("the action tokens did not get contiguous ids", "start from a tokenizer without <act_i> tokens")
        return cls(
            tokenizer=tok,
            bos_id=tok.token_to_id(bos) if bos else None,
            eos_id=tok.token_to_id(eos),
            pad_id=tok.token_to_id(pad),
            first_action_id=ids[0],
            n_bins=n_bins,
        )

    # --- disk ------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(d / "tokenizer.json"))
        special = dict(bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id,
                       first_action_id=self.first_action_id, n_bins=self.n_bins)
        (d / SPECIAL_FILE).write_text(json.dumps(special, indent=2))
        # Lets users open it with transformers' AutoTokenizer too.
        id_to = self.tokenizer.id_to_token
        hf_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": id_to(self.eos_id),
                  "pad_token": id_to(self.pad_id), "model_max_length": 1 << 20}
        if self.bos_id is not None:
            hf_cfg["bos_token"] = id_to(self.bos_id)
        (d / "tokenizer_config.json").write_text(json.dumps(hf_cfg, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> "TextTokenizer":
        from tokenizers import Tokenizer

        d = Path(directory)
        tj, sj = d / "tokenizer.json", d / SPECIAL_FILE
        for f in (tj, sj):
            if not f.is_file():
                raise EdgeVLAError(f"tokenizer file missing: {f}", "re-save the checkpoint (save_pretrained writes tokenizer/)")
        try:
            tok = Tokenizer.from_file(str(tj))
            special = json.loads(sj.read_text())
            return cls(tokenizer=tok, **{k: special[k] for k in ("bos_id", "eos_id", "pad_id", "first_action_id", "n_bins")})
        except Exception as e:
            raise EdgeVLAError(f"tokenizer in {d} is malformed ({type(e).__name__}: {e})", "re-save the checkpoint") from None
