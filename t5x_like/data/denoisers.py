"""UL2's mixture of denoisers (Tay et al., 2022) and U-PaLM's UL2R, as seqio mixtures.

A `Denoiser` is one objective: span corruption with noise density r and mean
span length mu (R-denoisers: regular, short spans at low density; X-denoisers:
extreme, long spans and/or high density), or sequential denoising (S: a prefix
and its continuation). Every input starts with the family's mode token
([NLU] for R, [NLG] for X, [S2S] for S; ids in `preprocessors.MODE_TOKENS`),
so a model can be told at fine-tuning time which mode to use.

`register_denoising_mixture(name, sources, denoisers)` registers, for every
source (a domain) and denoiser, one seqio Task, one mixture per denoiser over
the sources, and the top mixture `name` over the denoisers at their rates.
The tasks serve encoder-decoders ({'inputs': ..., 'targets': ...} lengths)
and decoder-only models alike: with an `inputs` length, the decoder's feature
converter is seqio's prefix-LM one, so the inputs are attended bidirectionally
and the loss is on the targets only.

Presets:
  UL2:  R(mu 3, r 0.15), R(mu 8, r 0.15), X(mu 3, r 0.5), X(mu 8, r 0.5),
        X(mu 64, r 0.15), X(mu 64, r 0.5) and S(r 0.25), sampled uniformly (1/7
        each), as the paper's `ul2_objective` does when given no rates (Tay et
        al., 2022, "UL2: Unifying Language Learning Paradigms", arXiv:2205.05131,
        the code in its appendix). Other rates: `register_denoising_mixture(...,
        rates=...)`, or `Denoiser(..., rate=...)`.
  UL2R: U-PaLM's continued training of a causal decoder: 50% S, 25% R
        (mu 3, r 0.15) and 25% X, split between (mu 32, r 0.15) and (mu 3, r 0.5).
"""

import dataclasses
import functools
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

from t5x_like.data import tf_setup  # pylint: disable=unused-import,g-bad-import-order  (TensorFlow, quietly, first)
import seqio

from t5x_like.data import mixtures
from t5x_like.data import preprocessors as prep
from t5x_like.data import registry

FAMILIES = ('R', 'X', 'S')
FAMILY_MODE = {'R': '[NLU]', 'X': '[NLG]', 'S': '[S2S]'}


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """One denoising objective and its share of the mixture.

  Attributes:
    family: 'R', 'X' or 'S'.
    noise_density: r, the expected fraction of tokens in the targets.
    mean_noise_span_length: mu (R and X only; S has one span).
    rate: the relative number of examples drawn from this denoiser.
    mode: the mode token; None means the family's.
  """
  family: str
  noise_density: float
  mean_noise_span_length: Optional[float] = None
  rate: float = 1.0
  mode: Optional[str] = None

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise prep.ObjectiveError(f'denoiser family {self.family!r} is not one of {FAMILIES}')
    if (self.family == 'S') != (self.mean_noise_span_length is None):
      raise prep.ObjectiveError(
          f'{self.family}-denoiser: mean_noise_span_length must be '
          f'{"unset" if self.family == "S" else "set"}')
    if self.mode is None:
      object.__setattr__(self, 'mode', FAMILY_MODE[self.family])

  @property
  def name(self) -> str:
    r = f'r{round(self.noise_density * 100):g}'
    if self.family == 'S':
      return f's_{r}'
    return f'{self.family.lower()}_mu{self.mean_noise_span_length:g}_{r}'

  def preprocessor(self):
    if self.family == 'S':
      return functools.partial(prep.sequential_denoising, noise_density=self.noise_density,
                               mode=self.mode)
    return functools.partial(prep.span_corruption, noise_density=self.noise_density,
                             mean_noise_span_length=self.mean_noise_span_length, mode=self.mode)


# Equal rates: UL2's `ul2_objective` samples its denoisers uniformly unless given rates.
UL2 = (
    Denoiser('R', 0.15, 3.0),
    Denoiser('R', 0.15, 8.0),
    Denoiser('X', 0.5, 3.0),
    Denoiser('X', 0.5, 8.0),
    Denoiser('X', 0.15, 64.0),
    Denoiser('X', 0.5, 64.0),
    Denoiser('S', 0.25),
)
UL2R = (
    Denoiser('R', 0.15, 3.0, rate=0.25),
    Denoiser('X', 0.15, 32.0, rate=0.125),
    Denoiser('X', 0.5, 3.0, rate=0.125),
    Denoiser('S', 0.25, rate=0.5),
)
PRESETS = {'ul2': UL2, 'ul2r': UL2R}

# Task name -> (the Task registered, its denoiser), for per-family metrics. A Task
# registered again under the same name by anyone is a different object, and no denoiser.
_TASK_DENOISER: Dict[str, Tuple[seqio.Task, Denoiser]] = {}


def _resolve(spec: Union[str, Sequence[Denoiser]]) -> Tuple[Denoiser, ...]:
  if isinstance(spec, str):
    if spec not in PRESETS:
      raise prep.ObjectiveError(f'unknown denoiser preset {spec!r}: use one of '
                                f'{", ".join(PRESETS)} or a list of Denoiser')
    return PRESETS[spec]
  spec = tuple(spec)
  if not spec:
    raise prep.ObjectiveError('a denoising mixture needs at least one denoiser')
  names = [d.name for d in spec]
  if len(set(names)) != len(names):
    raise prep.ObjectiveError(f'denoisers repeat: {names}')
  return spec


def register_denoising_mixture(name: str, sources: Mapping[str, seqio.DataSource],
                               denoisers: Union[str, Sequence[Denoiser]] = 'ul2',
                               vocabulary: Optional[seqio.Vocabulary] = None,
                               source_rates: Optional[Mapping[str, float]] = None,
                               shuffle_buffer_size: int = seqio.SHUFFLE_BUFFER_SIZE,
                               rates: Optional[Sequence[float]] = None) -> str:
  """Registers the tasks and mixtures of a mixture of denoisers; returns `name`.

  Args:
    name: the top mixture's name.
    sources: domain name -> seqio DataSource yielding {'text': string}.
    denoisers: a preset name ('ul2', 'ul2r') or a list of `Denoiser`.
    vocabulary: the vocabulary (default: bytes with 100 extra ids); it must have
      extra ids for the three mode tokens and the sentinels.
    source_rates: domain -> relative rate within each denoiser (default equal).
    shuffle_buffer_size: examples shuffled per task before mixing.
    rates: relative rates of the denoisers, in their order (default: each
      `Denoiser.rate`; the 'ul2' preset's are equal).
  """
  if vocabulary is None:
    vocabulary = registry.DEFAULT_VOCABULARY
  spec = _resolve(denoisers)
  for d in spec:
    prep.mode_token_id(vocabulary, d.mode)  # fails early without room for mode tokens
  if not sources:
    raise mixtures.MixtureError(f'denoising mixture {name!r} has no sources')
  features = {'inputs': seqio.Feature(vocabulary, add_eos=True),
              'targets': seqio.Feature(vocabulary, add_eos=True)}
  per_denoiser = []
  for d in spec:
    task_names = []
    for domain, source in sources.items():
      task = f'{name}_{domain}_{d.name}'
      registered = registry.register_seqio_task(
          task, source, [registry.TEXT_TO_TARGETS, seqio.preprocessors.tokenize, d.preprocessor(),
                         seqio.preprocessors.append_eos_after_trim], features, shuffle_buffer_size)
      _TASK_DENOISER[task] = (registered, d)
      task_names.append(task)
    per_source = [source_rates[s] for s in sources] if source_rates else None
    per_denoiser.append(mixtures.register_mixture(f'{name}_{d.name}', task_names, per_source))
  if rates is None:
    rates = [d.rate for d in spec]
  return mixtures.register_mixture(name, per_denoiser, list(rates))


def loss_groups(mixture_or_task_name: str) -> Dict[str, int]:
  """Family ('R', 'X', 'S') -> mode token id, for the denoisers a mixture uses.

  Empty when no task of the mixture is a denoiser. Metrics per family are
  computed from the mode token that starts each example's inputs.
  """
  entry = seqio.get_mixture_or_task(mixture_or_task_name)
  tasks = entry.tasks if isinstance(entry, seqio.Mixture) else [entry]
  groups = {}
  for task in tasks:
    registered, d = _TASK_DENOISER.get(task.name, (None, None))
    if registered is not task:
      continue
    mode_id = prep.mode_token_id(task.output_features['targets'].vocabulary, d.mode)
    label = d.family if groups.get(d.family, mode_id) == mode_id else f'{d.family}{d.mode}'
    groups[label] = mode_id
  return dict(sorted(groups.items()))
