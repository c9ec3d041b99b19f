"""Search spaces: map a trial's parameters to a merge config.

```python
from evomerge.search import SearchSpace, load_search_space
space = load_search_space("ps_ties", models=[ft1, ft2], base_model=base, num_layers=32)
space.distributions()          # {name: optuna FloatDistribution/IntDistribution/CategoricalDistribution}
config = space.decode(params)  # MergeConfig; pure and deterministic; always accepted by build_plan
space.known_recipes()          # warm-start params (uniform TA, TIES density 0.5, each source alone, ...)
space.to_unit(params); space.from_unit(vector)   # [0, 1]^d code for the `cma` package
space.mergekit_compatible      # False only for data-flow spaces with input scales
```

``load_search_space`` takes a shipped name (``evomerge/shipped/search_spaces/<name>.yaml``), a YAML path
(relative to ``base_dir``) or an inline mapping; its ``kind`` selects parameter-space
(``parameter``/``slerp``), layer-stacking (``stacking``) or data-flow (``dfs``) search.
"""

from evomerge.search.spaces.loader import available_spaces, load_search_space
from evomerge.search.spaces.space import SearchSpace

__all__ = ["SearchSpace", "available_spaces", "load_search_space"]
