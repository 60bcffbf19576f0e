"""`mt_flax average`: the mean of real Orbax checkpoints, loaded by eval; resume untouched."""
import json
import shutil

import jax
import numpy as np
import pytest

from mt_flax import checkpoint, evaluate, steps
from mt_flax.commands import average
from mt_flax.inference import load_trained

SCALES = {41: 1.0, 42: -2.0, 43: 0.5}      # step -> how far its params move along `delta`


@pytest.fixture(scope="module")
def run_with_checkpoints(tmp_path_factory, trained_run):
  """A copy of the tiny trained run with three more checkpoints of different params."""
  workdir = tmp_path_factory.mktemp("average") / "run"
  shutil.copytree(trained_run, workdir)
  run = load_trained(str(workdir))
  optimizer = steps.make_optimizer(run.config)
  state = steps.create_train_state(run.model, optimizer, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  delta = jax.tree.map(lambda p: rng.normal(0.0, 0.1, p.shape).astype(np.float32), run.params)
  manager = checkpoint.make_manager(str(workdir), keep=10, async_save=False,
                                    best_metric=run.config.best_metric,
                                    best_mode=run.config.best_mode)
  saved = {}
  for step, scale in SCALES.items():
    params = jax.tree.map(lambda p, d: np.asarray(p) + scale * d, run.params, delta)
    checkpoint.save(manager, step, state.replace(params=params, step=np.int32(step)), None,
                    run.config)
    saved[step] = params
  manager.wait_until_finished()
  manager.close()
  return str(workdir), saved


def test_average_writes_the_mean_of_the_last_n_checkpoints(run_with_checkpoints, capsys,
                                                           call_main):
  workdir, saved = run_with_checkpoints
  assert call_main(average.main, ["--workdir", workdir, "--last", "2"]) == 0
  assert "averaged steps 42, 43" in capsys.readouterr().out
  params, info = checkpoint.restore_averaged(workdir)
  assert info["steps"] == [42, 43]
  expected = jax.tree.map(lambda a, b: (a + b) / 2, saved[42], saved[43])
  jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=0, atol=1e-6),
               params, expected)
  # the delta cancels out of 41, 42, 43 only in part: 1 - 2 + 0.5 = -0.5 (the mean moves -0.5/3)
  assert call_main(average.main, ["--workdir", workdir, "--last", "3"]) == 0
  params, info = checkpoint.restore_averaged(workdir)
  assert info["steps"] == [41, 42, 43]
  expected = jax.tree.map(lambda a, b, c: (a + b + c) / 3, saved[41], saved[42], saved[43])
  jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=0, atol=1e-6),
               params, expected)


def test_averaged_params_are_loaded_by_eval_and_never_resumed(run_with_checkpoints, tmp_path,
                                                              call_main, capsys):
  workdir, saved = run_with_checkpoints
  assert call_main(average.main, ["--workdir", workdir, "--last", "3"]) == 0, (
      capsys.readouterr().err[-2000:])
  run = load_trained(workdir, which="averaged")
  assert run.step == 43 and run.which == "averaged"
  assert run.params_source == "average of the last 3 checkpoints (steps 41, 42, 43)"
  mean = jax.tree.map(lambda a, b, c: (a + b + c) / 3, saved[41], saved[42], saved[43])
  jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=0, atol=1e-6),
               run.params, mean)
  report = evaluate.evaluate_run(run, "test", out_dir=str(tmp_path / "eval"), beam_size=1,
                                 max_examples=3, long_examples=0)
  assert report["params"] == run.params_source and report["checkpoint"] == "averaged"
  assert json.loads((tmp_path / "eval" / "report.json").read_text())["params"] == (
      run.params_source)
  assert "average of the last 3 checkpoints" in (tmp_path / "eval" / "report.md").read_text()
  # The training manager sees only the training checkpoints; a resume takes step 43 as saved.
  manager = checkpoint.make_manager(workdir, async_save=False, read_only=True)
  assert 43 in manager.all_steps() and all(s <= 43 for s in manager.all_steps())
  latest = checkpoint.restore_params(manager, max(manager.all_steps()))
  jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=0, atol=0),
               latest, saved[43])


def test_average_errors_are_one_line(run_with_checkpoints, trained_run, tmp_path, capsys,
                                     call_main):
  workdir, _ = run_with_checkpoints
  assert call_main(average.main, ["--workdir", workdir, "--last", "9"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("mt_flax average: error:") and "fewer than --last 9" in err
  assert "\n" not in err and "keep_checkpoints >= 9" in err
  missing = str(tmp_path / "nothing")
  assert call_main(average.main, ["--workdir", missing]) == 2
  assert "no checkpoints" in capsys.readouterr().err
  fresh = tmp_path / "fresh"
  shutil.copytree(trained_run, fresh)
  with pytest.raises(checkpoint.CheckpointError, match="no averaged parameters.*average"):
    load_trained(str(fresh), which="averaged")
