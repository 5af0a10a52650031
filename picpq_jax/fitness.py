"""Fitness of search candidates: prune by (a, b), fine-tune tau SGD steps, validation cross-entropy.

For every candidate (METHOD.md, "Search"):
  (a, b) -> masks (pruning.prune_masks to the FLOPs target)
         -> tau SGD steps from the baseline weights with those masks (BatchNorm in training mode, the SAME
            training batches for every candidate)
         -> mean validation cross-entropy (eval mode).
A candidate whose target is unreachable, or whose loss is not finite, gets NaN (evosax: failed).

Four ways to run the candidates (`search.eval_mode`). The first three run the full network with the masks
folded into BatchNorm (`fold_masks`: the masked computation at the dense step's cost), sharded over this
process's devices along the candidate axis (shard_map; with many processes each takes its share of every
group, `PopulationFitness.__call__`) in groups of devices x `chunk_size`, so memory stays bounded
by one group:
  'vmap'    one compiled function per group: prune, lax.scan over the tau steps, lax.scan over validation,
            vmapped over the chunk's candidates. The point on GPU/TPU: the whole group is one batched program.
  'map'     the same compiled function, but the chunk's candidates run one after another (lax.map).
  'host'    the tau steps are a Python loop over one compiled (vmapped) step; no loop inside the program.
  'sliced'  (CPU) only what the plan keeps: each candidate's kept channels are cut out of the baseline by the
            export's slicing (export.slice_variables / slim_spec), and the slimmed network is fine-tuned and
            validated, one candidate after another on one device, with the same tau steps on the same
            batches. Each layer's width is rounded up to a multiple of SLICE_WIDTH_MULTIPLE with pruned
            channels that stay masked (`round_up_widths`): XLA's CPU code runs odd widths no faster than
            the next multiple of 8 and compiles them slower. Its train and validation steps are compiled
            once per distinct set of rounded widths (`SlimPrograms`, a cache), so candidates keeping about
            as many channels in every layer share them; in a search most candidates still have widths of
            their own and compile. Its losses equal the
            masked modes' to float32 rounding (tests/test_fitness_sliced.py; `PopulationFitness.sliced_loss`
            says why BatchNorm and the optimizer agree). Not with search.quantize (the weight quantizer's
            scale reads the pruned filters too).
'auto' is 'vmap' off the CPU; on the CPU it is 'sliced' for tau >= SLICED_MIN_TAU without search.quantize,
else 'host'. Measured on a 2-core AMD EPYC (AVX2), loaded by other work, ResNet-56 at 45 % of the FLOPs,
batch 128 (bench/bench_train_step.py, bench/bench_fitness.py): the slimmed step takes 0.67x the dense one
(PyTorch's pruned model: 0.96x its dense one there), and its compile costs about 12 dense steps per
candidate, so slicing pays from about 40 steps on (bench/bench_fitness.py prints the crossover and the
seconds per candidate of each mode at the original's tau 200). XLA CPU (jaxlib 0.10.2) runs conv training steps inside a while loop (lax.scan / fori_loop /
lax.map) about 25-50x slower than the same step called from Python, and a vmapped conv with per-candidate
weights is a grouped conv, slow there too (2.3x the sequential cost for 4 ResNet-20 candidates): hence no
'vmap' / 'map' on the CPU.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

from picpq_jax import bits as bits_lib
from picpq_jax import export, hosts, pruning, training
from picpq_jax.models.spec import ArchSpec
from picpq_jax.topology import Topology

EVAL_MODES = ('auto', 'vmap', 'map', 'host', 'sliced')
# 'auto' on a CPU: 'sliced' from this many fine-tune steps on (see the module docstring), else 'host'.
SLICED_MIN_TAU = 50
SLIM_CACHE_SIZE = 8  # compiled slim networks kept (each a train step and a validation step)
# The 'sliced' mode's layer widths are rounded up to a multiple of this (`round_up_widths`). Measured on a
# 2-core AMD EPYC (AVX2), ResNet-56 at 45 % of the FLOPs, batch 128, one core, paired in one process (6
# rounds): exact widths (1,463 channels) compile their train step in 31.3 s, rounded to 8 (1,544) in 19.7 s;
# the step takes 0.986x the exact widths' CPU time and the validation step 0.93x.
SLICE_WIDTH_MULTIPLE = 8


def resolve_eval_mode(mode: str, backend: Optional[str] = None, tau: Optional[int] = None,
                      quantize: bool = False) -> str:
  """The mode that runs: `mode`, or for 'auto' the fastest measured one for the backend, tau and quantize."""
  if mode not in EVAL_MODES:
    raise ValueError(f'search.eval_mode={mode!r} is not a mode; choose one of {list(EVAL_MODES)}.')
  if mode == 'sliced' and quantize:
    raise ValueError("search.eval_mode='sliced' fine-tunes without bits, but search.quantize=True asks for them "
                     "(the weight quantizer's scale reads the pruned filters too); use eval_mode 'host' or "
                     "'auto', or search.quantize=False.")
  if mode != 'auto':
    return mode
  if (backend or jax.default_backend()) != 'cpu':
    return 'vmap'
  return 'sliced' if (not quantize and tau is not None and tau >= SLICED_MIN_TAU) else 'host'


def search_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The fine-tune inside the fitness: SGD lr 0.01, momentum 0.9, weight decay 5e-4 by default."""
  return training.make_optimizer(cfg, optax.constant_schedule(cfg.learning_rate))


def fold_masks(params: Mapping[str, Any], masks: Mapping[str, Any]) -> dict:
  """params with each masked conv's BatchNorm scale and bias multiplied by its channel mask (C,).

  A conv unit computes BN(y) * m = (y - mean) * rsqrt(var + eps) * scale * m + bias * m; with the mask in
  scale and bias, the output, the running statistics and every gradient are the same (m is 0 or 1, so the
  products are exact), but the mask costs a (C,) product instead of a pass over the (B, H, W, C) output and
  another over its gradient (the masked train step's overhead over the dense one: bench/bench_mask_overhead.py).
  """
  out = dict(params)
  for name, m in masks.items():
    bn = dict(out[name]['bn'])
    bn['scale'], bn['bias'] = bn['scale'] * m, bn['bias'] * m
    out[name] = dict(out[name], bn=bn)
  return out


def round_up_widths(spec: ArchSpec, keep: Mapping[str, np.ndarray], multiple: int
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Each layer's kept channels (export.kept_indices) padded with its first pruned ones up to a multiple of
  `multiple` (at most the layer's width), and the masks that keep the padding pruned in the slim network.

  Returns (keep, masks): layer -> sorted channel indices; layer -> (len(keep),) float32, 1 where the channel
  was kept, 0 where it pads. Layers with equal plans (a chain, a depthwise conv and its source) get equal
  padding, as slim_spec requires.
  """
  out, masks = {}, {}
  for c in spec.convs:
    kept = np.asarray(keep[c.name])
    width = min(-(-len(kept) // multiple) * multiple, c.out_channels)
    padding = np.setdiff1d(np.arange(c.out_channels), kept)[:width - len(kept)]
    out[c.name] = np.sort(np.concatenate([kept, padding])).astype(kept.dtype)
    masks[c.name] = np.isin(out[c.name], kept).astype(np.float32)
  return out, masks


class MasksInBatchNorm:
  """`model` whose apply(variables, ..., masks=...) folds per-channel masks into BatchNorm (`fold_masks`)
  and runs the model without them; the other arguments pass through."""

  def __init__(self, model):
    self.model = model

  def apply(self, variables, *args, masks=None, **kwargs):
    if masks:
      variables = dict(variables, params=fold_masks(variables['params'], masks))
    return self.model.apply(variables, *args, **kwargs)


class CandidateFns:
  """The per-candidate pieces, each a pure function of one candidate (vmap / shard_map them freely).

  prune(a, b) -> (masks, info); start(variables) -> TrainState; step(state, batch, masks) -> state;
  validate(state, val_batch, masks) -> {'loss','correct','count'} sums; result(total, info) -> outputs.
  The masks of a candidate are folded into BatchNorm (`fold_masks`), the same computation at the dense cost.
  """

  def __init__(self, model, topology: Topology, fp_padded: np.ndarray, cfg: ml_collections.ConfigDict):
    self.cfg = cfg
    self.model = model
    self.tx = search_optimizer(cfg)
    self._train_step = training.make_train_step(MasksInBatchNorm(model), self.tx)
    self._eval_step = training.make_eval_step(MasksInBatchNorm(model))
    self._topology, self._fp = topology, fp_padded

  def prune(self, a, b):
    c = self.cfg
    return pruning.prune_masks(self._topology, self._fp, a, b, c.keep_fraction, c.safeguard, c.check_every)

  def start(self, variables) -> training.TrainState:
    params = variables['params']
    return training.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               batch_stats=variables['batch_stats'], opt_state=self.tx.init(params))

  def bits(self, baseline_params, masks):
    """With search.quantize, the bits bits.py assigns to these masks (weights and activations), else None."""
    if not self.cfg.quantize:
      return None
    per_layer = bits_lib.assign_bits_traced(self._topology, baseline_params, masks, self.cfg.bit_penalty,
                                            self.cfg.min_bits)
    return {name: jnp.stack([b, b]) for name, b in per_layer.items()}

  def step(self, state, batch, masks, bits=None):
    return self._train_step(state, batch, masks, bits)[0]

  def validate(self, state, batch, masks, bits=None):
    return self._eval_step(state.variables, batch, masks, bits)

  @staticmethod
  def result(total, info):
    loss = total['loss'] / total['count']
    ok = info['reached'] & jnp.isfinite(loss)
    return {'loss': jnp.where(ok, loss, jnp.nan), 'flops': info['flops'].astype(jnp.float32),
            'reached': info['reached']}

  def whole(self, a, b, variables, train_batches, val_batches):
    """One candidate end to end in one program: (a (L,), b (L,)) -> outputs (scalars)."""
    masks, info = self.prune(a, b)
    bits = self.bits(variables['params'], masks)
    state = jax.lax.scan(lambda s, batch: (self.step(s, batch, masks, bits), None), self.start(variables),
                         train_batches)[0]
    total = jax.lax.scan(
        lambda t, batch: (jax.tree.map(jnp.add, t, self.validate(state, batch, masks, bits)), None),
        _zero_totals(), val_batches)[0]
    return self.result(total, info)


class SlimPrograms:
  """The compiled train step and validation step of the slimmed network, one pair per distinct set of layer
  widths, so that candidates keeping as many channels in every layer share one compiled pair.

  programs(slim_spec) -> (step, validate): step(state, batch, masks) -> (state, metrics) (the state is
  donated), validate(variables, batch, masks) -> {'loss', 'correct', 'count'} sums, the masks (of the slim
  widths; `round_up_widths`) folded into BatchNorm as the masked modes do; `slim_spec` (export.slim_spec) is
  hashable and equal exactly when the widths are. The `capacity` most recently used pairs are kept.
  `built` counts the pairs built (tests; progress).
  """

  def __init__(self, model, tx: optax.GradientTransformation, capacity: int = SLIM_CACHE_SIZE):
    self._model, self._tx, self._capacity = model, tx, capacity
    self._cache: dict[ArchSpec, tuple[Callable, Callable]] = {}
    self.built = 0

  def __call__(self, slim: ArchSpec) -> tuple[Callable, Callable]:
    if slim in self._cache:
      self._cache[slim] = self._cache.pop(slim)  # most recently used last
      return self._cache[slim]
    model = MasksInBatchNorm(self._model.clone(spec=slim, parent=None))  # the same settings, fewer channels
    pair = (jax.jit(training.make_train_step(model, self._tx), donate_argnums=0),
            jax.jit(training.make_eval_step(model)))
    self._cache[slim] = pair
    self.built += 1
    while len(self._cache) > self._capacity:
      self._cache.pop(next(iter(self._cache)))
    return pair


def _on_device(tree, device):
  """The leaves copied into new buffers committed to `device`: donating them cannot touch the baseline's,
  and the first step sees arguments placed as its outputs are (an uncommitted argument would compile the
  step a second time)."""
  return jax.device_put(jax.tree.map(lambda x: np.array(x, copy=True), tree), device)


def _zero_totals():
  return {'loss': jnp.zeros(()), 'correct': jnp.zeros(()), 'count': jnp.zeros(())}


def _over_chunk(fn: Callable, mode: str, in_axes) -> Callable:
  """Apply a per-candidate fn to a chunk of candidates: vmapped, or one after another (lax.map)."""
  if mode in ('vmap', 'host'):
    return jax.vmap(fn, in_axes=in_axes)

  def mapped(*args):
    mapped_args = [x for x, ax in zip(args, in_axes) if ax == 0]
    fixed = [x for x, ax in zip(args, in_axes) if ax is None]

    def one(xs):
      it_m, it_f = iter(xs), iter(fixed)
      return fn(*[next(it_m) if ax == 0 else next(it_f) for ax in in_axes])

    return jax.lax.map(one, mapped_args)
  return mapped


def _sharded(fn: Callable, mesh: Mesh, in_axes) -> Callable:
  """jit(shard_map(fn)): arguments with in_axes 0 are split over the devices, the others replicated."""
  specs = tuple(P('data') if ax == 0 else P() for ax in in_axes)
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P('data'), check_vma=False))


def pad_population(x: np.ndarray, multiple: int) -> np.ndarray:
  """Pad the candidate axis to a multiple by repeating the last candidate (its result is discarded)."""
  k = x.shape[0]
  size = -(-k // multiple) * multiple
  return np.concatenate([x, np.repeat(x[-1:], size - k, axis=0)]) if size > k else x


class PopulationFitness:
  """fitness(a (K, L), b (K, L)) -> {'loss', 'flops', 'reached'}, each (K,), for any K.

  Candidates go through in groups of mesh.size * chunk_size (the last group padded; with N processes, groups
  of N times that, each process running its share on its own devices); `on_group(n)` is called after each
  group with the number of real candidates it held (progress bars).
  """

  def __init__(self, fns: CandidateFns, variables: Mapping[str, Any], train_batches, val_batches,
               chunk_size: int = 1, mode: str = 'auto', mesh: Optional[Mesh] = None):
    # This process's devices: with many processes each evaluates its share of every group (__call__).
    self.mesh = mesh or hosts.local_mesh()
    self.chunk_size = max(1, int(chunk_size))
    self._num_steps = int(jax.tree.leaves(train_batches)[0].shape[0])
    self._num_val = int(jax.tree.leaves(val_batches)[0].shape[0])
    self.mode = resolve_eval_mode(mode, tau=self._num_steps, quantize=bool(fns.cfg.quantize))
    self.fns = fns
    self.step_seconds: Optional[list[float]] = None  # a list: the host and sliced modes time each step in it
    self.step_clock: Callable[[], float] = time.perf_counter  # or time.process_time (CPU seconds)
    if self.mode == 'sliced':
      self._init_sliced(variables, train_batches, val_batches)
      return
    self.group = self.mesh.size * self.chunk_size
    rep = lambda tree: training.replicate(tree, self.mesh)  # noqa: E731
    self._variables, self._train, self._val = rep(variables), rep(train_batches), rep(val_batches)
    if self.mode in ('vmap', 'map'):
      self._whole = _sharded(_over_chunk(fns.whole, self.mode, (0, 0, None, None, None)), self.mesh,
                             (0, 0, None, None, None))
    else:
      self._prune = _sharded(_over_chunk(fns.prune, 'vmap', (0, 0)), self.mesh, (0, 0))
      self._start = _sharded(lambda masks, v: jax.vmap(lambda m: fns.start(v))(
          jax.tree.leaves(masks)[0]), self.mesh, (0, None))
      self._bits = _sharded(_over_chunk(fns.bits, 'vmap', (None, 0)), self.mesh, (None, 0))
      self._step = _sharded(_over_chunk(fns.step, 'vmap', (0, None, 0, 0)), self.mesh, (0, None, 0, 0))
      self._validate = _sharded(_over_chunk(fns.validate, 'vmap', (0, None, 0, 0)), self.mesh, (0, None, 0, 0))
      self._result = _sharded(_over_chunk(fns.result, 'vmap', (0, 0)), self.mesh, (0, 0))

  def _timed(self, step: Callable, *args):
    """step(*args), its seconds by `step_clock` appended to `step_seconds` when that is a list (benches:
    each step then waits for the previous one, which costs a little of the dispatch overlap)."""
    if self.step_seconds is None:
      return step(*args)
    t0 = self.step_clock()
    out = jax.block_until_ready(step(*args))
    self.step_seconds.append(self.step_clock() - t0)
    return out

  def _init_sliced(self, variables, train_batches, val_batches):
    """The sliced mode runs on one device, one candidate after another, so nothing is replicated: the
    baseline stays on the host (it is sliced there) and each batch is put on the device once."""
    self.group = self.chunk_size
    self._baseline = jax.device_get(variables)
    self._spec = self.fns.model.spec
    self.slim_programs = SlimPrograms(self.fns.model, self.fns.tx)
    self._device = device = jax.local_devices()[0]
    batches = lambda tree, n: [jax.device_put({k: np.asarray(v[i]) for k, v in tree.items()}, device)  # noqa: E731
                               for i in range(n)]
    self._train_list = batches(train_batches, self._num_steps)
    self._val_list = batches(val_batches, self._num_val)
    self._prune_batched = jax.jit(jax.vmap(self.fns.prune))

  def sliced_loss(self, masks: Mapping[str, np.ndarray]) -> float:
    """The fitness of one plan computed on the slimmed network: masks (layer -> (out_channels,) 0/1) ->
    the mean validation cross-entropy after the tau steps.

    Equal to the masked computation to float32 rounding: a masked channel is 0 after its BatchNorm, so it
    adds nothing downstream and its own weights never reach a kept channel (their gradients are zero; weight
    decay and momentum act on each parameter alone); BatchNorm statistics are per channel, so those of a
    kept channel are computed from the same values in both; the slim conv reads the kept inputs only, and
    the masked one reads zeros elsewhere. The channels that round the widths up are masked as in the
    masked modes, so the same holds for them.
    """
    keep, slim_masks = round_up_widths(self._spec, export.kept_indices(self._spec, masks), SLICE_WIDTH_MULTIPLE)
    step, validate = self.slim_programs(export.slim_spec(self._spec, keep))
    state = _on_device(self.fns.start(export.slice_variables(self._spec, self._baseline, keep)), self._device)
    slim_masks = jax.device_put(slim_masks, self._device)
    for batch in self._train_list:
      state = self._timed(step, state, batch, slim_masks)[0]
    sums = [validate(state.variables, batch, slim_masks) for batch in self._val_list]
    total = jax.device_get(jax.tree.map(lambda *x: sum(x), *sums))
    return float(total['loss']) / float(total['count'])

  def _sliced_group(self, a, b, real: int):
    """A group's candidates, the first `real` of them each fine-tuned and validated on its slimmed network
    (the rest are padding: NaN, not run)."""
    masks, info = jax.device_get(self._prune_batched(a, b))
    loss = np.full(len(a), np.nan, np.float32)
    for i in np.flatnonzero(info['reached'][:real]):  # an unreached target fails without running
      loss[i] = self.sliced_loss({name: m[i] for name, m in masks.items()})
    loss = np.where(np.isfinite(loss), loss, np.nan).astype(np.float32)
    return {'loss': loss, 'flops': info['flops'].astype(np.float32), 'reached': info['reached']}

  def _host_group(self, a, b):
    """One group with the tau steps as a Python loop over one compiled step (no loop in the program)."""
    masks, info = self._prune(a, b)
    state = self._start(masks, self._variables)
    bits = self._bits(self._variables['params'], masks) if self.fns.cfg.quantize else None
    for i in range(self._num_steps):
      batch = jax.tree.map(lambda x: x[i], self._train)
      state = self._timed(self._step, state, batch, masks, bits)
    total = None
    for i in range(self._num_val):
      out = self._validate(state, jax.tree.map(lambda x: x[i], self._val), masks, bits)
      total = out if total is None else jax.tree.map(jnp.add, total, out)
    return self._result(total, info)

  def __call__(self, a: np.ndarray, b: np.ndarray, on_group: Optional[Callable[[int], None]] = None):
    # With N processes a group of N x `group` candidates is split into N parts, each evaluated by its
    # process on its own devices, and the results gathered: every process returns every candidate's.
    k = a.shape[0]
    count, index = jax.process_count(), jax.process_index()
    span = self.group * count
    a_p = pad_population(np.asarray(a, np.float32), span)
    b_p = pad_population(np.asarray(b, np.float32), span)
    outs = []
    for start in range(0, a_p.shape[0], span):
      mine = slice(start + index * self.group, start + (index + 1) * self.group)
      ga, gb = a_p[mine], b_p[mine]
      if self.mode == 'sliced':
        out = self._sliced_group(ga, gb, max(0, min(self.group, k - mine.start)))
      elif self.mode == 'host':
        out = self._host_group(ga, gb)
      else:
        out = self._whole(ga, gb, self._variables, self._train, self._val)
      outs.append(hosts.gather_rows(jax.device_get(out)))
      if on_group is not None:
        on_group(min(span, k - start))
    return {key: np.concatenate([o[key] for o in outs])[:k] for key in outs[0]}


# ----------------------------------------------------------------------------------------------------------
# Each distinct pruning plan evaluated once
# ----------------------------------------------------------------------------------------------------------


def plan_keys(topology: Topology, masks: Mapping[str, Any]) -> list[bytes]:
  """One key per candidate, equal exactly when two candidates keep the same channels.

  masks: layer name -> (K, out_channels) 0/1 (pruning.prune_masks_batched); the key is the packed bits of
  every layer's mask in forward order.
  """
  flat = np.concatenate([np.asarray(masks[name]) > 0.5 for name in topology.names], axis=1)
  return [row.tobytes() for row in np.packbits(flat, axis=1)]


def repeated_plans(keys: list[bytes]) -> np.ndarray:
  """(K,) bool: candidate i's plan equals that of a candidate before it (in evaluation order)."""
  seen: set[bytes] = set()
  out = np.zeros(len(keys), bool)
  for i, key in enumerate(keys):
    out[i] = key in seen
    seen.add(key)
  return out


class PlanCache:
  """losses(a (K, L), b (K, L)) -> (K,) with each distinct pruning plan evaluated only once.

  The fitness is a deterministic function of a candidate's masks (every candidate fine-tunes on the same
  tau batches from the same baseline and is validated on the same batches), so two candidates with one plan
  have one loss: the later one takes the stored value without running. This is ours, not the original's
  (which fine-tunes every candidate); the search's result is the same. `remember` refills the store from a
  restored search history, so a resumed search skips exactly what an uninterrupted one skips.

  evaluate(a, b) -> losses (n,) of n candidates; plans(a, b) -> one key per candidate (`plan_keys`).
  """

  def __init__(self, evaluate: Callable[[np.ndarray, np.ndarray], np.ndarray],
               plans: Callable[[np.ndarray, np.ndarray], list[bytes]]):
    self._evaluate, self._plans = evaluate, plans
    self._loss: dict[bytes, float] = {}
    self.evaluated = 0  # candidates actually run by this object (progress and tests)

  def remember(self, a: np.ndarray, b: np.ndarray, loss: np.ndarray) -> None:
    for key, value in zip(self._plans(a, b), np.asarray(loss, np.float32)):
      self._loss.setdefault(key, value)

  def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    keys = self._plans(a, b)
    first = {}  # key -> index of its first candidate here, for plans not stored yet
    for i, key in enumerate(keys):
      if key not in self._loss:
        first.setdefault(key, i)
    if first:
      rows = np.asarray(list(first.values()))
      losses = np.asarray(self._evaluate(np.asarray(a)[rows], np.asarray(b)[rows]), np.float32)
      self._loss.update(zip(first, losses))
      self.evaluated += len(rows)
    return np.asarray([self._loss[key] for key in keys], np.float32)
