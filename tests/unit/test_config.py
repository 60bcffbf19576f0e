"""The one default config, experiment files over it, variants, and typo-proof keys."""
import ast
import glob
import os

import pytest

from mt_flax import default_config
from mt_flax.config import ConfigError, load_config, with_defaults

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py")))


def write_config(tmp_path, body: str) -> str:
  path = tmp_path / "exp.py"
  path.write_text("from mt_flax.default_config import get_config as base\n\n"
                  "def get_config():\n  c = base()\n" + body + "  return c\n")
  return str(path)


def test_unknown_keys_in_a_config_file_stop_with_one_line(tmp_path):
  with pytest.raises(ConfigError, match="'foo_bar_baz'; no similar key exists") as e:
    load_config(write_config(tmp_path, "  c.foo_bar_baz = 3\n"))
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="'model.dropout'; did you mean model.dropout_rate"):
    load_config(write_config(tmp_path, "  c.model.dropout = 0.3\n"))


def test_unknown_keys_on_the_command_line_stop_with_near_matches():
  path = os.path.join(ROOT, "experiments", "bible_en_es_tiny.py")
  with pytest.raises(ConfigError, match="'model.dropuot'; did you mean model.dropout_rate"):
    load_config(path, ["--config.model.dropuot=0.2"])
  with pytest.raises(ConfigError, match="no similar key exists"):
    load_config(path, ["--config.zzzz=1"])
  assert load_config(path, ["--config.model.dropout_rate=0.2"]).model.dropout_rate == 0.2


def test_syntax_errors_and_bad_variants_are_one_line_config_errors(tmp_path):
  with pytest.raises(ConfigError, match="line 5: syntax error"):
    load_config(write_config(tmp_path, "  c.seed = = 1\n"))
  wmt = os.path.join(ROOT, "experiments", "wmt14_en_de.py")
  with pytest.raises(ConfigError, match="unknown variant 'huge'; expected base, big or fp32"):
    load_config(wmt + ":huge")
  with pytest.raises(ConfigError, match="not found"):
    load_config(os.path.join(ROOT, "experiments", "nope.py"))


def test_variants_share_one_file_and_differ_only_where_they_say():
  wmt = os.path.join(ROOT, "experiments", "wmt14_en_de.py")
  base, big = load_config(wmt), load_config(wmt + ":big")
  assert load_config(wmt + ":base").to_dict() == base.to_dict()
  assert (base.model.d_model, big.model.d_model) == (512, 1024)
  assert base.learning_rate == pytest.approx(6.99e-4, rel=1e-3)   # Vaswani et al. (2017)
  assert big.learning_rate == pytest.approx(4.94e-4, rel=1e-3)
  assert base.data.to_dict() == big.data.to_dict()
  fp32 = load_config(wmt + ":fp32")
  assert (base.model.dtype, big.model.dtype, fp32.model.dtype) == ("bfloat16",) * 2 + ("float32",)
  fp32.model.dtype = "bfloat16"
  assert fp32.to_dict() == base.to_dict()


def test_the_test_variant_is_the_default_experiment_made_small():
  """What the tests train: the default experiment's data, schedule and vocabulary kind with
  a small model and few steps; the file's plain config is the ``default`` variant."""
  bible = os.path.join(ROOT, "experiments", "bible_en_es_tiny.py")
  plain, test = load_config(bible), load_config(bible + ":test")
  assert load_config(bible + ":default").to_dict() == plain.to_dict()
  for key in ("name", "src_lang", "tgt_lang", "tokenizer_type", "max_len", "batching"):
    assert test.data[key] == plain.data[key], key
  assert (test.schedule, test.learning_rate, test.batch_tokens) == (
      plain.schedule, plain.learning_rate, plain.batch_tokens)
  assert test.num_train_steps < plain.num_train_steps and test.data.vocab_size == 256
  assert (test.model.d_model, test.model.num_encoder_layers, test.model.num_decoder_layers) == (
      32, 1, 1)
  with pytest.raises(ConfigError, match="unknown variant 'tset'; expected default or test"):
    load_config(bible + ":tset")


def test_every_key_lives_in_the_default_config_and_missing_keys_take_it():
  partial = {"model": {"d_model": 64}, "seed": 3}
  full = with_defaults(partial)
  default = default_config.get_config()
  assert full.model.d_model == 64 and full.seed == 3
  assert full.model.num_heads == default.model.num_heads
  assert full.decode.to_dict() == default.decode.to_dict()
  with pytest.raises(ConfigError, match="'model.d_modle'"):
    with_defaults({"model": {"d_modle": 64}})


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_experiment_files_are_short_overrides_that_load(path):
  tree = ast.parse(open(path).read())
  body = tree.body[1:] if isinstance(tree.body[0], ast.Expr) else tree.body  # no docstring
  code = {n for node in body for sub in ast.walk(node) if hasattr(sub, "lineno")
          for n in range(sub.lineno, sub.end_lineno + 1)}
  assert len(code) <= 40, f"{path}: {len(code)} lines of code"
  assert "default_config" in open(path).read()
  assert load_config(path).num_train_steps > 0


@pytest.mark.parametrize("command", ["train", "eval", "translate", "audit", "average", "data-stats", "sweep",
                                     "tpu"])
def test_every_command_has_help_and_one_line_usage_errors(command, capsys):
  from mt_flax import __main__ as entry
  assert entry.main([command, "--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith(f"usage: mt_flax {command}") and "--help" in out
  if command in ("train", "data-stats"):
    assert "--config FILE[:VARIANT]" in out and "--config.KEY=VALUE" in out
  assert entry.main([command, "--no-such-flag"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"mt_flax {command}: error:"), err


def test_unknown_command_is_one_line(capsys):
  from mt_flax import __main__ as entry
  assert entry.main(["trian"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "unknown command 'trian'" in err[0]
  assert entry.main(["--help"]) == 0 and "tpu" in capsys.readouterr().out
