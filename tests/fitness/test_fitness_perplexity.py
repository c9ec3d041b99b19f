"""Perplexity fitness: equal to plain forward-loop references, every token scored once,
``max_tokens`` respected, and the four corpus formats read alike."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.fitness import load_fitness
from evomerge.fitness.perplexity import plan_windows, read_texts, token_stream

DATA = Path(__file__).parents[1] / "data" / "fitness"
SEARCH_TXT = DATA / "data" / "text" / "search.txt"
SEARCH_JSONL = DATA / "data" / "text" / "search.jsonl"
# Same weights, same windows; the batched run differs from the one-window-at-a-time reference
# only in float32 summation order (matmul blocking changes with the batch, the log-softmax is
# over the kept positions only), which moves a ~1e2..1e3 NLL sum by far less than 1e-5 relative.
RTOL = 1e-5


@pytest.fixture(scope="module")
def live(llama):
    model = AutoModelForCausalLM.from_pretrained(llama[0], dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(llama[0])


def ppl_fitness(data: dict[str, str], **options) -> object:
    metric = {"type": "perplexity", "data": data, **options}
    return load_fitness({"metrics": {"ppl": metric}}, base_dir=DATA)


def tokens(tokenizer, path: Path, max_tokens: int | None = None) -> torch.Tensor:
    return torch.tensor(token_stream(read_texts(path), tokenizer, max_tokens))


@torch.no_grad()
def reference_ppl(model, ids: torch.Tensor, context: int, stride: int) -> tuple[float, int]:
    """Hugging Face's documented strided-perplexity loop, one window per forward pass."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        window = ids[begin:end][None]
        labels = window.clone()
        labels[:, :-(end - prev_end)] = -100
        valid = int((labels[:, 1:] != -100).sum())  # the model shifts labels by one
        nll += float(model(window, labels=labels).loss) * valid
        count += valid
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count), count


def test_single_window_equals_full_sequence_loss(live):
    model, tokenizer = live
    ids = tokens(tokenizer, SEARCH_TXT, 300)
    with torch.no_grad():
        expected = math.exp(float(model(ids[None], labels=ids[None]).loss))
    fitness = ppl_fitness({"search": "data/text/search.txt", "test": "data/text/test.txt"},
                          max_tokens=300, context=512, stride=256)
    assert fitness.evaluate(model, tokenizer)["ppl"] == pytest.approx(expected, rel=RTOL)


@pytest.mark.parametrize("context,stride,batch_size", [(64, 32, 4), (48, 47, 8), (40, 7, 3)])
def test_strided_windows_equal_reference_loop(live, context, stride, batch_size):
    model, tokenizer = live
    ids = tokens(tokenizer, SEARCH_TXT, 500)
    expected, count = reference_ppl(model, ids, context, stride)
    assert count == len(ids) - 1
    fitness = ppl_fitness({"search": "data/text/search.txt", "test": "data/text/test.txt"},
                          max_tokens=500, context=context, stride=stride, batch_size=batch_size)
    assert fitness.evaluate(model, tokenizer)["ppl"] == pytest.approx(expected, rel=RTOL)


@pytest.mark.parametrize("n_tokens", [2, 3, 50, 64, 65, 127, 128, 129, 1000])
@pytest.mark.parametrize("context,stride", [(64, 32), (64, 63), (64, 1), (16, 5)])
def test_every_token_after_the_first_is_scored_exactly_once(n_tokens, context, stride):
    scored = []
    for window in plan_windows(n_tokens, context, stride):
        assert window.end - window.begin <= context
        assert 1 <= window.scored <= window.end - window.begin - 1  # each has a token before it
        scored += range(window.end - window.scored, window.end)
    assert scored == list(range(1, n_tokens))


def test_max_tokens_caps_the_stream(live):
    model, tokenizer = live
    full = tokens(tokenizer, SEARCH_TXT)
    assert len(full) > 300
    fitness = ppl_fitness({"search": "data/text/search.txt", "test": "data/text/test.txt"},
                          max_tokens=300, context=64, stride=32)
    fitness.evaluate(model, tokenizer)
    corpus = fitness.metrics["ppl"].corpus(tokenizer, "search")
    assert torch.equal(corpus.ids, full[:300])
    assert corpus.windows[-1].end == 300


@pytest.mark.parametrize("max_tokens,limit,caps", [(400, 150, (150, 400)), (400, 900, (400, 400)),
                                                    (None, 150, (150, None))])
def test_limit_caps_the_search_split_only(live, max_tokens, limit, caps):
    """``limit`` (search-split tokens) makes the search estimate cheaper; the test split keeps
    ``max_tokens``, and each split's value is the reference loop's on its capped stream."""
    model, tokenizer = live
    fitness = ppl_fitness({"search": "data/text/search.txt", "test": "data/text/test.txt"},
                          max_tokens=max_tokens, limit=limit, context=64, stride=32)
    for split, cap in zip(("search", "test"), caps):
        value = fitness.evaluate(model, tokenizer, split)["ppl"]
        ids = fitness.metrics["ppl"].corpus(tokenizer, split).ids
        path = SEARCH_TXT if split == "search" else SEARCH_TXT.with_name("test.txt")
        assert torch.equal(ids, tokens(tokenizer, path, cap))
        assert value == pytest.approx(reference_ppl(model, ids, 64, 32)[0], rel=RTOL)
    assert len(fitness.metrics["ppl"].corpus(tokenizer, "search").ids) == caps[0]


def test_documents_are_joined_by_eos(live):
    _, tokenizer = live
    docs = read_texts(SEARCH_JSONL)
    stream = token_stream(docs[:3], tokenizer, None)
    parts = [tokenizer(d, add_special_tokens=False).input_ids for d in docs[:3]]
    eos = tokenizer.eos_token_id
    assert stream == parts[0] + [eos] + parts[1] + [eos] + parts[2]


def test_four_formats(live, tmp_path):
    import datasets

    model, tokenizer = live
    docs = [json.loads(line)["text"] for line in SEARCH_JSONL.read_text().splitlines()]
    datasets.Dataset.from_dict({"body": docs}).to_parquet(str(tmp_path / "search.parquet"))
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "search_ds"))
    assert read_texts(SEARCH_TXT) == [SEARCH_TXT.read_text()]
    assert read_texts(SEARCH_JSONL) == docs
    assert read_texts(tmp_path / "search.parquet", "body") == docs
    assert read_texts(tmp_path / "search_ds", "body") == docs

    options = dict(context=64, stride=32, max_tokens=400)
    test = str(SEARCH_TXT)
    jsonl = ppl_fitness({"search": str(SEARCH_JSONL), "test": test}, **options)
    parquet = ppl_fitness({"search": str(tmp_path / "search.parquet"), "test": test}, text_field="body", **options)
    folder = ppl_fitness({"search": str(tmp_path / "search_ds"), "test": test}, text_field="body", **options)
    values = [f.evaluate(model, tokenizer)["ppl"] for f in (jsonl, parquet, folder)]
    assert values[0] == values[1] == values[2]
    assert 1 < values[0] < tokenizer.vocab_size * 10


def test_fraction_scores_the_first_windows(live):
    model, tokenizer = live
    fitness = ppl_fitness({"search": "data/text/search.txt", "test": "data/text/test.txt"},
                          max_tokens=400, context=64, stride=32)
    half = fitness.evaluate(model, tokenizer, fraction=0.5)["ppl"]
    corpus = fitness.metrics["ppl"].corpus(tokenizer, "search")
    n_windows = math.ceil(len(corpus.windows) / 2)
    end = corpus.windows[n_windows - 1].end
    expected, _ = reference_ppl(model, corpus.ids[:end], 64, 32)
    assert half == pytest.approx(expected, rel=RTOL)
