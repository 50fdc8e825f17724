"""Smoke tests of scripts/bench_moe.py: the --quick layer sweep on CPU, and the helpers of
the training comparison (metrics.jsonl parsing, active-parameter counts) on fake inputs."""

import json

import jax
import jax.numpy as jnp

import testing_utils as tu


def _rows(out):
  """Header names and table rows (cells cut at the header's column starts) of the table."""
  lines = out.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith('experts  top-k'))
  header = lines[start]
  names = [c.strip() for c in header.split('  ') if c.strip()]
  cuts = [header.index(n) for n in names] + [None]
  rows = []
  for line in lines[start + 1:]:
    if not line.strip():
      break
    rows.append({n: line[a:b].strip() for n, a, b in zip(names, cuts, cuts[1:])})
  return names, rows


def test_quick_layer_table(capsys):
  bench = tu.load_script('bench_moe')
  assert bench.main(['--quick']) == 0
  out = capsys.readouterr().out
  header, rows = _rows(out)
  assert 'fwd+bwd tokens/s' in header and 'vs dense' in header and 'temp MiB' in header
  impls = [row['impl'] for row in rows]
  assert impls == ['dense', 'capacity', 'ragged_dot']  # k = 2: the dense peer, then experts 8
  for row in rows:
    assert float(row['fwd+bwd tokens/s'].replace(',', '')) > 0, row  # every cell ran
    assert float(row['temp MiB'].replace(',', '')) > 0, row
    if row['impl'] != 'dense':
      assert row['vs dense'].endswith('x'), row  # ratio to the dense peer
      assert row['experts'] == '8' and row['top-k'] == '2'
  assert rows[1]['dropped'].endswith('%')  # capacity's dropped fraction
  assert 'XLA:CPU lowers ragged_dot densely' in rows[2]['note']
  assert 'Not run on cpu: dropless' in out


def test_layer_params_match_the_built_blocks():
  bench = tu.load_script('bench_moe')
  # SwiGLU: 3 * embed * mlp per expert; the dense peer has k experts' worth.
  assert bench.layer_params('dense', 8, 2, 16, 24) == (2 * 3 * 16 * 24,) * 2
  assert bench.layer_params('capacity', 8, 2, 16, 24) == (8 * 3 * 16 * 24 + 16 * 8,
                                                          2 * 3 * 16 * 24 + 16 * 8)


def _write_metrics(path, records, broken=True):
  with open(path / 'metrics.jsonl', 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
    if broken:
      f.write('{"kind": "step", "st')  # a line cut short by SIGKILL


def test_read_metrics(tmp_path):
  bench = tu.load_script('bench_moe')
  records = [{'kind': 'eval', 'step': 0, 'loss': 6.0, 'accuracy': 0.0}]
  for step in range(1, 31):
    records.append({'kind': 'step', 'step': step, 'loss': 5.0 - step / 10, 'batch_hash': 'h'})
    if step % 10 == 0:
      records.append({'kind': 'train', 'step': step, 'loss': 4.0 - step / 100,
                      'cross_entropy': 3.9 - step / 100, 'tokens_per_second': 100.0 * step,
                      'moe/dropped_fraction/0': 0.1, 'moe/dropped_fraction/1': 0.3})
      records.append({'kind': 'eval', 'step': step, 'loss': 3.0 - step / 100,
                      'accuracy': step / 100})
  # A resumed run repeats the steps after its checkpoint: the last record wins.
  records.append({'kind': 'train', 'step': 30, 'loss': 3.5, 'cross_entropy': 3.4,
                  'tokens_per_second': 50.0, 'moe/dropped_fraction/0': 0.2,
                  'moe/dropped_fraction/1': 0.2})
  _write_metrics(tmp_path, records)
  m = bench.read_metrics(str(tmp_path), tail=2)
  assert m['steps'] == 30
  assert m['eval_loss'] == 2.7 and m['eval_step'] == 30 and m['first_eval_loss'] == 6.0
  assert m['eval_accuracy'] == 0.3
  assert m['train_ce'] == 3.4
  assert abs(m['train_ce_tail'] - (3.7 + 3.4) / 2) < 1e-9
  assert m['tokens_per_second'] == 1000.0  # median of 1000, 2000, 50
  assert abs(m['dropped'] - 0.2) < 1e-9
  assert [s for s, _ in m['eval_curve']] == [0, 10, 20, 30]

  dense = dict(m, eval_loss=2.6)
  runs = [('moe', 100, 40, m, 60.0), ('dense', 40, 40, dense, 30.0)]
  header, rows = bench.train_table(runs, tokens_per_step=16)
  row = dict(zip(header, rows[0]))
  assert row['tokens'] == f'{30 * 16:,}' and row['active params'] == '40'
  assert row['validation loss (step 0 -> final)'] == '6.0000 -> **2.7000**'
  assert row['wall time'] == '1.0 min' and row['dropped (last log)'] == '20.0%'
  assert dict(zip(header, bench.train_table([('d', 1, 1, {}, None)], 16)[1][0]))['wall time'] == '-'
  assert 'is NOT lower than the dense 2.6000' in bench._verdict(m, dense)  # pylint: disable=protected-access
  assert 'is lower than' in bench._verdict(dense, m)  # pylint: disable=protected-access


def test_read_metrics_without_eval(tmp_path):
  bench = tu.load_script('bench_moe')
  _write_metrics(tmp_path, [{'kind': 'step', 'step': 1, 'loss': 5.0, 'batch_hash': 'h'},
                            {'kind': 'train', 'step': 1, 'loss': 5.0}], broken=False)
  m = bench.read_metrics(str(tmp_path))
  assert m['steps'] == 1 and m['train_ce'] == 5.0 and 'eval_loss' not in m
  assert bench._verdict(m, m).startswith('Result: no final validation loss')  # pylint: disable=protected-access


def test_param_counts_on_a_fake_tree():
  bench = tu.load_script('bench_moe')
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  layers_, e, d, m = 3, 8, 16, 24
  tree = {'decoder': {'stack': {'layers': {
      'moe': {'router': s(layers_, d, e), 'wi_0': s(layers_, e, d, m), 'wi_1': s(layers_, e, d, m),
              'wo': s(layers_, e, m, d),
              'shared_mlp': {'wi_0': {'kernel': s(layers_, d, m)}}},  # dense: always active
      'self_attention': {'query': {'kernel': s(layers_, d, 2, 8)}}}}},
          'token_embedder': {'embedding': s(50, d)}}
  total, active = bench.param_counts(tree, num_experts=e, k=2)
  expert = layers_ * 3 * d * m  # one expert's weights in every layer
  assert total == layers_ * (d * e + 3 * e * d * m + d * m + d * 16) + 50 * d
  assert active == total - (e - 2) * expert
  assert bench.param_counts(tree, num_experts=0, k=2) == (total, total)  # a dense model


def test_model_params_of_the_shipped_mixtral_tiny():
  """The MoE's active parameters are the dense model's with mlp_dim = k * the expert width,
  plus its routers."""
  bench = tu.load_script('bench_moe')
  c, total, active = bench.model_params('models/mixtral/tiny.gin')
  assert (c.num_experts, c.num_experts_per_token, c.mlp_dim) == (8, 2, 64)
  _, dense_total, dense_active = bench.model_params(
      'models/llama/tiny.gin', ['model_config.DecoderConfig.mlp_dim = 128'])
  assert dense_total == dense_active
  assert active == dense_total + c.num_layers * c.emb_dim * c.num_experts
  assert total == active + c.num_layers * 6 * 3 * c.emb_dim * c.mlp_dim


def test_train_commands():
  bench = tu.load_script('bench_moe')
  args = bench.parse(['--train_comparison', '--train_steps=7', '--model_binding', 'emb_dim=64'])
  moe_cmd, dense_cmd = bench.train_commands(args, '/m', '/d', dense_mlp=128)
  for cmd in (moe_cmd, dense_cmd):
    assert cmd[:3] == ['python', '-m', 'train'] and '--gin.TRAIN_STEPS=7' in cmd
    assert "--gin.MIXTURE_OR_TASK_NAME='stdlib_lm'" in cmd
    assert '--gin.model_config.DecoderConfig.emb_dim=64' in cmd
  assert '--gin_file=models/mixtral/small.gin' in moe_cmd
  assert "--gin.model_config.DecoderConfig.moe_impl='capacity'" in moe_cmd
  # The dense width comes after the shared bindings, so it wins over a bound expert mlp_dim.
  assert dense_cmd[-1] == '--gin.model_config.DecoderConfig.mlp_dim=128'
  line = bench.command_line(moe_cmd)
  assert "\"--gin.MODEL_DIR='/m'\"" in line and "\"--gin.TASK_FEATURE_LENGTHS={'targets': 256}\"" in line
