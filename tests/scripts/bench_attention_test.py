"""Smoke test of scripts/bench_attention.py: the --quick memory-only sweep on CPU."""


import testing_utils as tu


def _rows(out):
  """Table rows (split on 2+ spaces) after the header line."""
  lines = out.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith('length  batch'))
  rows = []
  for line in lines[start + 1:]:
    if not line.strip():
      break
    rows.append([c for c in line.split('  ') if c.strip()])
  return lines[start], rows


def test_quick_memory_only(capsys):
  bench = tu.load_script('bench_attention')
  assert bench.main(['--quick', '--memory_only']) == 0
  out = capsys.readouterr().out
  header, rows = _rows(out)
  assert 'fwd+bwd temp MiB' in header and 'TFLOP/s' not in header  # nothing timed
  impls = [row[5].strip() for row in rows]
  configs = len(bench.configs(bench.parse(['--quick'])))
  assert impls.count('ours') == impls.count('xla') == configs == 8
  temps = {}
  for row in rows:
    cells = [c.strip() for c in row]
    temps.setdefault((cells[0], cells[3], cells[4]), {})[cells[5]] = float(cells[6])
  for by_impl in temps.values():
    assert by_impl['ours'] < by_impl['xla']  # even at length 256
  assert 'Not run on cpu: cudnn (GPU only); jax_pallas' in out


def test_ratios_and_acceptance():
  bench = tu.load_script('bench_attention')
  cfg = dict(length=4096, batch=4, heads=16, kv_heads=4, head_dim=128, causal=True)
  results = [(cfg, {'ours': {'impl': 'ours', 'fwd': 300.0, 'fwd_bwd': 240.0, 'temp': 2**20,
                             'io': 2**21},
                    'jax_pallas': {'impl': 'jax_pallas', 'fwd': 250.0, 'fwd_bwd': 150.0,
                                   'temp': 2**21, 'io': 2**22, 'note': 'K/V repeated 4x'},
                    'cudnn': {'impl': 'cudnn', 'fwd': 'OOM', 'fwd_bwd': 300.0,
                              'mem': 'error: x'}})]
  header, rows = bench.table(results, timed=True)
  by_impl = {row[5]: dict(zip(header, row)) for row in rows}
  assert by_impl['jax_pallas']['ours / this fwd'] == '1.20x'
  assert by_impl['jax_pallas']['ours / this fwd+bwd'] == '1.60x'
  assert by_impl['jax_pallas']['this / ours temp'] == '2.0x'
  assert by_impl['cudnn']['fwd TFLOP/s'] == 'OOM' and by_impl['cudnn']['ours / this fwd'] == '-'
  assert by_impl['cudnn']['ours / this fwd+bwd'] == '0.80x'
  assert by_impl['cudnn']['fwd+bwd temp MiB'] == 'error: x'
  lines = bench.acceptance(results, 'bfloat16')
  assert lines[0].endswith('PASS')
  assert 'ours / jax_pallas 1.60x (ok); ours / cudnn 0.80x' in lines[1]
  results[0][1]['ours']['fwd_bwd'] = 160.0
  assert bench.acceptance(results, 'bfloat16')[0].endswith('FAIL')
  assert bench.acceptance(results, 'float32') == []
  # FlashAttention-2 FLOPs: causal halves the forward.
  assert bench.fwd_flops(1, 2, 8, 8, 4, causal=False) == 4 * 2 * 8 * 8 * 4
  assert bench.fwd_flops(1, 2, 8, 8, 4, causal=True) == 2 * 2 * 8 * 8 * 4
