"""launch.sh: dispatch, errors, and 'no tests collected' is a failure."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
  for word in ("./launch.sh test", "sweep CONFIG SWEEP", "tpu create|setup|run|sweep|logs|delete"):
    assert word in r.stdout


def test_pass_through_reaches_mt_flax():
  r = launch("sweep", "experiments/bible_en_es_tiny.py", "/nonexistent/sweep.py")
  assert r.returncode == 2 and "sweep file '/nonexistent/sweep.py' not found" in r.stderr


def test_no_tests_collected_is_an_error():
  r = launch("test", "tests/test_launch.py", "-k", "no_such_test_anywhere", "-q")
  assert r.returncode == 1 and "collected no tests" in r.stderr
