"""lm-eval fitness on the live in-memory model: the same numbers as lm-eval on the same weights
loaded from disk, the search split scores search data and the test split test data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.fitness import load_fitness
from evomerge.io import shipped

DATA = Path(__file__).parents[1] / "data" / "fitness"
TASKS = DATA / "tasks"


@pytest.fixture(scope="module")
def live(llama, tmp_path_factory):
    """A live model whose weights were changed in place, and a folder holding the same weights."""
    model = AutoModelForCausalLM.from_pretrained(llama[0], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(llama[0])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    folder = tmp_path_factory.mktemp("lmeval-live")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer, folder


def from_disk(folder: Path, include: Path, task: str, *, num_fewshot: int | None = None,
              limit: int | None = None, samples: bool = False):
    """``lm_eval.simple_evaluate`` with HFLM loading the weights from ``folder`` by path."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(folder), "dtype": "float32", "device": "cpu"},
        tasks=[task], task_manager=TaskManager(include_path=str(include), include_defaults=False),
        num_fewshot=num_fewshot, limit=limit, batch_size=8, bootstrap_iters=0, log_samples=samples)


def disk_copy(source: Path, out: Path, name: str, *, eval_split: str, data: dict[str, Path],
              **changes) -> None:
    """``source`` task YAML with absolute data files, renamed, evaluating ``eval_split``."""
    config = yaml.safe_load(source.read_text())
    config.update(task=name, dataset_kwargs={"data_files": {k: str(v) for k, v in data.items()}},
                  test_split=eval_split, **changes)
    if eval_split == "search":
        config["fewshot_split"] = "search"  # what evomerge does for a searched split (no self-examples)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.yaml").write_text(yaml.safe_dump(config))


def metric(task: str, name: str, **options) -> dict:
    return {"type": "lm_eval", "task": task, "metric": name, **options}


@pytest.mark.parametrize("num_fewshot", [0, 2])
def test_multiple_choice_matches_lm_eval_from_disk(live, tmp_path, num_fewshot):
    model, tokenizer, folder = live
    mc = {split: DATA / "data" / "mc" / f"{split}.jsonl" for split in ("search", "test")}
    for split in ("search", "test"):
        disk_copy(TASKS / "fit_mc.yaml", tmp_path / split, f"fit_mc_{split}", eval_split=split, data=mc)
    fitness = load_fitness({"include_path": str(TASKS),
                            "metrics": {"mc": metric("fit_mc", "acc", num_fewshot=num_fewshot, limit=10)}})
    ours = {split: fitness.evaluate(model, tokenizer, split)["mc"] for split in ("search", "test")}
    theirs = {
        "search": from_disk(folder, tmp_path / "search", "fit_mc_search", num_fewshot=num_fewshot, limit=10),
        "test": from_disk(folder, tmp_path / "test", "fit_mc_test", num_fewshot=num_fewshot),
    }
    for split in ("search", "test"):
        assert ours[split] == theirs[split]["results"][f"fit_mc_{split}"]["acc,none"]
    assert 0 < ours["search"] < 1 and 0 < ours["test"] < 1  # informative, not a trivial 0 or 1


def test_generation_matches_lm_eval_from_disk(live, tmp_path):
    """Answers are the disk model's own greedy outputs on even items: both runs must say 0.5."""
    model, tokenizer, folder = live
    prompts = [json.loads(line)["prompt"] for line in (DATA / "data" / "const" / "search.jsonl").open()]
    gen = {"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
           "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
           "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
           "validation_split": "search"}

    def write_task(name: str, answers: list[str]) -> Path:
        folder_ = tmp_path / name
        folder_.mkdir()
        for split in ("search", "test"):
            with (folder_ / f"{split}.jsonl").open("w") as handle:
                for prompt, answer in zip(prompts, answers):
                    handle.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
        config = {"task": name, "dataset_path": "json", "test_split": "test", **gen,
                  "dataset_kwargs": {"data_files": {s: str(folder_ / f"{s}.jsonl") for s in ("search", "test")}}}
        (folder_ / f"{name}.yaml").write_text(yaml.safe_dump(config))
        return folder_

    probe = from_disk(folder, write_task("fit_probe", ["?"] * len(prompts)), "fit_probe", samples=True)
    outputs = {s["doc_id"]: s["filtered_resps"][0] for s in probe["samples"]["fit_probe"]}
    answers = [outputs[i] if i % 2 == 0 else "no such answer" for i in range(len(prompts))]
    include = write_task("fit_gen", answers)
    theirs = from_disk(folder, include, "fit_gen")["results"]["fit_gen"]["exact_match,none"]
    fitness = load_fitness({"include_path": str(include), "metrics": {"gen": metric("fit_gen", "exact_match")}})
    assert fitness.evaluate(model, tokenizer, "test")["gen"] == theirs == 0.5


def test_search_split_scores_search_data_and_test_split_test_data(live):
    """fit_const maps every generation to "X": 6 of 8 search answers are "X", 1 of 4 test answers."""
    model, tokenizer, _ = live
    fitness = load_fitness(DATA / "fitness.yaml")
    const = fitness.metrics["const"]
    assert fitness.evaluate(model, tokenizer, "search")["const"] == 0.75
    assert fitness.evaluate(model, tokenizer, "test")["const"] == 0.25
    assert fitness.evaluate(model, tokenizer, "search", fraction=0.5)["const"] == 1.0  # first 4: all "X"
    assert set(const.tasks["search"].dataset) == {"search"}  # the searched task never loads test data
    assert const.num_items("search") == 8 and const.num_items("test") == 4
    assert fitness.metrics["mc"].num_items("search") == 8  # limit: 8 of 12
    assert fitness.metrics["mc"].num_items("test") == 8  # the test split ignores limit


def test_data_files_resolve_from_any_working_directory(live, tmp_path, monkeypatch):
    model, tokenizer, _ = live
    monkeypatch.chdir(tmp_path)
    fitness = load_fitness(DATA / "fitness.yaml")
    files = fitness.metrics["mc"].tasks["test"].config.dataset_kwargs["data_files"]
    assert files["search"] == str(DATA / "data" / "mc" / "search.jsonl")  # written "fitness/data/mc/..."
    files = fitness.metrics["const"].tasks["test"].config.dataset_kwargs["data_files"]
    assert files["test"] == str(DATA / "data" / "const" / "test.jsonl")  # written "data/const/..."


def test_model_left_in_eval_mode_without_grads(live):
    model, tokenizer, _ = live
    model.train()
    fitness = load_fitness(DATA / "fitness.yaml", limit=2)
    fitness.evaluate(model, tokenizer)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_per_item_values_are_lm_evals_per_document_scores(live, tmp_path):
    """``evaluate_items`` returns, in document order, the values lm-eval logs per sample (the
    oracle), whose mean is the score; metrics that are not an item mean have no items."""
    model, tokenizer, folder = live
    mc = {split: DATA / "data" / "mc" / f"{split}.jsonl" for split in ("search", "test")}
    disk_copy(TASKS / "fit_mc.yaml", tmp_path, "fit_mc_test", eval_split="test", data=mc)
    fitness = load_fitness(DATA / "fitness.yaml")
    scores, items = fitness.evaluate_items(model, tokenizer, "test")
    samples = from_disk(folder, tmp_path, "fit_mc_test", samples=True)["samples"]["fit_mc_test"]
    assert items["mc"] == [float(s["acc"]) for s in sorted(samples, key=lambda s: s["doc_id"])]
    assert 0 < sum(items["mc"]) < len(items["mc"]) == 8  # informative: some right, some wrong
    assert sum(items["mc"]) / 8 == scores["mc"] and sum(items["const"]) / 4 == scores["const"] == 0.25
    assert set(items) == {"mc", "const"}  # perplexity windows and a callable are not item means
    assert scores == fitness.evaluate(model, tokenizer, "test")


def test_zoo_greedy_tasks_score_every_item_as_generating_the_answer(tmp_path):
    """The shipped one-pass zoo task template (``_zoo_greedy_template_yaml``, loglikelihood
    ``acc``) and the generation one (``_zoo_template_yaml``, exact match) give each item the
    same value when the answer's tokens are the tokenizer's own encoding of it (zoo answers:
    digits and "/", each a token of its own in the zoo's tokenizer). The model: a random Llama
    whose newline logit is doubled, so that it ends some answers within the 16-token budget.
    Answers whose tokens re-encode alike: where it ends its answer, that answer (right) or, on odd
    items, with a character added (wrong); where it does not, its first token (wrong: the model
    goes on without a newline); else "?"."""
    import random

    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.zoo.corpus import general_text
    from evomerge.zoo.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([general_text(random.Random(0), 40)], 400)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)).eval()
    newline = tokenizer.convert_tokens_to_ids("\n")
    with torch.no_grad():
        model.lm_head.weight[newline] *= 2
    shipped_fitness = shipped.folder("fitness")
    items = []
    for skill in ("increment", "reverse", "dates"):
        lines = (shipped_fitness / "data" / skill / "test.jsonl").read_text().splitlines()[:20]
        for prompt in (json.loads(line)["prompt"] for line in lines):
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            generated, answer = out[0, ids.shape[1]:].tolist(), "?"
            stop = generated.index(newline) + 1 if newline in generated else 1  # else: its first token
            text = tokenizer.decode(generated[:stop]).removesuffix("\n")
            if text and tokenizer(prompt + text).input_ids == ids[0].tolist() + generated[:stop - (stop > 1)]:
                answer = text + ("x" if newline in generated and len(items) % 2 else "")
            items.append({"prompt": prompt, "answer": answer})
    tasks, data = tmp_path / "tasks", {s: tmp_path / f"{s}.jsonl" for s in ("search", "test")}
    tasks.mkdir()
    for path in data.values():
        path.write_text("".join(json.dumps(item) + "\n" for item in items))
    for template, task in (("_zoo_template_yaml", "probe"), ("_zoo_greedy_template_yaml", "probe_greedy")):
        (tasks / template).write_text((shipped_fitness / "tasks" / template).read_text())
        (tasks / f"{task}.yaml").write_text(yaml.safe_dump({
            "include": template, "task": task,
            "dataset_kwargs": {"data_files": {s: str(p) for s, p in data.items()}}}))
    fitness = load_fitness({"include_path": str(tasks), "metrics": {
        "generate": metric("probe", "exact_match"), "greedy": metric("probe_greedy", "acc")}})
    scores, values = fitness.evaluate_items(model, tokenizer, "test")
    assert values["generate"] == values["greedy"]
    assert 0.1 <= scores["greedy"] < 0.5  # right on some even items only
    assert sum(item["answer"] not in ("?", "he", "hex") for item in items) >= 5  # first-token answers
