"""launch.sh: dispatch, errors, 'no tests collected' is a failure, the default run end to end,
tcmalloc, and the TPU commands it prints and the archive it ships."""
import os
import subprocess
import sys
import tarfile

from mt_flax import tpu


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(ROOT, "launch.sh")


def launch(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "MT_FLAX_NO_SETUP": "1"}  # the venv running these tests is set up
  return subprocess.run([LAUNCH, *args], capture_output=True, text=True, env=env, cwd="/")


def test_unknown_command_is_a_one_line_error():
  r = launch("trian")
  assert r.returncode == 2
  assert "unknown command 'trian'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_help_lists_every_command():
  r = launch("help")
  assert r.returncode == 0
  for word in ("./launch.sh test", "sweep CONFIG SWEEP", "tpu create|setup|run|sweep|logs|delete",
               "slurm [logs|cancel]"):
    assert word in r.stdout


def test_pass_through_reaches_mt_flax():
  r = launch("sweep", "experiments/bible_en_es_tiny.py", "/nonexistent/sweep.py")
  assert r.returncode == 2 and "sweep file '/nonexistent/sweep.py' not found" in r.stderr


def test_bench_needs_a_known_benchmark():
  for args, message in ((("bench",), "expected a benchmark name"),
                        (("bench", "nosuch"), "no benchmark bench/nosuch.py")):
    r = launch(*args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_no_tests_collected_is_an_error():
  r = launch("test", "tests/e2e/test_launch.py", "-k", "no_such_test_anywhere", "-q")
  assert r.returncode == 1 and "collected no tests" in r.stderr


def test_default_run_trains_evaluates_and_samples_then_reuses_the_run(tmp_path, tiny_training,
                                                                      variant_flags):
  # The :test variant as flags (the default run takes none), 12 steps; the run folder starts
  # with the session's tokenizer, as a re-run would find it.
  flags = [*variant_flags, "--config.num_train_steps=12"]
  run_dir = tiny_training.new_workdir(tmp_path, "run")
  env = {**os.environ, "MT_FLAX_NO_SETUP": "1", "MT_FLAX_RUN_DIR": run_dir,
         "MT_FLAX_EVAL_ARGS": "--max-examples 8 --beam 1 --long-examples 0"}
  env["XLA_FLAGS"] = os.environ["MT_FLAX_TEST_XLA_FLAGS"]  # one CPU device
  first = subprocess.run([LAUNCH, *flags], capture_output=True, text=True, env=env, timeout=300)
  assert first.returncode == 0, first.stderr[-3000:]
  for stage in ("1/3 training", "2/3 evaluating", "3/3 sample translations", "done in"):
    assert stage in first.stderr
  assert os.path.exists(tmp_path / "run" / "DONE")
  assert os.path.exists(tmp_path / "run" / "eval" / "test" / "report.md")
  assert "BLEU signature" in first.stdout
  assert first.stdout.count("  source:") == 5 and first.stdout.count("  translation:") == 5

  again = subprocess.run([LAUNCH, *flags], capture_output=True, text=True, env=env, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "nothing to do" in again.stderr and "not evaluating again" in again.stderr
  assert "| slice | pairs | BLEU | chrF | sources | multi-ref BLEU |" in again.stdout
  assert again.stdout.count("  translation:") == 5


def _tcmalloc_installed() -> bool:
  listing = subprocess.run(["bash", "-c", "ldconfig -p 2>/dev/null || /sbin/ldconfig -p"],
                           capture_output=True, text=True).stdout
  return "libtcmalloc_minimal.so.4" in listing or any(
      os.path.isfile(f"/usr/lib/{arch}-linux-gnu/libtcmalloc_minimal.so.4")
      for arch in ("x86_64", "aarch64"))


def test_compute_commands_preload_tcmalloc_and_others_do_not(tmp_path):
  # A venv whose python reports the LD_PRELOAD it was started with: what launch.sh hands over.
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  probe = venv / "bin" / "python"
  probe.write_text('#!/bin/sh\necho "LD_PRELOAD=${LD_PRELOAD:-}"\n')
  probe.chmod(0o755)
  base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MT_FLAX_TCMALLOC")}
  base.update(MT_FLAX_NO_SETUP="1", MT_FLAX_VENV=str(venv))

  def preload(*args, **env) -> tuple[str, str]:
    r = subprocess.run([LAUNCH, *args], capture_output=True, text=True, env={**base, **env},
                       cwd="/")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().removeprefix("LD_PRELOAD="), r.stderr

  for command in ("train", "eval", "translate", "sweep", "data-stats", "audit", "average"):
    value, err = preload(command, "--x")
    if _tcmalloc_installed():
      assert "libtcmalloc_minimal.so.4" in value and not err, (command, value, err)
    else:
      assert value == "" and "no tcmalloc" in err and len(err.splitlines()) == 1, (command, err)
  assert preload("train", "--x", MT_FLAX_TCMALLOC="0") == ("", "")
  assert preload("tpu", "--x") == ("", "")
  if _tcmalloc_installed():   # an LD_PRELOAD that is already set is kept, tcmalloc goes first
    value, _ = preload("eval", "--x", LD_PRELOAD="libfoo.so")
    assert value.endswith(":libfoo.so") and "libtcmalloc_minimal.so.4" in value


def test_python_m_mt_flax_starts_again_with_tcmalloc_on_cpu():
  """``python -m mt_flax COMMAND`` re-executes itself once with tcmalloc preloaded (the same
  command line, so a ``-c`` script stands in for it here)."""
  script = ("import os, sys\n"
            "from mt_flax.__main__ import preload_tcmalloc\n"
            "preload_tcmalloc(sys.argv[1:])\n"
            "maps = open('/proc/self/maps').read()\n"
            "print(os.environ.get('LD_PRELOAD', ''), 'libtcmalloc_minimal' in maps)\n")
  base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MT_FLAX_TCMALLOC")}
  base["JAX_PLATFORMS"] = "cpu"

  def started(*argv, **env) -> tuple[list[str], str]:
    r = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True,
                       env={**base, **env}, cwd="/")
    assert r.returncode == 0, r.stderr
    return r.stdout.split(), r.stderr

  (preload, loaded), err = started("eval")
  if _tcmalloc_installed():
    assert preload.endswith("libtcmalloc_minimal.so.4") and loaded == "True" and not err
    (preload, loaded), _ = started("train", LD_PRELOAD="libm.so.6")   # kept, after tcmalloc
    assert preload.endswith(":libm.so.6") and loaded == "True"
  else:
    assert loaded == "False" and "no tcmalloc" in err and len(err.splitlines()) == 1
  for argv, env in ((("eval",), {"MT_FLAX_TCMALLOC": "0"}), (("tpu",), {}),
                    (("eval",), {"JAX_PLATFORMS": "tpu"}), (("--help",), {})):
    assert started(*argv, **env)[0] == ["False"], (argv, env)
# ----------------------------------------------------------------------------- tpu

GCLOUD = "gcloud compute tpus tpu-vm"
ZONE = "us-central2-b"


def test_tpu_archive_packs_the_code_without_venv_or_runs(tmp_path):
  """What ``./launch.sh tpu setup`` copies to the VMs, made by the real ``tar``."""
  archive = str(tmp_path / "src.tar.gz")
  subprocess.run(tpu.archive_command(ROOT, archive), check=True)
  with tarfile.open(archive) as tar:
    names = {os.path.normpath(n) for n in tar.getnames()}
  assert {"launch.sh", "pyproject.toml", "constraints.txt", "mt_flax/tpu.py",
          "experiments/bible_en_es_tiny.py"} <= names
  assert not any(n.split("/")[0] in (".venv", ".git", "runs") for n in names)


def test_launch_sh_tpu_dry_run_prints_the_commands():
  argv = ["delete", "--dry-run", "--name", "a,b", "--zone", ZONE]
  out = subprocess.run([LAUNCH, "tpu", *argv], capture_output=True, text=True,
                       env={**os.environ, "MT_FLAX_NO_SETUP": "1"}, check=True).stdout
  assert out.splitlines() == [f"{GCLOUD} delete a --zone={ZONE}", f"{GCLOUD} delete b --zone={ZONE}"]
