"""Benchmark the fitness functions against calling the model directly, in the same run.

What it measures, on a synthetic Llama (``evomerge.zoo.synthetic``, float32, ``--device``):

* **perplexity throughput**: scored tokens per second of ``Fitness.evaluate`` on a
  perplexity metric (strided windows, ``--context``/``--stride``, ``--batch-size``) against
  the anchor, a bare batched forward loop over the same windows (``model(batch).logits``,
  then cross-entropy on the scored positions), written here without evomerge code. The
  token windows are built before timing in both (evomerge tokenizes once per fitness, on
  the first candidate). ``max |Δ ppl|`` checks that both compute the same number.
* **lm-eval per-candidate time**: ``Fitness.evaluate`` on a generate_until task (``--items``
  increment prompts, greedy, ``--gen-tokens`` new tokens, stop at a newline, exact match; the
  fast generation path, and with ``fast_generation: false`` lm-eval's own ``generate_until``),
  against the anchor, a direct batched ``model.generate`` on the same prompts with the same
  batch size, token budget and stop string (left padding), decoding and exact match
  included. Also timed: ``lm_eval.simple_evaluate`` per candidate on the same live model
  (tasks rebuilt every time, what evomerge avoids) and, once, ``load_fitness`` (builds the
  task objects, once per search).

* **loglikelihood throughput** (``--sections loglikelihood``): a loglikelihood task's requests
  (``--items`` sums behind a fixed instruction and three worked examples, the prompt prefix all
  requests share) scored per candidate by ``Fitness.evaluate`` with the fast path (the default:
  the shared prefix once, the LM head at scored positions only) and with ``fast_loglikelihood:
  false`` and ``fast_generation: false`` (lm-eval's ``HFLM.loglikelihood`` and
  ``generate_until``), against the anchor, a bare batched forward pass over
  the same token inputs (right-padded, full logits, log-softmax, gather), written here without
  evomerge code. tokens/s counts every request's input tokens as HFLM feeds them (the same count
  for all three); ``max |Δ logprob|`` and the is_greedy mismatches compare each request's values
  with HFLM's. With ``--real DIR`` (a Hugging Face folder, e.g. ``runs/real/base``, SmolLM2-135M)
  the same on that model with the shipped chat tasks (``chat_skills``: chat_reverse, chat_add,
  chat_upper through the chat template, ``--real-items`` documents each).

Every timing is the median over ``--repeats`` rounds after one warm-up round; the functions
compared run interleaved, alternating the order each round, so that drift in machine load
hits them alike. Each "candidate" is the same live model (its weights do not matter for
speed). Run from the repository root with the project's virtual environment active::

    python benchmarks/fitness.py                    # small llama (hidden 256, 6 layers), CPU
    python benchmarks/fitness.py --size tiny --repeats 3
    python benchmarks/fitness.py --size 100m --device cuda
    python benchmarks/fitness.py --sections loglikelihood --real runs/real/base
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from evomerge.fitness import load_fitness
from evomerge.fitness.lmeval import LmEvalMetric
from evomerge.zoo.synthetic import SIZES, build_family

REPO_ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the quick brown fox jumps over lazy dog merging models task arithmetic ties dare slerp "
         "and model stock 12 30 42 + =").split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark evomerge's fitness functions.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="synthetic llama size")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--tokens", type=int, default=16384, help="perplexity corpus size (max_tokens)")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16, help="windows / prompts per forward pass")
    parser.add_argument("--items", type=int, default=64, help="generation items per candidate")
    parser.add_argument("--gen-tokens", type=int, default=8, help="new tokens per generation item")
    parser.add_argument("--sections", default="perplexity,generation,loglikelihood",
                        help="comma-separated: perplexity, generation, loglikelihood")
    parser.add_argument("--real", type=Path, default=None,
                        help="also the loglikelihood section on this Hugging Face folder (chat tasks)")
    parser.add_argument("--real-items", type=int, default=16, help="documents per chat task with --real")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the model is built and reused [default: <repo>/.cache/bench/fitness-<size>]")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    args.sections = args.sections.split(",")
    if set(args.sections) - {"perplexity", "generation", "loglikelihood"}:
        parser.error(f"unknown section in --sections {','.join(args.sections)}")
    args.cache_dir = (args.cache_dir or REPO_ROOT / ".cache" / "bench" / f"fitness-{args.size}").absolute()
    return args


def ensure_model(cache_dir: Path, size: str) -> Path:
    base = cache_dir / "base"
    if not (base / "config.json").exists():
        print(f"building a {size} llama in {cache_dir} ...", flush=True)
        build_family(cache_dir, "llama", size=size, sources=0)
    return base


def timed(functions: dict[str, object], repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Median seconds per function over ``repeats`` rounds after a warm-up round, and each
    one's last result. Rounds alternate the order (A B, B A, ...) so that drift in machine
    load hits every function alike."""
    names = list(functions)
    results = {name: functions[name]() for name in names}
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            results[name] = functions[name]()
            _sync()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}, results


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- perplexity


def write_corpus(folder: Path, n_words: int) -> Path:
    rng = random.Random(0)
    path = folder / "corpus.txt"
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(n_words)) + "\n")
    return path


@torch.no_grad()
def bare_perplexity(model, ids: torch.Tensor, context: int, stride: int, batch_size: int) -> tuple[float, int]:
    """The anchor: batched forward passes with full logits, cross-entropy on scored tokens."""
    windows, scored_until = [], 1
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        windows.append((begin, end, end - scored_until))
        scored_until = end
        if end == len(ids):
            break
    nll, count = 0.0, 0
    for lo in range(0, len(windows), batch_size):
        group = windows[lo:lo + batch_size]
        for length in sorted({e - b for b, e, _ in group}):  # the last window may be shorter
            same = [w for w in group if w[1] - w[0] == length]
            batch = torch.stack([ids[b:e] for b, e, _ in same])
            logits = model(batch).logits[:, :-1]
            losses = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
            losses = losses.view(len(same), length - 1)
            for row, (_, _, scored) in zip(losses, same):
                nll += float(row[-scored:].sum(dtype=torch.float64))
                count += scored
    return math.exp(nll / count), count


def bench_perplexity(model, tokenizer, args, work: Path) -> list[tuple]:
    corpus = write_corpus(work, args.tokens)  # ~1 word per token or more: enough text for --tokens
    metric = {"type": "perplexity", "data": {"search": str(corpus), "test": str(corpus)},
              "max_tokens": args.tokens, "context": args.context, "stride": args.stride,
              "batch_size": args.batch_size}
    fitness = load_fitness({"metrics": {"ppl": metric}})
    fitness.evaluate(model, tokenizer)  # tokenizes the corpus once
    ids = fitness.metrics["ppl"].corpus(tokenizer, "search").ids.to(args.device)
    seconds, results = timed({
        "ours": lambda: fitness.evaluate(model, tokenizer)["ppl"],
        "theirs": lambda: bare_perplexity(model, ids, args.context, args.stride, args.batch_size)}, args.repeats)
    ours_s, theirs_s = seconds["ours"], seconds["theirs"]
    ours_ppl, (theirs_ppl, count) = results["ours"], results["theirs"]
    diff = abs(ours_ppl - theirs_ppl)
    return [(f"perplexity tokens/s ({count} tokens, ctx {args.context}, stride {args.stride})",
             f"{count / ours_s:,.0f}", f"{count / theirs_s:,.0f}", f"{theirs_s / ours_s:.2f}x",
             f"max |Δ ppl| {diff:.2g} (ppl {theirs_ppl:.4g})")]


# --------------------------------------------------------------------------- lm-eval


def write_additions(folder: Path, items: int, seed: int, prefix: str = "") -> list[dict]:
    """``items`` addition prompts written as both splits, ``{prefix}search.jsonl`` and ``{prefix}test.jsonl``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(items):
        a, b = rng.randint(0, 40), rng.randint(0, 40)
        rows.append({"prompt": f"{a} + {b} =", "answer": f" {a + b}"})
    for split in ("search", "test"):
        (folder / f"{prefix}{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def write_task(folder: Path, items: int, gen_tokens: int) -> list[dict]:
    rows = write_additions(folder, items, seed=1)
    task = {"task": "bench_add", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"search": "search.jsonl", "test": "test.jsonl"}},
            "validation_split": "search", "test_split": "test", "output_type": "generate_until",
            "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": gen_tokens, "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    (folder / "bench_add.yaml").write_text(yaml.safe_dump(task))
    return rows


def lm_eval_path(definition: dict) -> dict:
    """``definition`` with every lm-eval metric scored through lm-eval's own calls (no fast path)."""
    return {**definition, "metrics": {name: {**spec, "fast_loglikelihood": False, "fast_generation": False}
                                      for name, spec in definition["metrics"].items()}}


@torch.no_grad()
def direct_generate(model, tokenizer, rows: list[dict], batch_size: int, gen_tokens: int) -> float:
    """The anchor: batched greedy ``model.generate`` (left padding, stop at a newline), exact match."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    hits = 0
    for lo in range(0, len(rows), batch_size):
        group = rows[lo:lo + batch_size]
        enc = tokenizer([r["prompt"] for r in group], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(model.device)
        out = model.generate(**enc, max_new_tokens=gen_tokens, do_sample=False, stop_strings=["\n"],
                             tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += sum(text.split("\n")[0] == r["answer"] for text, r in zip(texts, group))
    tokenizer.padding_side = side
    return hits / len(rows)


def first_time(fitness, model, tokenizer) -> dict[str, float]:
    """``fitness.evaluate`` of a model as if it were the first scored: without the answers a
    generation metric keeps from the rounds before as guesses (a search's next candidate is
    another model, whose answers those only partly predict: benchmarks/generation_drafts.py)."""
    for metric in fitness.metrics.values():
        if isinstance(metric, LmEvalMetric):
            metric.forget_answers()
    return fitness.evaluate(model, tokenizer)


def bench_lm_eval(model, tokenizer, args, work: Path) -> list[tuple]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    rows = write_task(work, args.items, args.gen_tokens)
    definition = {"include_path": str(work), "metrics": {"add": {
        "type": "lm_eval", "task": "bench_add", "metric": "exact_match", "batch_size": args.batch_size}}}
    start = time.perf_counter()
    fitness = load_fitness(definition)
    load_s = time.perf_counter() - start
    slow = load_fitness(lm_eval_path(definition))
    cwd = os.getcwd()
    os.chdir(work)  # simple_evaluate reads the task's relative data files from the working directory
    try:
        seconds, _ = timed({
            "ours": lambda: first_time(fitness, model, tokenizer),
            "lm-eval": lambda: slow.evaluate(model, tokenizer),
            "theirs": lambda: direct_generate(model, tokenizer, rows, args.batch_size, args.gen_tokens),
            "simple": lambda: lm_eval.simple_evaluate(
                model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size),
                tasks=["bench_add"], task_manager=TaskManager(include_path=str(work), include_defaults=False),
                bootstrap_iters=0, log_samples=False)}, args.repeats)
    finally:
        os.chdir(cwd)
    ours_s, theirs_s, simple_s = seconds["ours"], seconds["theirs"], seconds["simple"]
    slow_s, tokens = seconds["lm-eval"], {}
    for name, candidate in (("fast", fitness), ("lm-eval", slow)):
        before = candidate.metrics["add"].tokens_scored
        first_time(candidate, model, tokenizer)
        tokens[name] = candidate.metrics["add"].tokens_scored - before
    per_item = (ours_s - theirs_s) / args.items * 1e3
    label = f"lm-eval s/candidate ({args.items} items, {args.gen_tokens} new tokens)"
    return [(label, f"{ours_s:.3f}", f"{theirs_s:.3f}", f"{theirs_s / ours_s:.2f}x",
             f"fast generation; overhead {per_item:+.2f} ms/item; computes {tokens['fast']} tokens"),
            ("  through lm-eval's generate_until (fast_generation: false)", f"{slow_s:.3f}", f"{theirs_s:.3f}",
             f"{theirs_s / slow_s:.2f}x", f"computes {tokens['lm-eval']} tokens; same values: "
             f"{first_time(fitness, model, tokenizer) == slow.evaluate(model, tokenizer)}"),
            ("  lm_eval.simple_evaluate per candidate (tasks rebuilt)", f"{simple_s:.3f}", f"{theirs_s:.3f}",
             f"{theirs_s / simple_s:.2f}x", ""),
            ("  load_fitness (task objects built once per search)", f"{load_s:.3f}", "", "", "")]


# --------------------------------------------------------------------------- loglikelihood


PREAMBLE = "Add the two numbers.\n3 + 4 = 7\n12 + 30 = 42\n25 + 17 = 42\n"


def write_loglikelihood_task(folder: Path, items: int) -> None:
    write_additions(folder, items, seed=2, prefix="ll_")
    task = {"task": "bench_add_ll", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"search": str(folder / "ll_search.jsonl"),
                                              "test": str(folder / "ll_test.jsonl")}},
            "validation_split": "search", "test_split": "test", "output_type": "loglikelihood",
            "doc_to_text": PREAMBLE + "{{prompt}}",
            "doc_to_target": "{{answer}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    (folder / "bench_add_ll.yaml").write_text(yaml.safe_dump(task))


@torch.no_grad()
def bare_loglikelihood(model, pairs: list[tuple[list[int], list[int]]], batch_size: int, max_length: int
                       ) -> list[tuple[float, bool]]:
    """The anchor: (context + continuation)[:-1], left-truncated to max_length, longest first in
    right-padded batches, full logits, log-softmax, the continuation's log-probs and argmax."""
    inputs = [((c + k)[-(max_length + 1):][:-1], k) for c, k in pairs]
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
    values: list[tuple[float, bool]] = [(0.0, False)] * len(inputs)
    device = next(model.parameters()).device
    for lo in range(0, len(order), batch_size):
        group = order[lo:lo + batch_size]
        width = len(inputs[group[0]][0])
        batch = torch.tensor([inputs[i][0] + [0] * (width - len(inputs[i][0])) for i in group], device=device)
        logprobs = F.log_softmax(model(batch).logits, dim=-1)
        for row, i in enumerate(group):
            tokens, continuation = inputs[i]
            scored = logprobs[row, len(tokens) - len(continuation):len(tokens)]
            target = torch.tensor(continuation, device=device)
            values[i] = (float(scored.gather(1, target[:, None]).sum()), bool((scored.argmax(-1) == target).all()))
    return values


def bench_loglikelihood(model, tokenizer, args, definition: dict, label: str) -> list[tuple]:
    from lm_eval.models.huggingface import HFLM

    from evomerge.compat.lm_eval import encode_loglikelihood_requests, score_continuations_as_given
    from evomerge.fitness.loglikelihood import score_loglikelihood

    fast, slow = load_fitness(definition), load_fitness(lm_eval_path(definition))
    fast.evaluate(model, tokenizer)  # prepares the requests and caches their tokens, once per search
    slow.evaluate(model, tokenizer)
    pairs, theirs, batches = [], [], []
    for metric in fast.metrics.values():
        requests = [i for i in metric.tasks["search"].instances if i.request_type == "loglikelihood"]
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=metric.batch_size)
        if metric.apply_chat_template:
            score_continuations_as_given(lm)
        with torch.no_grad():
            theirs += lm.loglikelihood(requests, disable_tqdm=True)
        pairs.append(encode_loglikelihood_requests(lm, requests))
        batches.append(metric.batch_size)
    max_length = lm.max_length
    tokens = sum(len((c + k)[-(max_length + 1):][:-1]) for group in pairs for c, k in group)
    before = {name: m.tokens_scored for name, m in fast.metrics.items()}
    first_time(fast, model, tokenizer)
    computed = sum(m.tokens_scored - before[name] for name, m in fast.metrics.items())

    def anchor():
        return [v for group, size in zip(pairs, batches) for v in bare_loglikelihood(model, group, size, max_length)]

    with torch.no_grad():
        ours = [v for group, size in zip(pairs, batches)
                for v in score_loglikelihood(model, group, max_length=max_length, batch_size=size).values]
    bare = anchor()
    seconds, _ = timed({"fast": lambda: first_time(fast, model, tokenizer),
                        "anchor": anchor,
                        "lm-eval": lambda: slow.evaluate(model, tokenizer)}, args.repeats)
    fast_s, anchor_s, slow_s = seconds["fast"], seconds["anchor"], seconds["lm-eval"]

    def check(values):
        delta = max(abs(a - b) for (a, _), (b, _) in zip(values, theirs))
        return f"max |Δ logprob| {delta:.1g} vs HFLM, {sum(a[1] != b[1] for a, b in zip(values, theirs))} is_greedy " \
               "mismatches"

    head = f"loglikelihood tokens/s, {label} ({len(theirs)} requests, {tokens} tokens)"
    return [(head, f"{tokens / fast_s:,.0f}", f"{tokens / anchor_s:,.0f}", f"{anchor_s / fast_s:.2f}x",
             f"fast path; computes {computed} tokens; {check(ours)}"),
            ("  s/candidate, fast path", f"{fast_s:.3f}", f"{anchor_s:.3f}", f"{anchor_s / fast_s:.2f}x", ""),
            ("  s/candidate, lm-eval HFLM (fast_loglikelihood, fast_generation: false)", f"{slow_s:.3f}",
             f"{anchor_s:.3f}",
             f"{anchor_s / slow_s:.2f}x", f"fast path {slow_s / fast_s:.2f}x faster than it"),
            ("  anchor values", "", "", "", check(bare))]


def loglikelihood_sections(model, tokenizer, args, work: Path) -> list[tuple]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_loglikelihood_task(work, args.items)
    rows = bench_loglikelihood(model, tokenizer, args, {"include_path": str(work), "metrics": {"add": {
        "type": "lm_eval", "task": "bench_add_ll", "metric": "acc", "batch_size": args.batch_size}}},
        f"llama-{args.size}, add with a 4-line preamble")
    if args.real is not None:
        real = AutoModelForCausalLM.from_pretrained(args.real, dtype=torch.float32).to(args.device).eval()
        real_tokenizer = AutoTokenizer.from_pretrained(args.real)
        definition = yaml.safe_load((REPO_ROOT / "evomerge" / "shipped" / "fitness" / "chat_skills.yaml").read_text())
        definition["include_path"] = str(REPO_ROOT / "evomerge" / "shipped" / "fitness" / "tasks")
        for spec in definition["metrics"].values():
            spec["limit"] = args.real_items
        rows += bench_loglikelihood(real, real_tokenizer, args, definition,
                                    f"{args.real.name} ({sum(p.numel() for p in real.parameters()) / 1e6:.0f}M), "
                                    "3 chat tasks")
    return rows


# --------------------------------------------------------------------------- report


def format_table(rows: list[tuple]) -> str:
    header = ("measurement", "evomerge", "anchor", "speed vs anchor", "note")
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = []
    for i, row in enumerate(table):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:4], widths[1:4])] + [row[4]]
        lines.append(" | ".join(cells).rstrip())
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = parse_args(argv)
    print("command: " + shlex.join([Path(sys.executable).name, *sys.argv]))
    base = ensure_model(args.cache_dir, args.size)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    params = sum(p.numel() for p in model.parameters())
    print(f"machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), device {args.device}, "
          f"llama-{args.size} with {params / 1e6:.1f}M parameters, float32")
    with tempfile.TemporaryDirectory() as work:
        rows = []
        if "perplexity" in args.sections:
            rows += bench_perplexity(model, tokenizer, args, Path(work))
        if "generation" in args.sections:
            rows += bench_lm_eval(model, tokenizer, args, Path(work))
        if "loglikelihood" in args.sections:
            rows += loglikelihood_sections(model, tokenizer, args, Path(work))
    print(f"\nmedian of {args.repeats} run(s) after a warm-up; speed vs anchor = anchor time / evomerge time "
          "(> 1: evomerge faster)")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
