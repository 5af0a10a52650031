"""The (a, b) search of PIC-PQ: candidate encoding, aging evolution as an evosax strategy, strategy factory.

Candidate encoding
------------------
The search learns one pair (a_l, b_l) per prunable layer l = 1..L. A candidate is a flat float32 vector x of
length 2L:

    x[:L] = log a_l            x[L:] = b_l / std_l

where std_l is the standard deviation of layer l's filter-property values (given by the caller). In this
space the identity candidate (a = 1, b = 0) is the zero vector, the original's random initial candidates
(a_l = exp(N(0, 1)), b_l = N(0, std_l)) are standard normal, and the original's mutation
(a_l *= exp(N(0, eta)), b_l += N(0, std_l)) is additive Gaussian noise, so generic evosax strategies
(CMA-ES, OpenAI-ES, GA, ...) work in it unchanged. Given std_l = 0, `encode` maps b_l to 0 and `decode`
keeps it 0 (the original's behaviour, where b_l += N(0, 0)); the pipeline passes criteria.fp_std, which
puts 1.0 there instead (see below).

Strategies
----------
Every strategy follows evosax 0.3.2's API and minimizes; a NaN fitness marks a failed candidate (it never
becomes the best-ever and always loses a tournament). `AgingEvolution` is the original's regularized
evolution (METHOD.md, "Aging evolution"), vectorized to K children per round; K = 1 is the original's
algorithm, with these differences, each deliberate:
  - random numbers come from jax.random, not numpy's global generator (same distributions, other draws);
  - a failed (NaN) candidate loses every tournament; in the original, np.argmin over the sampled losses
    returns a NaN's index, so a failed member WINS any tournament it is drawn into;
  - at least one layer is mutated per child (the original's int(0.1 * L) is 0 below 10 layers);
  - a layer whose filter properties are all equal gets std 1.0 (criteria.fp_std), so its b_l can move; the
    original's std 0 keeps it at 0 forever.
The identity candidate is the youngest of the initial population, and a layer drawn twice is mutated once,
as in the original. `make_strategy` builds it or any evosax algorithm by name; `run_search` is a plain
reference loop over init/ask/tell (the pipeline adds checkpointing around the same calls).

Best-ever tracking lives in one place for every strategy: evosax's `state.best_solution` /
`state.best_fitness`, updated by evosax's own `update_best_solution_and_fitness` in `init` (population-based)
and `tell` (all strategies); `run_search` uses the same function to record the identity candidate it
evaluates for distribution-based strategies.
"""
from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from evosax import algorithms as evosax_algorithms
from evosax.algorithms.base import update_best_solution_and_fitness
from evosax.algorithms.population_based.base import (
    Params as PopulationParams,
    PopulationBasedAlgorithm,
    State as PopulationState,
)
from evosax.core.fitness_shaping import identity_fitness_shaping_fn
from flax import struct

__all__ = [
    "AgingEvolution",
    "AgingEvolutionParams",
    "AgingEvolutionState",
    "SearchResult",
    "canonical_state",
    "STRATEGY_NAMES",
    "decode",
    "encode",
    "generation_size",
    "initial_population",
    "is_population_based",
    "make_strategy",
    "mutation_scale",
    "run_search",
]


# --------------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------------


def encode(a: jax.Array, b: jax.Array, fp_std: jax.Array) -> jax.Array:
  """(a, b) of shape (..., L) and fp_std of shape (L,) -> x of shape (..., 2L): [log a, b / std].

  Layers with std_l == 0 encode b_l as 0 (their b_l can only be 0, see the module docstring).
  """
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  fp_std = jnp.asarray(fp_std, jnp.float32)
  positive = fp_std > 0
  scaled_b = jnp.where(positive, b / jnp.where(positive, fp_std, 1.0), 0.0)
  return jnp.concatenate([jnp.log(a), scaled_b], axis=-1)


def decode(x: jax.Array, fp_std: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x of shape (..., 2L) and fp_std of shape (L,) -> (a, b), each of shape (..., L)."""
  x = jnp.asarray(x, jnp.float32)
  num_layers = x.shape[-1] // 2
  if x.shape[-1] != 2 * num_layers or jnp.shape(fp_std) != (num_layers,):
    raise ValueError(f"decode expects x of shape (..., 2L) and fp_std of shape (L,), got {x.shape} and "
                     f"{jnp.shape(fp_std)}.")
  return jnp.exp(x[..., :num_layers]), x[..., num_layers:] * jnp.asarray(fp_std, jnp.float32)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _initial_population(key: jax.Array, population_size: int, num_layers: int) -> jax.Array:
  random_rows = jax.random.normal(key, (population_size - 1, 2 * num_layers), jnp.float32)
  return jnp.concatenate([random_rows, jnp.zeros((1, 2 * num_layers), jnp.float32)], axis=0)


def initial_population(key: jax.Array, population_size: int, num_layers: int) -> jax.Array:
  """The original's initial population, encoded: (population_size, 2L) float32.

  Rows 0..P-2 are `jax.random.normal(key, (population_size - 1, 2L))`, i.e. a_l = exp(N(0, 1)) and
  b_l = N(0, std_l); the LAST row is the identity candidate (zeros). As in the original (its loop puts the
  identity at i = POPULATIONS - 1), the identity is the youngest member, so aging evolution replaces it last:
  it survives until the population has turned over once.
  """
  if population_size < 1 or num_layers < 1:
    raise ValueError(f"initial_population needs population_size >= 1 and num_layers >= 1, got "
                     f"{population_size} and {num_layers}.")
  return _initial_population(key, int(population_size), int(num_layers))


def mutation_scale(num_evaluations: jax.Array, total_evaluations: jax.Array) -> jax.Array:
  """eta_t = 1 - t / (1.25 T), the std of the log-a mutation of the child evaluated after t evaluations.

  Float32. Clamped at 0 (only reached past 1.25 T, i.e. never within the budget, where eta >= 0.2).
  """
  t = jnp.asarray(num_evaluations).astype(jnp.float32)
  total = jnp.asarray(total_evaluations, jnp.float32)
  return jnp.maximum(jnp.float32(1.0) - t / (jnp.float32(1.25) * total), jnp.float32(0.0))


# --------------------------------------------------------------------------------------------------------
# Aging evolution
# --------------------------------------------------------------------------------------------------------


@struct.dataclass
class AgingEvolutionState(PopulationState):
  """population (P, 2L) and fitness (P,) (raw; NaN = failed) from evosax, plus:

  birth: (P,) int32, the evaluation index at which each member was evaluated (the initial population's row i
    has birth i). The oldest member is argmin(birth): the FIFO of the original.
  num_evaluations: int32 scalar t, evaluations done so far (the initial population included).
  best_solution / best_fitness / generation_counter: evosax's (best-ever; NaN never enters).
  """
  birth: jax.Array
  num_evaluations: jax.Array


@struct.dataclass
class AgingEvolutionParams(PopulationParams):
  """total_evaluations: the budget T (float32) that sets the annealing eta_t = 1 - t / (1.25 T)."""
  total_evaluations: jax.Array


def _nan_safe_metrics_fn(key, population, fitness, state, params) -> dict[str, jax.Array]:
  """evosax's metrics with failed (NaN) candidates ranked last and counted."""
  del key, params
  ranked = jnp.where(jnp.isnan(fitness), jnp.inf, fitness)
  best_idx = jnp.argmin(ranked)
  return {
      "generation_counter": state.generation_counter,
      "best_fitness_in_generation": ranked[best_idx],
      "best_solution_in_generation": population[best_idx],
      "best_fitness": state.best_fitness,
      "best_solution": state.best_solution,
      "num_failed_in_generation": jnp.sum(jnp.isnan(fitness)),
  }


class AgingEvolution(PopulationBasedAlgorithm):
  """Regularized (aging) evolution of PIC-PQ as an evosax population-based strategy (minimizing).

  Constructor: AgingEvolution(population_size=P, solution=jnp.zeros(2L), num_children=K, tournament_size=S,
  total_evaluations=T, mutation_fraction=0.1). `init(key, population, fitness, params)` takes the evaluated
  initial population (P rows; see `initial_population`); its row i gets birth i and t starts at P.

  `ask(key, state, params) -> (children (K, 2L), state)`; the state is not changed. Child k (k = 0..K-1) is
  made from the CURRENT population (the K tournaments are independent and do not see each other's
  children), from row k of exactly these draws (P, L static; M = max(1, int(mutation_fraction * L))):

      key_int, key_normal = jax.random.split(key)
      maxval = jnp.asarray([P] * S + [L] * M, jnp.int32)
      ints = jax.random.randint(key_int, (K, S + M), 0, maxval, jnp.int32)
      members = ints[k, :S]     # the tournament: S members, uniform with replacement
      layers  = ints[k, S:]     # the M mutated layers, uniform with replacement
      z = jax.random.normal(key_normal, (K, 2, M), jnp.float32)
      z_a, z_b = z[k, 0], z[k, 1]   # noise of log a, noise of b / std

  (One randint and one normal call per ask, not one per child: XLA on CPU compiles each threefry call
  slowly, and this halves the compile time of ask.)

  Parent: members[argmin(fitness[members])] with NaN fitness read as +inf; ties go to the earliest draw
  (Python's min() over the sample, as in the original). The child copies the parent, then for i = 0..M-1 in
  order: x[layers[i]] += eta * z_a[i] and x[L + layers[i]] += z_b[i], where eta = mutation_scale(t + k, T)
  and t = state.num_evaluations (evaluations done before child k, in evaluation order). A layer drawn twice
  is mutated once, with the noise of its first draw (the original loops over layers and asks
  `if k in mutate_candidate`; the later draw's noise is unused). Float32 throughout; XLA on CPU may fuse the
  multiply-add and divide through a reciprocal, so a numpy replay of these draws agrees to about 1 ulp, not
  bit for bit.

  `tell(key, children, fitness, state, params)` uses no randomness: it takes the first n <= K children of the
  last ask (n < K only for a budget-cut last round), inserts them one after the other, child j replacing the
  member with the smallest birth at that moment (the current OLDEST) and getting birth t + j; then
  t += n; evosax updates the best-ever and generation_counter. Fitness is stored raw (NaN kept).
  """

  def __init__(
      self,
      population_size: int,
      solution: Any,
      num_children: int = 1,
      tournament_size: int = 16,
      total_evaluations: int = 400,
      mutation_fraction: float = 0.1,
      metrics_fn: Callable = _nan_safe_metrics_fn,
  ):
    super().__init__(population_size, solution, identity_fitness_shaping_fn, metrics_fn)
    if self.num_dims % 2 or self.num_dims < 2:
      raise ValueError(f"AgingEvolution needs an encoded candidate of even length 2L >= 2, got {self.num_dims}.")
    for name, value in (("num_children", num_children), ("tournament_size", tournament_size),
                        ("total_evaluations", total_evaluations)):
      if int(value) != value or value < 1:
        raise ValueError(f"AgingEvolution needs {name} to be a positive integer, got {value!r}.")
    self.num_layers = self.num_dims // 2
    self.num_children = int(num_children)
    self.tournament_size = int(tournament_size)
    self.total_evaluations = int(total_evaluations)
    self.mutation_fraction = float(mutation_fraction)
    self.num_mutations = max(1, int(self.mutation_fraction * self.num_layers))

  @property
  def _default_params(self) -> AgingEvolutionParams:
    return AgingEvolutionParams(total_evaluations=jnp.asarray(self.total_evaluations, jnp.float32))

  def _init(self, key: jax.Array, params: AgingEvolutionParams) -> AgingEvolutionState:
    del key, params
    return AgingEvolutionState(
        population=jnp.full((self.population_size, self.num_dims), jnp.nan, jnp.float32),
        fitness=jnp.full((self.population_size,), jnp.nan, jnp.float32),
        birth=jnp.arange(self.population_size, dtype=jnp.int32),
        num_evaluations=jnp.asarray(self.population_size, jnp.int32),
        best_solution=jnp.full((self.num_dims,), jnp.nan, jnp.float32),
        best_fitness=jnp.asarray(jnp.inf, jnp.float32),
        generation_counter=jnp.asarray(0, jnp.int32),
    )

  def _draws(self, key):
    """The random draws of one ask, exactly as documented in the class docstring."""
    size, layers, tournament, mutations = (self.population_size, self.num_layers, self.tournament_size,
                                           self.num_mutations)
    key_int, key_normal = jax.random.split(key)
    maxval = jnp.asarray([size] * tournament + [layers] * mutations, jnp.int32)
    ints = jax.random.randint(key_int, (self.num_children, tournament + mutations), 0, maxval, jnp.int32)
    z = jax.random.normal(key_normal, (self.num_children, 2, mutations), jnp.float32)
    return ints[:, :tournament], ints[:, tournament:], z[:, 0], z[:, 1]

  def _ask(self, key, state: AgingEvolutionState, params: AgingEvolutionParams):
    members, layers, z_a, z_b = self._draws(key)
    ranked = jnp.where(jnp.isnan(state.fitness), jnp.inf, state.fitness)
    winner = jnp.argmin(ranked[members], axis=1)  # first drawn among equals
    parents = jnp.take_along_axis(members, winner[:, None], axis=1)[:, 0]
    num_evaluations = state.num_evaluations + jnp.arange(self.num_children, dtype=jnp.int32)
    delta_log_a = mutation_scale(num_evaluations, params.total_evaluations)[:, None] * z_a
    rows = jnp.arange(self.num_children)

    # first[k, i]: layers[k, i] was not drawn before position i, so a repeated layer is mutated once.
    m = self.num_mutations
    earlier = jnp.tril(jnp.ones((m, m), bool), k=-1)  # earlier[i, j]: j < i
    repeated = jnp.any((layers[:, :, None] == layers[:, None, :]) & earlier, axis=2)
    delta_log_a = jnp.where(repeated, 0.0, delta_log_a)
    delta_b = jnp.where(repeated, 0.0, z_b)

    def mutate(i, children):
      children = children.at[rows, layers[:, i]].add(delta_log_a[:, i])
      return children.at[rows, self.num_layers + layers[:, i]].add(delta_b[:, i])

    children = jax.lax.fori_loop(0, self.num_mutations, mutate, state.population[parents])
    return children, state

  def _tell(self, key, population, fitness, state: AgingEvolutionState, params) -> AgingEvolutionState:
    del key, params
    num_new = population.shape[0]
    if not 1 <= num_new <= self.num_children:
      raise ValueError(f"AgingEvolution.tell takes the first 1..{self.num_children} children of the last ask, "
                       f"got {num_new}.")

    def insert(j, carry):
      members, member_fitness, birth = carry
      oldest = jnp.argmin(birth)
      return (members.at[oldest].set(population[j]), member_fitness.at[oldest].set(fitness[j]),
              birth.at[oldest].set(state.num_evaluations + j))

    members, member_fitness, birth = jax.lax.fori_loop(
        0, num_new, insert, (state.population, state.fitness, state.birth))
    return state.replace(population=members, fitness=member_fitness, birth=birth,
                         num_evaluations=state.num_evaluations + num_new)


# --------------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------------

_AGING_NAMES = ("aging_evolution", "regularized_evolution")
_EVOSAX = dict(evosax_algorithms.algorithms)  # evosax's registry: name -> class (e.g. "CMA_ES", "SimpleGA")


def _normalize(name: str) -> str:
  return re.sub(r"[^0-9a-z]", "", name.lower())


def _lookup() -> dict[str, Any]:
  table: dict[str, Any] = {_normalize(n): AgingEvolution for n in _AGING_NAMES}
  table[_normalize(AgingEvolution.__name__)] = AgingEvolution
  for registry_name, cls in _EVOSAX.items():
    table.setdefault(_normalize(registry_name), cls)
    table.setdefault(_normalize(cls.__name__), cls)
  return table


STRATEGY_NAMES = ("aging_evolution", "cma_es", "simple_ga", "open_es", *sorted(
    n for n in _EVOSAX if _normalize(n) not in ("cmaes", "simplega", "openes")))
"""Valid `search.strategy` values (case and '_'/'-' do not matter; evosax class names work too)."""


def _constant_std(value: float) -> Callable[[jax.Array], jax.Array]:
  """A constant std schedule returning a strongly typed float32 (optax's returns a Python float, which evosax
  stores weakly typed after tell: see `canonical_state`)."""
  return lambda count: jnp.full((), value, jnp.float32)


def _default_generic_kwargs(cls) -> dict[str, Any]:
  """Our defaults for generic evosax strategies in the encoded space (overridable by keyword)."""
  if cls is evosax_algorithms.Open_ES:
    # evosax's default (SGD, lr 1e-3, std 1) barely moves within a few hundred evaluations.
    return {"optimizer": optax.adam(learning_rate=0.1), "std_schedule": _constant_std(0.5)}
  if cls is evosax_algorithms.SimpleGA:
    # evosax's default mutation std 1 is the whole prior's scale; 0.3 lets the GA refine.
    return {"std_schedule": _constant_std(0.3)}
  return {}


def make_strategy(
    name: str,
    num_layers: int,
    population_size: int = 64,
    num_children: int = 1,
    total_evaluations: int = 400,
    *,
    tournament_size: int = 16,
    mutation_fraction: float = 0.1,
    generation_size: int | None = None,
    **strategy_kwargs: Any,
):
  """Build the search strategy called `name` over 2 * num_layers encoded dimensions; returns (strategy, params).

  'aging_evolution' (alias 'regularized_evolution'): `AgingEvolution` with P = population_size, K =
  num_children, S = tournament_size, T = total_evaluations. Any other name is an evosax algorithm
  ('cma_es', 'simple_ga', 'open_es', or any key/class name of `evosax.algorithms.algorithms`, e.g. 'SNES',
  'PSO'); it asks `generation_size` candidates per generation (default: population_size), which is its evosax
  population_size; num_children, tournament_size and mutation_fraction do not apply to it.
  Population-based ones start from an evaluated `initial_population` of that size, distribution-based ones
  from mean = zeros (the identity) with evosax's default std (1 for CMA-ES: the prior's scale).
  `strategy_kwargs` go to the evosax constructor, over our defaults (Open_ES: Adam lr 0.1 and std 0.5;
  SimpleGA: mutation std 0.3). Names are case-insensitive and ignore '_' and '-'.
  """
  table = _lookup()
  cls = table.get(_normalize(str(name)))
  if cls is None:
    raise ValueError(f"Unknown search strategy {name!r} in search.strategy; valid choices: "
                     f"{', '.join(STRATEGY_NAMES)}.")
  for setting, value in (("search.num_layers", num_layers), ("search.population", population_size),
                         ("search.num_children", num_children),
                         ("search.total_evaluations", total_evaluations)):
    if int(value) != value or value < 1:
      raise ValueError(f"{setting} must be a positive integer, got {value!r}.")
  solution = jnp.zeros((2 * num_layers,), jnp.float32)
  if cls is AgingEvolution:
    if total_evaluations < population_size:
      raise ValueError(f"search.total_evaluations ({total_evaluations}) must be at least search.population "
                       f"({population_size}), since the initial population counts toward the budget.")
    strategy = AgingEvolution(population_size, solution, num_children=num_children,
                              tournament_size=tournament_size, total_evaluations=total_evaluations,
                              mutation_fraction=mutation_fraction)
    return strategy, strategy.default_params

  size = population_size if generation_size is None else generation_size
  if cls is evosax_algorithms.Open_ES and size % 2 and strategy_kwargs.get("use_antithetic_sampling", True):
    raise ValueError(f"open_es samples antithetic pairs, so search.population must be even, got {size}.")
  if issubclass(cls, PopulationBasedAlgorithm) and total_evaluations < size:
    raise ValueError(f"search.total_evaluations ({total_evaluations}) must be at least search.population "
                     f"({size}), since the initial population counts toward the budget.")
  kwargs = _default_generic_kwargs(cls) | strategy_kwargs
  strategy = cls(population_size=size, solution=solution, **kwargs)
  return strategy, strategy.default_params


def canonical_state(state):
  """The state with every leaf strongly typed (same values and dtypes).

  evosax 0.3.2's init leaves some leaves weakly typed (CMA-ES: best_solution, best_fitness, std) that come
  back strongly typed from tell, so the first ask/tell pair would compile twice; a restored checkpoint is
  strongly typed too. Pass a fresh state through this once to compile ask and tell once. (A custom
  std_schedule returning a Python float gives a weakly typed std after tell: one extra compile, no harm.)
  """
  return jax.tree.map(lambda leaf: jnp.asarray(leaf, dtype=jnp.asarray(leaf).dtype), state)


def is_population_based(strategy) -> bool:
  """True for strategies initialized with an evaluated population (AgingEvolution, SimpleGA, PSO, ...)."""
  return isinstance(strategy, PopulationBasedAlgorithm)


def generation_size(strategy) -> int:
  """How many candidates one ask returns: K for AgingEvolution, evosax's population_size otherwise."""
  return strategy.num_children if isinstance(strategy, AgingEvolution) else strategy.population_size


# --------------------------------------------------------------------------------------------------------
# Reference loop
# --------------------------------------------------------------------------------------------------------


class SearchResult(NamedTuple):
  best_solution: jax.Array     # (2L,) best-ever encoded candidate (evosax's state.best_solution)
  best_fitness: jax.Array      # scalar; inf if every evaluation failed
  history_population: jax.Array  # (N, 2L) every evaluated candidate, in evaluation order (N = budget)
  history_fitness: jax.Array   # (N,)
  state: Any                   # the strategy's final state


def _evaluate(fitness_fn, population: jax.Array, slice_size: int | None = None, bar=None) -> jax.Array:
  """fitness_fn over `population`, `slice_size` candidates per call (all at once when None)."""
  n = population.shape[0]
  step = n if not slice_size else slice_size
  parts = []
  for start in range(0, n, step):
    part = jnp.asarray(fitness_fn(population[start:start + step]), jnp.float32)
    if part.shape != population[start:start + step].shape[:1]:
      raise ValueError(f"fitness_fn must return one value per candidate, shape "
                       f"{population[start:start + step].shape[:1]}, got {part.shape}.")
    parts.append(part)
    if bar is not None:
      bar.update(part.shape[0])
  return jnp.concatenate(parts)


def _start(strategy, params, fitness_fn, key_population, key_init, num_layers, evaluate: bool = True,
           slice_size: int | None = None, bar=None):
  """The evaluated start of a search: (state, population, fitness). With evaluate=False the fitness is a
  placeholder (zeros): the state then only serves as the structure a checkpoint is restored into."""
  dims = 2 * num_layers
  if is_population_based(strategy):
    population = initial_population(key_population, strategy.population_size, num_layers)
    fitness = (_evaluate(fitness_fn, population, slice_size, bar) if evaluate
               else jnp.zeros(population.shape[:1], jnp.float32))
    state = strategy.init(key_init, population, fitness, params)
  else:
    population = jnp.zeros((1, dims), jnp.float32)
    fitness = _evaluate(fitness_fn, population, None, bar) if evaluate else jnp.zeros((1,), jnp.float32)
    state = strategy.init(key_init, population[0], params)
    best_solution, best_fitness = update_best_solution_and_fitness(
        population, fitness, state.best_solution, state.best_fitness)
    state = state.replace(best_solution=best_solution, best_fitness=best_fitness)
  return canonical_state(state), population, fitness


def run_search(
    strategy,
    params,
    fitness_fn: Callable[[jax.Array], jax.Array],
    key: jax.Array,
    num_layers: int,
    total_evaluations: int,
    *,
    progress: bool = False,
    checkpoint_dir: str | None = None,
    initial_slice: int | None = None,
    on_restore: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> SearchResult:
  """Run `strategy` for exactly `total_evaluations` fitness evaluations; returns a `SearchResult`.

  fitness_fn maps encoded candidates (n, 2L) to losses (n,) (NaN = failed); jit it yourself if you like (it
  is called with n = the generation size, and once with a smaller n if the budget cuts the last round).
  Keys: key_population, key_init, key_loop = jax.random.split(key, 3); each round
  key_loop, key_ask, key_tell = jax.random.split(key_loop, 3).
  Start, counted in the budget: population-based strategies (AgingEvolution included) are initialized with
  `initial_population(key_population, P, L)` and its fitness; distribution-based ones with mean = zeros, and
  the identity (zeros) is evaluated once and recorded as the first best-ever. Then rounds of ask / evaluate /
  tell until the budget is used. Budget-cut last round: only the first n candidates are evaluated;
  AgingEvolution is told only those n, generic strategies get NaN (failed) for the rest.

  checkpoint_dir: save the whole loop (strategy state, loop key, history, count) with orbax after the start
  and after every round, and resume from the latest save when one exists there. Everything random is
  derived from `key` and the saved loop key, so a killed and resumed search ends exactly where an
  uninterrupted one does (given a deterministic fitness_fn).
  initial_slice: evaluate the initial population this many candidates per fitness_fn call (default: all
  at once), so that the progress bar moves and memory stays bounded.
  on_restore: called once with (population (n, 2L), fitness (n,)) of the n evaluations a resumed search
  restored, so a fitness_fn that remembers what it evaluated can refill its memory.
  progress: a tqdm bar of evaluations done, best-ever fitness and candidates per second.
  """
  dims = 2 * num_layers
  if strategy.num_dims != dims:
    raise ValueError(f"The strategy searches {strategy.num_dims} dimensions, but num_layers={num_layers} needs "
                     f"{dims}.")
  if isinstance(strategy, AgingEvolution) and float(params.total_evaluations) != float(total_evaluations):
    raise ValueError(f"params.total_evaluations ({float(params.total_evaluations)}) must equal the budget "
                     f"total_evaluations ({total_evaluations}), since it sets the mutation annealing.")
  if is_population_based(strategy) and total_evaluations < strategy.population_size:
    raise ValueError(f"search.total_evaluations ({total_evaluations}) must be at least the population size "
                     f"({strategy.population_size}).")
  if total_evaluations < 1:
    raise ValueError(f"search.total_evaluations must be positive, got {total_evaluations}.")
  key_population, key_init, key_loop = jax.random.split(key, 3)
  meta = {"strategy": type(strategy).__name__, "dims": dims, "total_evaluations": int(total_evaluations),
          "generation_size": generation_size(strategy)}
  mngr = None
  if checkpoint_dir is not None:
    from picpq_jax import checkpoints  # pylint: disable=import-outside-toplevel
    mngr = checkpoints.manager(checkpoint_dir, max_to_keep=2)

  def loop_state(state, key_loop, evaluated, history_population, history_fitness):
    # Host arrays: every process holds the same values, and orbax saves host arrays from one process.
    return jax.device_get({"state": state, "key_loop": jax.random.key_data(key_loop),
                           "evaluated": np.asarray(evaluated, np.int32),
                           "history_population": history_population, "history_fitness": history_fitness})

  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=total_evaluations, desc="search", unit="cand", disable=jax.process_index() != 0)
  if mngr is not None and checkpoints.latest_step(mngr) is not None:
    template_state, _, _ = _start(strategy, params, fitness_fn, key_population, key_init, num_layers,
                                  evaluate=False)
    template = loop_state(template_state, key_loop, 0, np.zeros((total_evaluations, dims), np.float32),
                          np.zeros((total_evaluations,), np.float32))
    saved, _ = checkpoints.restore(mngr, template, expect=meta)
    state = canonical_state(jax.tree.map(jnp.asarray, saved["state"]))
    key_loop = jax.random.wrap_key_data(jnp.asarray(saved["key_loop"]))
    evaluated = int(saved["evaluated"])
    history_population = np.array(saved["history_population"])
    history_fitness = np.array(saved["history_fitness"])
    if on_restore is not None:
      on_restore(history_population[:evaluated], history_fitness[:evaluated])
    if jax.process_index() == 0:
      print(f"search: resumed after {evaluated} of {total_evaluations} evaluations ({checkpoint_dir})",
            file=sys.stderr, flush=True)
  else:
    state, population, fitness = _start(strategy, params, fitness_fn, key_population, key_init, num_layers,
                                        slice_size=initial_slice, bar=bar)
    evaluated = population.shape[0]
    history_population = np.full((total_evaluations, dims), np.nan, np.float32)
    history_fitness = np.full((total_evaluations,), np.nan, np.float32)
    history_population[:evaluated] = np.asarray(population)
    history_fitness[:evaluated] = np.asarray(fitness)
    if mngr is not None:
      checkpoints.save(mngr, evaluated, loop_state(state, key_loop, evaluated, history_population,
                                                   history_fitness), meta)

  batch = generation_size(strategy)
  if bar is not None:
    bar.n = evaluated
    bar.set_postfix(best=float(state.best_fitness))
  while evaluated < total_evaluations:
    key_loop, key_ask, key_tell = jax.random.split(key_loop, 3)
    population, state = strategy.ask(key_ask, state, params)
    n = min(batch, total_evaluations - evaluated)
    fitness = _evaluate(fitness_fn, population[:n])
    if isinstance(strategy, AgingEvolution):
      state, _ = strategy.tell(key_tell, population[:n], fitness, state, params)
    else:
      padded = jnp.concatenate([fitness, jnp.full((batch - n,), jnp.nan, jnp.float32)])
      state, _ = strategy.tell(key_tell, population, padded, state, params)
    history_population[evaluated:evaluated + n] = np.asarray(population[:n])
    history_fitness[evaluated:evaluated + n] = np.asarray(fitness)
    evaluated += n
    if mngr is not None:
      checkpoints.save(mngr, evaluated, loop_state(state, key_loop, evaluated, history_population,
                                                   history_fitness), meta)
    if bar is not None:
      bar.update(n)
      bar.set_postfix(best=float(state.best_fitness))
  if bar is not None:
    bar.close()
  return SearchResult(
      best_solution=state.best_solution,
      best_fitness=state.best_fitness,
      history_population=jnp.asarray(history_population),
      history_fitness=jnp.asarray(history_fitness),
      state=state,
  )
