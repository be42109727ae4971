"""Prompts and tokens with the `tokenizers` library only (no transformers needed at run time)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sts_export.errors import StsError
from sts_export.recipe import Recipe

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]  # ids 0..4 in synthetic tokenizers
_CORPUS = """
What is shown in this image? Describe the image in detail. How many people are in the picture?
What color is the car? Is there a dog in the image? Answer the question using a single word or phrase.
The image shows a cat sitting on a wooden table next to a cup of coffee. A man is riding a bicycle
down a busy street in the city. There are two red apples and a banana in a bowl. The sky is blue and
the grass is green. A group of children are playing football in the park on a sunny afternoon.
Where is the train going? What is the woman holding? Is the light on or off? Which animal is larger?
Yes. No. One. Two. Three. Left. Right. Red, green, blue, yellow, black, white. USER: ASSISTANT:
"""


VISION_SPECIALS = ("<|vision_start|>", "<|vision_end|>")  # Qwen2.5-VL's marks around the image pads


def synthetic_specials(recipe: Recipe) -> list[str]:
    """Special tokens of a synthetic tokenizer, in id order: SPECIALS (0..4), then the recipe's vision
    start/end marks where it has them (<|vision_start|> = 5, <|vision_end|> = 6)."""
    marks = [(recipe.vision_start_token_id, VISION_SPECIALS[0]), (recipe.vision_end_token_id, VISION_SPECIALS[1])]
    return SPECIALS + [name for i, name in sorted(marks) if i >= 0]


def build_synthetic_tokenizer(recipe: Recipe, out: Path) -> None:
    """Train a small byte-level BPE tokenizer on a fixed corpus; specials at ids 0..4 (+ vision marks) (SYNTHETIC)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = synthetic_specials(recipe)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    vocab = min(recipe.text.vocab_size, 1024)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    ids = {s: tok.token_to_id(s) for s in specials}
    want = {"<s>": recipe.bos_token_id, "</s>": recipe.eos_token_id, "<pad>": recipe.pad_token_id, "<image>": recipe.image_token_id,
            VISION_SPECIALS[0]: recipe.vision_start_token_id, VISION_SPECIALS[1]: recipe.vision_end_token_id}
    want = {k: v for k, v in want.items() if k in ids}
    if any(ids[k] != v for k, v in want.items()):
        raise StsError(f"synthetic tokenizer special ids {ids} do not match recipe {want}")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", recipe.bos_token_id)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>",
        "extra_special_tokens": {"image_token": "<image>", **{n.strip("<|>"): n for n in specials[len(SPECIALS):]}},
        "model_max_length": recipe.max_context,
    }, indent=2))


@dataclass
class Prompt:
    """A tokenized single-image prompt: prefix ids, the image slot, suffix ids."""

    prefix: np.ndarray  # [P] int64 (BOS + text before <image>)
    suffix: np.ndarray  # [T] int64 (text after <image>)

    @property
    def image_start(self) -> int:
        return len(self.prefix)


class TextTokenizer:
    """Wraps tokenizer.json; encodes prompts around the single <image> token and decodes answers."""

    def __init__(self, path: Path, recipe: Recipe) -> None:
        from tokenizers import Tokenizer

        f = Path(path) / "tokenizer.json"
        if not f.is_file():
            raise StsError(f"{path}: no tokenizer.json; pass token ids with --input-ids instead of --prompt")
        self.tok = Tokenizer.from_file(str(f))
        self.recipe = recipe
        image = recipe.image_token  # the tokenizer's text of the image token (Qwen: <|image_pad|>)
        if self.tok.token_to_id(image) != recipe.image_token_id:
            raise StsError(
                f"{f}: {image} token id {self.tok.token_to_id(image)} differs from the recipe's {recipe.image_token_id}"
            )

    def encode_prompt(self, text: str) -> Prompt:
        """Apply the recipe's template (its <image> slot = the recipe's image token) and split the ids at it."""
        if not text or not text.strip():
            raise StsError("the prompt is empty; pass a question about the image")
        image = self.recipe.image_token
        if "<image>" in text or image in text:
            raise StsError(f"the prompt must not contain '{image}'; the image is placed by the template")
        templated = self.recipe.prompt_template.replace("<image>", image).replace("{prompt}", text)
        ids = np.asarray(self.tok.encode(templated).ids, dtype=np.int64)
        return split_ids(ids, self.recipe)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def split_ids(ids: np.ndarray, recipe: Recipe) -> Prompt:
    """Split a token sequence holding exactly one image token into prefix/suffix (whether it fits with its image
    is `check_prompt_fits`'s, once the image's tokens are known)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    where = np.flatnonzero(ids == recipe.image_token_id)
    if len(where) != 1:
        raise StsError(f"the input ids must hold exactly one image token (id {recipe.image_token_id}), found {len(where)}")
    if len(ids) - 1 >= recipe.max_prompt_tokens:
        raise StsError(f"prompt too long: {len(ids) - 1} text tokens leave no room for the image within "
                       f"max_prompt_tokens={recipe.max_prompt_tokens} of recipe '{recipe.name}'; shorten the prompt")
    i = int(where[0])
    return Prompt(prefix=ids[:i], suffix=ids[i + 1:])


def check_prompt_fits(recipe: Recipe, prompt: Prompt, image_tokens: int, new_tokens: int = 0) -> None:
    """Refuse in one line a prompt whose tokens entering the decoder (its text + `image_tokens`: this image's K, or
    its whole span where Stage 1 keeps it) exceed max_prompt_tokens, or with `new_tokens` exceed max_context.
    Where that limit is the model's context (text.max_position_embeddings), the line names it."""
    text = len(prompt.prefix) + len(prompt.suffix)
    context = recipe.text.max_position_embeddings
    s1 = text + image_tokens
    for total, limit, key in ((s1, recipe.max_prompt_tokens, "max_prompt_tokens"),
                              (s1 + new_tokens, recipe.max_context, "max_context")):
        if total <= limit:
            continue
        new = f" + {new_tokens} new" if key == "max_context" else ""
        head = f"prompt too long: {text} text + {image_tokens} image{new} tokens = {total}"
        if limit >= context:
            raise StsError(f"{head} exceed the model's context of {context} tokens ({recipe.name}); use a smaller "
                           "image, a smaller pruning budget or fewer tokens")
        raise StsError(f"{head} exceed {key}={limit} of recipe '{recipe.name}' (the model's context is {context}); "
                       "use a smaller image, a smaller pruning budget or fewer tokens")


def text_ids(recipe: Recipe, n: int = 5) -> list[int]:
    """Stand-in text ids of a raw prompt (no tokenizer): the first `n` ids from 5 on that are no special id."""
    special = {recipe.image_token_id, recipe.vision_start_token_id, recipe.vision_end_token_id, recipe.bos_token_id,
               recipe.eos_token_id, recipe.pad_token_id, *recipe.stop_token_ids}
    return [i for i in range(5, recipe.text.vocab_size) if i not in special][:n]


def raw_prompt_note(ids: np.ndarray | list[int], recipe: Recipe) -> str:
    """The one line that says a raw prompt (the family's `raw_prompt_ids`) stands in for a missing tokenizer."""
    image = ("<|vision_start|>, one <|image_pad|>, <|vision_end|>" if recipe.vision_start_token_id >= 0
             else "one image token")
    return (f"no tokenizer.json: the prompt is the raw ids {[int(i) for i in ids]}, built from the config's token "
            f"ids ({image}, stand-in text ids around it); pass --input-ids for your own")


def cli_input_ids(prompt: str | None, input_ids: str | None, raw_fallback: bool = False) -> list[int] | None:
    """--input-ids '1,32000,...' as a list (None when a --prompt is used, or when neither is given and
    `raw_fallback`: the model has no tokenizer and takes `raw_prompt_ids`); else one of the two is required."""
    if input_ids:
        try:
            return [int(t) for t in input_ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise StsError("--input-ids must be comma-separated integers") from None
    if prompt is None and not raw_fallback:
        raise StsError("pass --prompt TEXT (or --input-ids when there is no tokenizer)")
    return None
