"""Fitness: score a live in-memory model (never written to disk) and turn the scores into objectives.

::

    from evomerge.fitness import load_fitness
    fit = load_fitness("zoo_skills")                     # a shipped name or a YAML file; validates (ConfigError)
    fit.metric_names, fit.directions                     # one entry per objective
    fit.metrics                                          # name -> Metric (direction, weight)
    scores = fit.evaluate(model, tokenizer, "search", fraction=1.0, cache_key=plan_hash)
    fit.objectives(scores)                               # [value] or one value per objective
    for fraction, scores in fit.iter_stages(model, tokenizer, cache_key=plan_hash):
        ...  # report fit.objectives(scores) at this stage; stop iterating to prune

``split`` is ``"search"`` (what a search optimizes) or ``"test"`` (held out, for reporting;
nothing in a search evaluates it). The model is put in eval mode and scored under
``torch.no_grad``; a metric that fails raises :class:`FitnessError` (an ``EvomergeError``).

Definition (YAML; relative paths are relative to the file)::

    include_path: tasks          # folder(s) of lm-eval task YAMLs
    builtin_tasks: false         # also search lm-eval's built-in tasks (slow to index)
    objective: weighted_sum      # or "separate": one objective per metric with weight != 0
    stages: [0.25, 1.0]          # pruning stages: fractions of each metric's items (default [1.0])
    racing: {first: 32, growth: 2, confidence: 0.99, seed: 0}   # instead of stages: race each candidate
                                 # against the incumbent in growing chunks of one seeded item order
                                 # and stop it once it cannot win (evomerge.fitness.racing; off by default)
    metrics:
      increment:
        type: lm_eval
        task: zoo_increment       # a task in include_path with validation_split (search) and test_split (test)
        metric: exact_match      # or "exact_match,<filter>"; direction from the task's higher_is_better
        num_fewshot: 0           # default: the task's
        limit: 64                # search-split documents per candidate (default all); test uses all
        weight: 1.0
        batch_size: 8            # also: apply_chat_template, gen_kwargs (passed to lm-eval), fast_loglikelihood,
                                 #       fast_generation
      general_ppl:
        type: perplexity         # minimized
        data: {search: data/general/search.txt, test: data/general/test.txt}
        text_field: text         # for .jsonl / .parquet / datasets.save_to_disk folders
        max_tokens: 8192         # default: the whole corpus
        limit: 2048              # search-split tokens per candidate (default max_tokens); test ignores it
        context: 128             # window length in tokens (default 512)
        stride: 64               # default context // 2; must be < context
        batch_size: 8
        weight: 0.0              # reported, not optimized
      mine:
        type: callable
        function: mypkg.module:score   # or scores.py:score; f(model, tokenizer, split=...) -> float | dict
        direction: maximize
        key: accuracy            # for a dict result: the entry that is the metric's value

How each metric type scores, splits and caches: :mod:`evomerge.fitness.lmeval`,
:mod:`evomerge.fitness.perplexity`, :mod:`evomerge.fitness.callable`; objectives, stages and
the cache: :mod:`evomerge.fitness.fitness`.
"""

from evomerge.errors import FitnessError
from evomerge.fitness.base import SPLITS, Metric
from evomerge.fitness.definition import load_fitness
from evomerge.fitness.fitness import Fitness
from evomerge.fitness.racing import Racing

__all__ = ["SPLITS", "Fitness", "FitnessError", "Metric", "Racing", "load_fitness"]
