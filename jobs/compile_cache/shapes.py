"""Does an inference request fit the static shape its compiled artifact was built for?

Neuron artifacts have static shapes: the prompt plus the generated tokens must fit
the compiled sequence length (optimum-neuron export_model.mdx: "the maximum number
of tokens (input + generated) cannot exceed the sequence_length used during
export"). We say so at submit, as a 400 naming the prompt, instead of failing
(or truncating) on the host."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from jobs.assets import storage
from jobs.models import ModelAsset


class ShapeMismatch(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@lru_cache(maxsize=16)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def tokenizer_dir(model: ModelAsset) -> Path:
    """A traced artifact keeps its tokenizer in tokenizer/; an Optimum Neuron export beside
    the exported model, in neuron_model/."""
    root = storage.abs_path(model.path)
    root = root if root.is_dir() else root.parent
    traced = root / "tokenizer"
    return traced if traced.is_dir() else root / "neuron_model"


def check_prompts_fit(model: ModelAsset, prompts: list[str], max_new_tokens: int) -> None:
    """Raise ShapeMismatch if a prompt + max_new_tokens exceeds the artifact's sequence length."""
    meta = model.meta or {}
    seq = meta.get("sequence_length")
    if not model.is_compiled or not seq or meta.get("task") == "text-to-image":
        return
    if meta.get("task") in ("feature-extraction", "text-classification"):
        raise ShapeMismatch("model", f"{model} is a {meta['task']} artifact; inference jobs run text-generation "
                                     f"and text-to-image artifacts")
    if max_new_tokens >= seq:
        raise ShapeMismatch("max_new_tokens", f"max_new_tokens {max_new_tokens} does not fit: {model} was compiled "
                                              f"for sequence_length {seq} (prompt and new tokens together)")
    folder = tokenizer_dir(model)
    if not folder.is_dir():
        return  # the backend reports a broken artifact
    tokenizer = _tokenizer(str(folder))
    for index, prompt in enumerate(prompts, 1):
        count = len(tokenizer(prompt)["input_ids"])
        if count + max_new_tokens > seq:
            raise ShapeMismatch("prompts", f"prompt {index} is {count} tokens; with max_new_tokens {max_new_tokens} "
                                           f"it needs {count + max_new_tokens} positions, but {model} was compiled for "
                                           f"sequence_length {seq}. Shorten it, lower max_new_tokens, or compile "
                                           f"a longer sequence_length")
