"""Callables for the fitness tests: f(model, tokenizer, split=...) -> float | dict."""


def constant(model, tokenizer, split):
    return 0.5 if split == "search" else 0.25


def several(model, tokenizer, split):
    return {"accuracy": 0.75, "latency": 3.0}


def broken(model, tokenizer, split):
    raise RuntimeError("out of cheese")


def not_a_number(model, tokenizer, split):
    return "high"
