"""Denoisers (T5 span corruption, UL2, UL2R) and mixtures: statistics over >= 10,000
examples, exact reconstruction, realised mixing rates and bad input."""

import functools

import numpy as np
import pytest
import seqio
import tensorflow as tf

from models import model as model_lib
from t5x_like import train as train_lib
from t5x_like import trainer as trainer_lib
from t5x_like.data import corpus
from t5x_like.data import denoisers
from t5x_like.data import mixtures
from t5x_like.data import pipeline
from t5x_like.data import preprocessors as prep
from t5x_like.data import tasks

import testing_utils as tu

VOCAB = tasks.DEFAULT_VOCABULARY
V = VOCAB.vocab_size
FIRST_SENTINEL = V - prep.num_sentinels(VOCAB)  # sentinels are [FIRST_SENTINEL, V)
MODE_IDS = {m: prep.mode_token_id(VOCAB, m) for m in prep.MODE_TOKENS}
FEATURES = {'inputs': seqio.Feature(VOCAB), 'targets': seqio.Feature(VOCAB)}
LENGTHS = {'inputs': 512, 'targets': 512}
EXAMPLES = 10_000


def _corpus_tokens():
  """The embedded corpus (both domains, train split), tokenized, repeated."""
  corpus.build()
  files = [corpus.record_path(d, 'train') for d in corpus.DOMAINS]
  ds = tf.data.Dataset.from_tensor_slices(files).interleave(tf.data.TFRecordDataset, cycle_length=2)
  return ds.map(lambda t: {'targets': VOCAB.encode_tf(t)}).repeat()


def _reconstruct(inputs, targets):
  """Substitutes the targets back for the sentinels of the inputs."""
  t_sent = np.flatnonzero(targets >= FIRST_SENTINEL)
  spans = {int(targets[i]): targets[i + 1:j] for i, j in zip(t_sent, list(t_sent[1:]) + [len(targets)])}
  i_sent = np.flatnonzero(inputs >= FIRST_SENTINEL)
  pieces, prev = [], 0
  for i in i_sent:
    pieces += [inputs[prev:i], spans[int(inputs[i])]]
    prev = i + 1
  pieces.append(inputs[prev:])
  return np.concatenate(pieces)


SPAN_DENOISERS = sorted({(d.noise_density, d.mean_noise_span_length, d.mode)
                         for d in denoisers.UL2 + denoisers.UL2R if d.family != 'S'}
                        | {(0.15, 3.0, None)}, key=str)  # T5's default: no mode token


@pytest.mark.rotate(2)
@pytest.mark.parametrize('density,mu,mode', SPAN_DENOISERS)
def test_span_denoiser_statistics_and_exact_reconstruction(density, mu, mode):
  pre = functools.partial(prep.span_corruption, sequence_length=LENGTHS, output_features=FEATURES,
                          noise_density=density, mean_noise_span_length=mu, mode=mode)
  n = prep.span_corruption_chunk_length(LENGTHS, density, mu, prep.num_sentinels(VOCAB),
                                        int(mode is not None))
  with seqio.utils.map_seed_manager(1):
    out = pre(_corpus_tokens()).take(EXAMPLES)
  chunks = prep.concat_and_split(_corpus_tokens(), n, VOCAB.eos_id).take(EXAMPLES)
  noise = total = spans = 0
  count = 0
  for ex, chunk in zip(out.as_numpy_iterator(), chunks.as_numpy_iterator()):
    inputs, targets, chunk = ex['inputs'], ex['targets'], chunk['targets']
    if mode is not None:
      assert inputs[0] == MODE_IDS[mode]
      inputs = inputs[1:]
    assert len(inputs) + 1 <= LENGTHS['inputs'] and len(targets) + 1 <= LENGTHS['targets']
    np.testing.assert_array_equal(_reconstruct(inputs, targets), chunk)
    k = int(np.sum(inputs >= FIRST_SENTINEL))
    assert k == int(np.sum(targets >= FIRST_SENTINEL)) or k + 1 == int(np.sum(targets >= FIRST_SENTINEL))
    noise += int(np.sum(targets < FIRST_SENTINEL))
    spans += k
    total += len(chunk)
    count += 1
  assert count == EXAMPLES
  assert abs(noise / total - density) / density < 0.02, noise / total
  assert abs(noise / spans - mu) / mu < 0.02, noise / spans


@pytest.mark.parametrize('density', [0.25])
def test_sequential_denoiser_statistics_and_exact_reconstruction(density):
  n = prep.sequential_chunk_length(LENGTHS, density, 1)
  with seqio.utils.map_seed_manager(1):
    out = prep.sequential_denoising(_corpus_tokens(), LENGTHS, FEATURES, density).take(EXAMPLES)
  chunks = prep.concat_and_split(_corpus_tokens(), n, VOCAB.eos_id).take(EXAMPLES)
  target_tokens = total = count = 0
  for ex, chunk in zip(out.as_numpy_iterator(), chunks.as_numpy_iterator()):
    assert ex['inputs'][0] == MODE_IDS['[S2S]']
    np.testing.assert_array_equal(np.concatenate([ex['inputs'][1:], ex['targets']]),
                                  chunk['targets'])
    target_tokens += len(ex['targets'])
    total += len(chunk['targets'])
    count += 1
  assert count == EXAMPLES
  assert abs(target_tokens / total - density) / density < 0.02
  # One span per example: its mean length is the density times the mean chunk length.
  assert abs(target_tokens / count - density * total / count) / (density * total / count) < 0.02


def _first_tokens(name, n, lengths=LENGTHS, seed=3):
  ds = seqio.get_mixture_or_task(name).get_dataset(lengths, split='train', shuffle=True, seed=seed,
                                                   num_epochs=None, try_in_mem_cache=False)
  return np.array([ex['inputs'][0] for ex in ds.take(n).as_numpy_iterator()])


def test_ul2_mixture_realises_the_family_rates():
  first = _first_tokens('stdlib_ul2', EXAMPLES)
  rates = {}
  for d in denoisers.UL2:
    rates[d.mode] = rates.get(d.mode, 0.0) + d.rate
  total = sum(rates.values())
  assert rates['[S2S]'] / total == pytest.approx(1 / 7)  # UL2's own rates (was 20% here)
  for mode, rate in rates.items():
    assert abs(np.mean(first == MODE_IDS[mode]) - rate / total) < 0.01, mode
  assert denoisers.loss_groups('stdlib_ul2') == {'R': MODE_IDS['[NLU]'], 'S': MODE_IDS['[S2S]'],
                                                 'X': MODE_IDS['[NLG]']}
  assert denoisers.loss_groups('stdlib_lm') == {}


def _denoiser_shares(name, spec):
  """Denoiser name -> its share of the examples of the denoising mixture `name`."""
  mixture = seqio.get_mixture_or_task(name)
  total = sum(mixture.get_rate(t) for t in mixture.tasks)
  return {d.name: sum(mixture.get_rate(t) for t in mixture.tasks
                      if t.name.endswith(f'_{d.name}')) / total for d in spec}


def test_ul2_samples_its_seven_denoisers_uniformly_as_the_paper():
  # UL2's `ul2_objective` (Tay et al. 2022, appendix) samples its denoisers uniformly when
  # given no rates, so the S-denoiser gets 1/7 of the examples.
  shares = _denoiser_shares('stdlib_ul2', denoisers.UL2)
  assert len(shares) == 7 and shares['s_r25'] == pytest.approx(1 / 7)
  assert all(share == pytest.approx(1 / 7) for share in shares.values()), shares


def test_denoiser_rates_are_configurable():
  sources = {'a': _Letters('a', 1, 10)}
  name = denoisers.register_denoising_mixture('test_ul2_rates', sources, 'ul2',
                                              rates=[0.8] * 6 + [1.2])
  shares = _denoiser_shares(name, denoisers.UL2)
  assert shares['s_r25'] == pytest.approx(0.2) and shares['r_mu3_r15'] == pytest.approx(0.8 / 6)
  assert denoisers.loss_groups('test_ul2_rates_a_s_r25') == {'S': MODE_IDS['[S2S]']}
  # A task registered again under a denoiser task's name is no denoiser.
  tasks.register_text_task('test_ul2_rates_a_s_r25', sources['a'])
  assert denoisers.loss_groups('test_ul2_rates_a_s_r25') == {}
  with pytest.raises(mixtures.MixtureError, match='7 tasks but 6 rates'):
    denoisers.register_denoising_mixture('bad', sources, 'ul2', rates=[1.0] * 6)


class _Letters(seqio.FunctionDataSource):
  """Documents of one repeated letter, so a token tells which source it came from."""

  def __init__(self, letter, docs, length):
    def fn(split, shuffle_files, seed=None):
      del split, shuffle_files, seed
      return tf.data.Dataset.from_tensors({'text': letter * length}).repeat(docs)
    super().__init__(fn, splits=('train',))
    self.docs, self.length = docs, length

  def num_input_examples(self, split):
    return self.docs

  def num_characters(self, split):
    return self.docs * self.length


@pytest.fixture(scope='module')
def letter_tasks():
  names = {}
  for letter, docs, length in (('a', 100, 40), ('b', 300, 40), ('c', 100, 81)):
    names[letter] = tasks.register_text_task(f'test_letters_{letter}',
                                             _Letters(letter, docs, length), objective='lm')
  return names


def _letter_proportions(name, n=EXAMPLES):
  # Documents and EOS fill whole 41-token examples, so every example starts with a letter.
  ds = seqio.get_mixture_or_task(name).get_dataset({'targets': 41}, split='train', shuffle=True,
                                                   seed=0, num_epochs=None, try_in_mem_cache=False)
  first = np.array([ex['targets'][0] for ex in ds.take(n).as_numpy_iterator()])
  return {c: float(np.mean(first == VOCAB.encode(c)[0])) for c in 'abc'}


@pytest.mark.parametrize('kwargs,expected', [
    ({'rates': [1.0, 3.0, 6.0]}, [0.1, 0.3, 0.6]),
    ({'rate_by': 'examples'}, [0.2, 0.6, 0.2]),                      # 100 : 300 : 100 documents
    ({'rate_by': 'characters'}, list(np.array([40, 120, 81]) / 241)),  # 4000 : 12000 : 8100
    ({'rate_by': 'characters', 'temperature': 2.0},                  # mT5: p ~ n ** (1 / T)
     list(np.sqrt([40, 120, 81]) / np.sum(np.sqrt([40, 120, 81])))),
])
def test_mixture_rates_are_realised(letter_tasks, kwargs, expected):
  name = mixtures.register_mixture('test_letters', list(letter_tasks.values()), **kwargs)
  got = _letter_proportions(name)
  for c, p in zip('abc', expected):
    assert abs(got[c] - p) < 0.01, (c, got, expected)


def test_nested_mixture_and_replay_recipe(letter_tasks):
  inner = mixtures.register_mixture('test_inner', [letter_tasks['a'], letter_tasks['b']],
                                    rates=[1.0, 3.0])
  outer = mixtures.register_mixture('test_outer', [inner, letter_tasks['c']], rates=[1.0, 1.0])
  got = _letter_proportions(outer)
  for c, p in zip('abc', [0.125, 0.375, 0.5]):
    assert abs(got[c] - p) < 0.01, got
  assert mixtures.describe(outer) == pytest.approx(
      {letter_tasks['a']: 0.125, letter_tasks['b']: 0.375, letter_tasks['c']: 0.5})
  replay = mixtures.replay_mixture('test_replay', letter_tasks['c'],
                                   [letter_tasks['a'], letter_tasks['b']], replay_fraction=0.2)
  got = _letter_proportions(replay)
  assert abs(got['c'] - 0.8) < 0.01 and abs(got['a'] - 0.1) < 0.01, got


def test_restoring_into_other_mixture_rates_is_an_error(letter_tasks):
  names = list(letter_tasks.values())
  mixtures.register_mixture('test_rates', names, rates=[1.0, 1.0, 1.0])
  config = pipeline.DatasetConfig('test_rates', {'targets': 41}, batch_size=2)
  state = dict(pipeline.InputIterator(config, None).state(), batches_consumed=5)
  mixtures.register_mixture('test_rates', names, rates=[1.0, 2.0, 1.0])
  moved = pipeline.InputIterator(config, None)
  with pytest.raises(pipeline.DataError, match='another pipeline .*mixture'):
    moved.restore(state)
  moved.restore(state, allow_changes=True)
  assert moved.batches_consumed == 0


def test_bad_mixtures_and_vocabularies(letter_tasks):
  a = letter_tasks['a']
  with pytest.raises(mixtures.MixtureError, match="unknown task or mixture 'test_letters_z'"):
    mixtures.register_mixture('bad', [a, 'test_letters_z'])
  for rate in (0.0, -1.0, float('nan')):
    with pytest.raises(mixtures.MixtureError, match='rates must be positive'):
      mixtures.register_mixture('bad', [a, letter_tasks['b']], rates=[1.0, rate])
  with pytest.raises(mixtures.MixtureError, match='2 tasks but 1 rates'):
    mixtures.register_mixture('bad', [a, letter_tasks['b']], rates=[1.0])
  with pytest.raises(mixtures.MixtureError, match='replay_fraction=1.5'):
    mixtures.replay_mixture('bad', a, letter_tasks['b'], 1.5)
  for extra_ids in (0, 3):
    small = seqio.ByteVocabulary(extra_ids=extra_ids)
    with pytest.raises(prep.ObjectiveError, match='no room for the 3 mode tokens'):
      denoisers.register_denoising_mixture('bad', {'a': _Letters('a', 1, 10)}, 'ul2', small)
  with pytest.raises(prep.ObjectiveError, match='needs sentinel ids but the vocabulary has none'):
    prep.span_corruption_chunk_length(LENGTHS, 0.15, 3.0, max_sentinels=0)
  with pytest.raises(prep.ObjectiveError, match=r'inputs 128 / targets 128 are too short for span '
                     r'corruption with noise density 0.15 and mean span 64.*at least inputs'):
    prep.span_corruption_chunk_length({'inputs': 128, 'targets': 128}, 0.15, 64.0, 97, 1)
  with pytest.raises(prep.ObjectiveError, match='too short for S-denoising'):
    prep.sequential_chunk_length({'inputs': 2, 'targets': 2}, 0.25, 1)
  with pytest.raises(prep.ObjectiveError, match='unknown denoiser preset'):
    denoisers.register_denoising_mixture('bad', {'a': _Letters('a', 1, 10)}, 'ul3')


def test_too_short_lengths_fail_before_training(tmp_path):
  """The train entry reports too-short UL2 lengths in one line and writes nothing."""
  model_dir = tmp_path / 'run'
  with pytest.raises(prep.ObjectiveError) as e:
    train_lib.run(['models/t5_1_1/tiny.gin', 'runs/ul2.gin'], [
        "TASK_FEATURE_LENGTHS = {'inputs': 128, 'targets': 128}", 'TRAIN_STEPS = 1',
        f"MODEL_DIR = '{model_dir}'", 'BATCH_SIZE = 8', 'WARMUP_STEPS = 0'])
  assert 'too short for span corruption with noise density 0.15 and mean span 64' in str(e.value)
  assert '\n' not in str(e.value).split('\n  In call to configurable')[0]
  assert not model_dir.exists()


@pytest.mark.parametrize('encdec', [True, False])
def test_first_token_groups_split_packed_batches_by_mode(encdec):
  model = (model_lib.EncoderDecoderModel(tu.tiny_encdec(vocab_size=384)) if encdec else
           model_lib.DecoderOnlyModel(tu.tiny_decoder(vocab_size=384)))
  lengths = {'inputs': 384, 'targets': 128}
  config = pipeline.DatasetConfig('stdlib_ul2', lengths, batch_size=4, seed=5, shuffle=False)
  batch = next(pipeline.InputIterator(config, model))
  groups = denoisers.loss_groups('stdlib_ul2')
  masks = {k: np.asarray(v) for k, v in trainer_lib.first_token_groups(batch, groups).items()}
  src = batch['encoder_input_tokens'] if encdec else batch['decoder_target_tokens']
  src_seg = batch['encoder_segment_ids'] if encdec else batch['decoder_segment_ids']
  weights = batch['decoder_loss_weights']
  covered = sum(masks.values())
  assert np.all(covered[weights > 0] == 1)  # every target token in exactly one family
  for row in range(src.shape[0]):
    for seg in set(batch['decoder_segment_ids'][row][weights[row] > 0]):
      mode = src[row][src_seg[row] == seg][0]
      family = {v: k for k, v in groups.items()}[mode]
      sel = (batch['decoder_segment_ids'][row] == seg) & (weights[row] > 0)
      assert np.all(masks[family][row][sel] == 1)
