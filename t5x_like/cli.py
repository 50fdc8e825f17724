"""What the entry points (`python -m train`, `python -m infer`, `python -m eval`)
share: flags, joining a multi-host job, parsing gin, and one-line errors.

Each entry point is one gin-configured function (`train.train`, `infer.infer`,
`evaluate.evaluate`) called with the operative config; an input error is one
line on stderr with exit code 2, a failure during the run exit code 1.
"""

import argparse
import logging
import sys
from typing import Any, Callable, Dict, Optional, Sequence

import gin
import jax

from models import config as model_config
from partitioning import mesh as mesh_lib
from partitioning import partitioner as partitioner_lib
from t5x_like import checkpoints
from t5x_like import decoding
from t5x_like import flags
from t5x_like import gin_utils
from t5x_like import signals
from t5x_like import utils
from t5x_like.data import errors as data_errors

# Errors that mean "the inputs are wrong": reported as one line, exit code 2.
INPUT_ERRORS = (utils.InputError, gin_utils.GinError, model_config.ConfigError, mesh_lib.MeshError,
                partitioner_lib.BatchError, data_errors.DataError, checkpoints.CheckpointError,
                data_errors.ObjectiveError, data_errors.MixtureError, data_errors.SourceError,
                data_errors.SelectionError, decoding.DecodingError)


class ArgumentParser(argparse.ArgumentParser):
  """Flag errors as one line (exit code 2 through `console`), not usage text."""

  def error(self, message):
    raise utils.InputError(f'{message}: see {self.prog} --help')


def parse_args(entry: str, argv: Sequence[str]):
  """-> (known flags, gin binding strings from --gin.KEY=value) of `python -m <entry>`
  (flags.ENTRIES: 'train', 'infer' or 'eval')."""
  parser = flags.parser_for(entry, ArgumentParser)
  known, rest = parser.parse_known_args(argv)
  gin_flags = [a for a in rest if a.startswith('--gin.')]
  unknown = [a for a in rest if not a.startswith('--gin.')]
  if unknown:
    parser.error(f'unrecognised arguments: {" ".join(unknown)}')
  for p in known.gin_search_path:
    gin.add_config_file_search_path(p)
  return known, gin_utils.split_argv(gin_flags)


def join_job(args) -> None:
  """Joins a multi-host job when the flags describe one (jax.distributed)."""
  if not (args.coordinator_address or args.num_processes):
    return
  # Only affects CPU devices; lets CPU processes run cross-process collectives.
  jax.config.update('jax_cpu_collectives_implementation', args.cpu_collectives)
  # Without this, initialize() starts XLA's preemption notifier, whose C-level
  # SIGTERM handler replaces ours (signal.getsignal still names ours): a SIGTERM
  # would then only be logged by XLA ("SIGTERM caught at ...") and the run would
  # go on. The loop's all-gathered stop flag does the notifier's job.
  jax.config.update('jax_enable_preemption_service', False)
  jax.distributed.initialize(coordinator_address=args.coordinator_address,
                             num_processes=args.num_processes, process_id=args.process_id)
  signals.install()  # in case something else took SIGTERM during initialize


def run_gin(fn: Callable[..., Any], gin_files: Sequence[str], bindings: Sequence[str],
            example: str) -> Any:
  """Parses gin files and bindings afresh and calls the gin-configured `fn`
  with the operative config as `config_str`."""
  if not gin_files:
    raise gin_utils.GinError(f'no --gin_file given: e.g. --gin_file={example}')
  gin.clear_config()
  gin_utils.parse(gin_files, bindings)
  try:
    return gin.get_configurable(fn)(config_str=gin.config_str())
  except INPUT_ERRORS:
    raise
  except (ValueError, TypeError) as e:
    if 'gin' in str(e) or 'configurable' in str(e):
      raise gin_utils.GinError(gin_utils.explain(e, gin_files, bindings)) from None
    raise


def console(main: Callable[[Sequence[str]], Dict[str, Any]], argv: Optional[Sequence[str]],
            report: Optional[Callable[[Dict[str, Any]], None]] = None) -> None:
  """Runs `main(argv)`: input errors are one line and exit 2, run failures exit 1."""
  logging.basicConfig(level=logging.WARNING)
  try:
    result = main(sys.argv[1:] if argv is None else argv)
  except INPUT_ERRORS as e:
    print(f'error: {str(e).strip().splitlines()[0]}', file=sys.stderr)
    sys.exit(2)
  except utils.TrainingError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  if report is not None:
    report(result)
