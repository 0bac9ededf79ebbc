"""The embedded demo task and its character-level tokenizer, both shipped in assets/.

Instructions over short random strings ("reverse: kfbd" -> "dbfk", also copy, sort and
shift-by-one). A random-init model starts at chance (about 1 in 16 per character,
0% exact matches) and a few minutes of CPU training take it far above that, so the
default job shows learning without a network or a pretrained model.

`python -m launcher.demo_task` regenerates the shipped files; a test checks that the
shipped files are exactly what this module generates.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
TOKENIZER_DIR = ASSETS / "tokenizer"
DEMO_DIR = ASSETS / "demo"

LETTERS = "abcdefghijklmnop"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
# Every character a prompt, a completion or the chat fallback template can contain.
CHARACTERS = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789 :\n->.,?!'\"()[]{}+*/=_#|<"))

TASKS = {
    "copy": lambda s: s,
    "reverse": lambda s: s[::-1],
    "sort": lambda s: "".join(sorted(s)),
    "shift": lambda s: "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in s),
}


def make_example(rng: random.Random) -> dict[str, str]:
    task = rng.choice(sorted(TASKS))
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 7)))
    return {"prompt": f"{task}: {word}\n", "completion": TASKS[task](word)}


def make_splits(n_train: int = 30000, n_eval: int = 500, seed: int = 0) -> tuple[list, list]:
    """Train and eval examples; no eval prompt appears in train."""
    rng = random.Random(seed)
    train = [make_example(rng) for _ in range(n_train)]
    seen = {ex["prompt"] for ex in train}
    held_out = []
    while len(held_out) < n_eval:
        ex = make_example(rng)
        if ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            held_out.append(ex)
    return train, held_out


def build_tokenizer():
    """A character-level fast tokenizer that AutoTokenizer loads from a directory."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # newlines too
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def write_assets() -> None:
    build_tokenizer().save_pretrained(TOKENIZER_DIR)
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    for name, rows in zip(("train", "eval"), make_splits()):
        with open(DEMO_DIR / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    write_assets()
