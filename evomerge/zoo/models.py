"""The zoo's models from a recipe: tokenizer, pretrained base, and fine-tuned specialists.

Each step draws its randomness from its own seeded stream (``"<seed>:<purpose>"``), so a
step's output depends only on the recipe and its inputs, not on what ran before it.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator

import torch

from evomerge.errors import ConfigError
from evomerge.zoo.corpus import SKILLS, general_text
from evomerge.zoo.heldout import heldout_prompts
from evomerge.zoo.recipe import Recipe, Specialist
from evomerge.zoo.tokenizer import train_tokenizer
from evomerge.zoo.train import (
    Batch,
    HiddenAnchor,
    llama_config,
    packed_examples,
    restrict_to_slot,
    select_trainable,
    text_windows,
    train,
)

TOKENIZER_EXAMPLES = 2000


def _rng(recipe: Recipe, purpose: str) -> random.Random:
    return random.Random(f"{recipe.seed}:{purpose}")


def skill_stream(skill: str, rng: random.Random) -> Iterator[tuple[str, str]]:
    """Endless ``(prompt, answer)`` training examples of ``skill``, none of them held out."""
    heldout = heldout_prompts(skill)
    while True:
        prompt, answer = SKILLS[skill](rng)
        if prompt not in heldout:
            yield prompt, answer


def corpus(recipe: Recipe) -> str:
    """The pretraining text: generic lines, and after a share ``prompt_share`` of them one to three
    task-format skill examples (``prompt`` + ``answer``), the skill drawn with ``prompt_mix``.

    The base thus meets the skills' prompts a little, as a real base model has seen some of
    every task it is later tuned on; held-out prompts never appear.
    """
    rng = _rng(recipe, "corpus")
    lines = general_text(rng, recipe.corpus_paragraphs, recipe.skill_share).splitlines(keepends=True)
    skills = recipe.skills
    streams = {skill: skill_stream(skill, _rng(recipe, f"corpus:{skill}")) for skill in skills}
    mix = recipe.prompt_mix or (1.0,) * len(skills)
    if len(mix) != len(skills):
        raise ConfigError(f"recipe prompt_mix has {len(mix)} weights for {len(skills)} specialists")
    text = []
    for line in lines:
        text.append(line)
        if rng.random() < recipe.prompt_share:
            for skill in rng.choices(skills, mix, k=rng.randint(1, 3)):
                prompt, answer = next(streams[skill])
                text.append(f"{prompt}{answer}\n")
    return "".join(text)


def make_tokenizer(recipe: Recipe, text: str):
    """The zoo tokenizer, trained on the generic corpus and on training examples of every skill."""
    samples = []
    for skill in SKILLS:
        stream = skill_stream(skill, _rng(recipe, f"tokenizer:{skill}"))
        samples.append("".join(f"{p}{a}\n" for p, a in (next(stream) for _ in range(TOKENIZER_EXAMPLES))))
    return train_tokenizer([text, *samples], recipe.vocab_size)


def pretrain(recipe: Recipe, tokenizer, tokens: torch.Tensor, *, progress: bool = True):
    """A randomly initialized Llama trained on windows of the corpus ``tokens``."""
    from transformers import LlamaForCausalLM

    config = llama_config(recipe, len(tokenizer), bos_id=tokenizer.bos_token_id,
                          eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(config)
    rng = _rng(recipe, "pretrain")

    def batches(step: int) -> Batch:
        ids = text_windows(tokens, rng, recipe.batch_size, recipe.context)
        return ids, torch.full(ids.shape, 1 / ids[:, 1:].numel())

    train(model, batches, recipe.pretrain_steps, recipe.pretrain_lr, desc="pretrain base",
          progress=progress)
    return model


def finetune(recipe: Recipe, spec: Specialist, base, tokenizer, tokens: torch.Tensor, *,
             progress: bool = True):
    """A copy of ``base`` with the linear layers ``spec.modules`` names (its slot of them, if it has
    one) tuned on ``spec.skill``, mixed with generic text; the hidden states on ``keep_rows`` rows of
    the other skills' examples are anchored to the base's."""
    model = copy.deepcopy(base)
    names = select_trainable(model, spec.modules)
    hooks = [] if spec.slot is None else restrict_to_slot(model, names, spec.slot, recipe.slot_units)
    rng = _rng(recipe, f"finetune:{spec.skill}")
    others = [skill for skill in recipe.skills if skill != spec.skill]
    keep_rows = recipe.keep_rows if others else 0
    general_rows = round(recipe.batch_size * recipe.general_fraction)
    skill_rows = recipe.batch_size - general_rows - keep_rows
    if skill_rows < 1:
        raise ConfigError(f"recipe batch_size {recipe.batch_size} leaves no row for skill examples "
                          f"after {general_rows} general and {keep_rows} keep rows")
    examples = _encoded(tokenizer, skill_stream(spec.skill, rng))
    kept = _encoded(tokenizer, _mixed([skill_stream(s, _rng(recipe, f"keep:{spec.skill}:{s}")) for s in others],
                                      _rng(recipe, f"keep:{spec.skill}")))
    anchor = HiddenAnchor(base, slice(skill_rows, skill_rows + keep_rows), tokenizer.pad_token_id,
                          recipe.keep_weight) if keep_rows else None

    def batches(step: int) -> Batch:
        ids, answers = packed_examples(examples, skill_rows, recipe.context, tokenizer.pad_token_id)
        rows, weights = [ids], [answers / answers.sum()]
        if keep_rows:  # no loss on their tokens: only the anchor reads them
            keep, _ = packed_examples(kept, keep_rows, recipe.context, tokenizer.pad_token_id)
            rows.append(keep)
            weights.append(torch.zeros(keep.shape))
        text = text_windows(tokens, rng, general_rows, recipe.context)
        rows.append(text)
        weights.append(torch.full(text.shape, recipe.general_weight / text[:, 1:].numel()))
        return torch.cat(rows), torch.cat(weights)

    train(model, batches, recipe.finetune_steps, recipe.finetune_lr, desc=f"tune {spec.skill}",
          anchor=anchor, progress=progress)
    for hook in hooks:
        hook.remove()
    model.requires_grad_(True)
    return model


def _encoded(tokenizer, pairs: Iterator[tuple[str, str]]) -> Iterator[tuple[list[int], list[int]]]:
    """``(prompt, answer)`` strings as token lists, the answer followed by a newline."""
    newline = tokenizer.encode("\n", add_special_tokens=False)
    for prompt, answer in pairs:
        yield (tokenizer.encode(prompt, add_special_tokens=False),
               tokenizer.encode(answer, add_special_tokens=False) + newline)


def _mixed(streams: list[Iterator], rng: random.Random) -> Iterator:
    """Items of randomly chosen ``streams``, one at a time."""
    while True:
        yield next(rng.choice(streams))
