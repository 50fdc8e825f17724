"""The notebooks run top to bottom on a CPU, so they cannot rot (README: Notebooks).

Each is executed by nbclient in a fresh Jupyter kernel, in a temporary folder, as a user would
run it: the quickstart trains, plots, samples and shows shardings on 8 CPU devices; the
sweep notebook reports and fits the shipped record of the chinchilla_tiny sweep.
"""

import os
import re

import nbclient
import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(name, tmp_path, monkeypatch, **env):
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  nb = nbformat.read(os.path.join(ROOT, 'notebooks', f'{name}.ipynb'), as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}}).execute()
  return nb


def _text(nb):
  out = []
  for cell in nb.cells:
    for o in cell.get('outputs', []):
      out.append(o.get('text', '') or ''.join(o.get('data', {}).get('text/plain', '')))
  return '\n'.join(out)


def _images(nb):
  return sum('image/png' in o.get('data', {}) for c in nb.cells for o in c.get('outputs', []))


def test_quickstart_runs_on_cpu(tmp_path, monkeypatch):
  nb = _run('quickstart', tmp_path, monkeypatch)
  text = _text(nb)
  assert '8 cpu devices' in text
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2" in text
  assert '-> P(' in text  # every parameter's sharding
  assert re.search(r'''['"] -> ['"]''', text)  # a sampled continuation of a prompt
  assert 'flops_per_token' in text
  assert _images(nb) == 1  # the loss curve


def _files(folder):
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)


def test_sweep_and_fit_fits_the_shipped_sweep(tmp_path, monkeypatch):
  shipped = os.path.join(ROOT, 'docs', 'scaling', 'chinchilla_tiny')
  before = _files(shipped)
  monkeypatch.delenv('SWEEP_ROOT', raising=False)
  nb = _run('sweep_and_fit', tmp_path, monkeypatch)
  text = _text(nb)
  assert '20 runs, 4 budgets' in text
  assert 'approach 2: N_opt ~ C^' in text and 'approach 2: N_opt = ' in text
  assert 'approach 3: N_opt = ' in text
  assert _images(nb) == 1 + 3  # a report curve, three fit figures
  assert _files(shipped) == before  # the report went to a copy
