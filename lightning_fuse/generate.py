"""``lightning-fuse generate``: continue prompts with a fused target (an exported folder or a checkpoint).

Example::

    lightning-fuse generate --model fused-model --prompts '["def main(", "Copyright"]' --max_new_tokens 30
    lightning-fuse generate --model runs/demo/tensorboard/version_0/checkpoints/last.ckpt --prompts+ "import os"

    from lightning_fuse.generate import generate
    texts = generate("fused-model", ["def main("], temperature=0.8, seed=1)
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def load_for_generation(model: str) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """``(causal LM in eval mode, tokenizer)`` from an exported folder, a hub id or a ``lightning-fuse`` checkpoint."""
    from lightning_fuse.sources import load_causal_lm, load_tokenizer, resolve_path

    path = resolve_path(model)
    if os.path.isfile(path):
        from lightning_fuse.export import load_module

        module = load_module(path)  # target + selector; the sources are not loaded
        return module.target.eval(), module.tokenizer
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"`--model` {model!r} is a folder without config.json. Pass a folder written by `lightning-fuse export` "
            "(or any Hugging Face causal LM folder) or a `.ckpt` written by `lightning-fuse fit`."
        )
    return load_causal_lm(path, "model").eval(), load_tokenizer(path, "model tokenizer")


def generate(
    model: str,
    prompts: list[str],
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[str]:
    """Continue each prompt with the model and print prompt and continuation; returns the continuations.

    Args:
        model: folder written by ``lightning-fuse export`` (or any Hugging Face causal LM folder or hub id), or a
            ``.ckpt`` written by ``lightning-fuse fit`` (its fused target is used).
        prompts: texts to continue, e.g. ``--prompts '["def main(", "Copyright"]'`` or ``--prompts+ "def main("``.
        max_new_tokens: tokens generated per prompt at most (generation also stops at the end-of-text token).
        temperature: 0 = greedy decoding; > 0 samples from the softmax at this temperature.
        seed: seed of the sampling (unused when greedy); the global RNG state is left unchanged.

    Raises:
        ValueError: no prompts, ``max_new_tokens < 1`` or ``temperature < 0``.
        FileNotFoundError: ``model`` is neither a checkpoint nor a model folder.
    """
    problems = []
    if not prompts:
        problems.append("`--prompts` is empty: give at least one prompt, e.g. `--prompts '[\"def main(\"]'`.")
    if max_new_tokens < 1:
        problems.append(f"`--max_new_tokens` must be >= 1, got {max_new_tokens}.")
    if temperature < 0:
        problems.append(f"`--temperature` must be >= 0 (0 = greedy), got {temperature}.")
    if problems:
        raise ValueError("\n".join(problems))
    lm, tokenizer = load_for_generation(model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lm.to(device)
    sample = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        **({"temperature": temperature, "top_k": 0, "top_p": 1.0} if sample else {}),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    positions = getattr(lm.config, "max_position_embeddings", None)
    continuations = []
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device.index or 0]), torch.no_grad():
        torch.manual_seed(seed)
        for prompt in prompts:
            ids = _prompt_ids(tokenizer, prompt, positions, max_new_tokens).to(device)
            out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
            text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            continuations.append(text)
            print(f"=== {prompt!r}\n{prompt}{text}\n", flush=True)
    return continuations


def _prompt_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: str, positions: int | None, new: int
) -> torch.Tensor:
    """``[1, L]`` prompt ids: an empty prompt starts from BOS/EOS; a long one keeps its end (room for ``new``)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [start if start is not None else 0]
    if positions is not None and len(ids) + new > positions:
        keep = max(1, positions - new)
        log.warning(
            "prompt of %d tokens + %d new exceeds the model's %d positions: keeping its last %d tokens",
            len(ids),
            new,
            positions,
            keep,
        )
        ids = ids[-keep:]
    return torch.tensor([ids], dtype=torch.long)
