"""``python -m mt_flax export --format ctranslate2``: the exported model gives mt_flax's outputs.

A tiny model trained on the synthetic corpus (long enough that it ends its
sentences) is exported; CTranslate2 (fp32, same maximum lengths) must give
mt_flax's greedy and beam-4 outputs on 200 held-out sentences, and the same
log-probabilities for forced target sequences.

mt_flax's beam search is run with ``beam_rule="fairseq"`` and ``alpha=0`` and
CTranslate2's with ``export.NO_PENALTY``: then both keep the best ``2K``
candidates, finish only EOS candidates among the first ``K`` and stop after
``K`` finished hypotheses, ranked by their log-probability. What stays
different by design: at the length limit mt_flax forces the end token (and
counts its log-probability), CTranslate2 stops without it.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest

ctranslate2 = pytest.importorskip("ctranslate2", reason="needs the ctranslate2 extra")

import jax  # noqa: E402
import sentencepiece as spm  # noqa: E402

from mt_flax import decode, export  # noqa: E402
from mt_flax.commands import export as export_command  # noqa: E402
from mt_flax.model import Transformer  # noqa: E402
from mt_flax.special_ids import BOS_ID, EOS_ID  # noqa: E402

SENTENCES = 200
LIMITS = dict(max_len_a=1.5, max_len_b=10.0)
# A tiny model on the synthetic corpus, trained long enough that it ends its sentences.
CONFIG = """
from mt_flax.default_config import get_config as default_config

def get_config():
  c = default_config()
  c.num_train_steps, c.warmup_steps, c.learning_rate = 600, 10, 5e-3
  c.eval_every_steps = c.checkpoint_every_steps = 600
  c.log_every_steps = 100
  c.batch_tokens, c.eval_bleu_examples, c.progress_bar = 1024, 8, False
  c.data.name, c.data.manual_dir, c.data.tfds_data_dir = "spa_eng", {manual!r}, {tfds!r}
  c.data.vocab_size, c.data.tokenizer_type, c.data.max_len = 320, "bpe", 48
  c.data.batching, c.data.eval_max_examples = "pad", 24
  c.model.d_model, c.model.num_heads, c.model.mlp_dim, c.model.dropout_rate = 64, 2, 128, 0.0
  c.model.num_encoder_layers = c.model.num_decoder_layers = 1
  return c
"""


@pytest.fixture(scope="module")
def run(synthetic_corpus, tmp_path_factory):
  from mt_flax import train
  from mt_flax.config import load_config
  from mt_flax.inference import load_trained
  root = tmp_path_factory.mktemp("export")
  synthetic_corpus(root / "manual")
  path = root / "tiny.py"
  path.write_text(CONFIG.format(manual=str(root / "manual"), tfds=str(root / "tfds")))
  train.train_and_evaluate(load_config(str(path)), str(root / "run"))
  return load_trained(str(root / "run"))


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("ct2") / "model")
  assert export_command.main(["--workdir", run.workdir, "--out", out]) == 0
  return out


@pytest.fixture(scope="module")
def held_out(synthetic_corpus, tmp_path_factory):
  """200 (source, reference) pairs drawn with another seed than the training corpus."""
  import zipfile
  folder = synthetic_corpus(tmp_path_factory.mktemp("held_out"), n=SENTENCES, seed=7)
  with zipfile.ZipFile(folder / "spa-eng.zip") as archive:
    lines = archive.read("spa-eng/spa.txt").decode().splitlines()
  return [tuple(line.split("\t")) for line in lines]


@pytest.fixture(scope="module")
def translator(exported):
  return ctranslate2.Translator(exported, device="cpu", compute_type="float32",
                                intra_threads=2)


def _pieces(exported: str, name: str) -> spm.SentencePieceProcessor:
  return spm.SentencePieceProcessor(model_file=os.path.join(exported, name))


def _agreement(run, exported, translator, held_out, *, beam_size: int, alpha: float,
               rule: str, length_penalty: float) -> tuple[int, list]:
  src_sp, tgt_sp = _pieces(exported, export.MODEL_SOURCE), _pieces(exported, export.MODEL_TARGET)
  sources = [s for s, _ in held_out]
  ids = [run.tokenizer.encode_src(s) + [EOS_ID] for s in sources]
  ours = decode.decode_ids(run.model, run.params, ids, beam_size=beam_size, alpha=alpha,
                           beam_rule=rule, **LIMITS)
  ours = [[tgt_sp.id_to_piece(i) for i in out] for out in ours]
  theirs = export.ctranslate2_search(translator, [src_sp.encode(s, out_type=str) for s in sources],
                                     beam_size=beam_size, length_penalty=length_penalty, **LIMITS)
  differ = [(sources[i], ours[i], theirs[i]) for i in range(len(sources)) if ours[i] != theirs[i]]
  return len(sources) - len(differ), differ


def test_export_writes_a_ctranslate2_model_with_tokenizers_and_readme(run, exported):
  names = set(os.listdir(exported))
  assert {"model.bin", "config.json", "shared_vocabulary.json", export.MODEL_SOURCE,
          export.MODEL_TARGET, "README.md", export.INFO_FILE} <= names
  config = json.loads(Path(exported, "config.json").read_text())
  assert config["add_source_eos"] and config["layer_norm_epsilon"] == pytest.approx(1e-6)
  assert (config["bos_token"], config["eos_token"], config["decoder_start_token"]) == \
      ("<s>", "</s>", "<s>")
  vocab = json.loads(Path(exported, "shared_vocabulary.json").read_text())
  assert vocab[:4] == ["<pad>", "<unk>", "<s>", "</s>"] and len(vocab) == run.tokenizer.tgt_vocab_size
  readme = Path(exported, "README.md").read_text()
  assert "ctranslate2.Translator(" in readme and "translate_batch(" in readme
  info = json.loads(Path(exported, export.INFO_FILE).read_text())
  assert info["step"] == run.step and info["quantization"] == "float32"


def test_greedy_outputs_equal_mt_flax(run, exported, translator, held_out):
  same, differ = _agreement(run, exported, translator, held_out, beam_size=1, alpha=0.0,
                            rule="t5x", length_penalty=0.0)
  print(f"greedy: {same}/{SENTENCES} identical")
  assert same >= 0.99 * SENTENCES, differ[:3]


def test_beam4_outputs_equal_mt_flax_under_the_same_rule(run, exported, translator, held_out):
  same, differ = _agreement(run, exported, translator, held_out, beam_size=4, alpha=0.0,
                            rule="fairseq", length_penalty=export.NO_PENALTY)
  print(f"beam 4 (same rule): {same}/{SENTENCES} identical")
  assert same >= 0.99 * SENTENCES, differ[:3]


def test_forced_target_log_probabilities_agree(run, exported, translator, held_out):
  src_sp, tgt_sp = _pieces(exported, export.MODEL_SOURCE), _pieces(exported, export.MODEL_TARGET)
  pairs = held_out[:8]
  scored = translator.score_batch([src_sp.encode(s, out_type=str) for s, _ in pairs],
                                  [tgt_sp.encode(t, out_type=str) for _, t in pairs])
  sources = [run.tokenizer.encode_src(s) + [EOS_ID] for s, _ in pairs]
  targets = [run.tokenizer.encode_tgt(t) + [EOS_ID] for _, t in pairs]
  src = np.zeros((len(pairs), max(map(len, sources))), np.int32)
  tgt_in = np.zeros((len(pairs), max(map(len, targets))), np.int32)
  for row, (s, t) in enumerate(zip(sources, targets)):
    src[row, :len(s)], tgt_in[row, :len(t)] = s, [BOS_ID] + t[:-1]
  logp = np.asarray(jax.nn.log_softmax(run.model.apply({"params": run.params}, src, tgt_in)))
  worst = 0.0
  for row, (t, result) in enumerate(zip(targets, scored)):
    ours = logp[row, np.arange(len(t)), t]
    theirs = np.asarray(result.log_probs)
    assert theirs.shape == ours.shape
    worst = max(worst, float(np.max(np.abs(theirs - ours))))
  print(f"forced log-probabilities: max abs difference {worst:.2e}")
  assert worst < 1e-4


def test_int8_export_is_smaller_and_translates(run, exported, held_out, tmp_path):
  out = str(tmp_path / "int8")
  assert export_command.main(["--workdir", run.workdir, "--out", out,
                              "--quantization", "int8"]) == 0
  size = lambda folder: os.path.getsize(os.path.join(folder, "model.bin"))
  assert size(out) < size(exported)
  translator = ctranslate2.Translator(out, device="cpu", compute_type="int8", intra_threads=1)
  src_sp = _pieces(out, export.MODEL_SOURCE)
  results = translator.translate_batch([src_sp.encode(held_out[0][0], out_type=str)])
  assert results[0].hypotheses[0]


def test_refusals_are_one_line(run, exported, call_main, capsys):
  assert call_main(export_command.main, ["--workdir", run.workdir, "--out", exported]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("mt_flax export: error: --out") and "--force" in err and "\n" not in err


def test_a_setting_the_spec_cannot_express_is_named():
  import dataclasses
  from mt_flax.model import TransformerConfig

  @dataclasses.dataclass(frozen=True)
  class WithActivation(TransformerConfig):
    activation: str = "gelu"

  with pytest.raises(export.ExportError, match=r"^model\.activation='gelu'"):
    export.check_expressible(WithActivation(src_vocab_size=8, tgt_vocab_size=8, d_model=8,
                                            num_heads=2))
  model = Transformer(TransformerConfig(8, 8, d_model=8, num_heads=2))
  export.check_expressible(model.config)           # the model's own settings all pass


@pytest.mark.parametrize("overrides", [
    dict(pre_ln=False),
    dict(positions="learned"),
    dict(share_embeddings=True, tie_output=True),
    dict(tgt_vocab_size=40, pre_ln=False, positions="learned"),
], ids=["post_ln", "learned_positions", "shared_tied", "own_vocabularies"])
def test_every_architecture_setting_scores_alike(tiny_model, ragged_batch, tmp_path, overrides):
  """Random weights, forced targets: CTranslate2's log-probabilities are mt_flax's."""
  model, params = tiny_model(seed=3, **overrides)
  cfg = model.config
  vocab = lambda n: ["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(4, n)]
  spec = export.transformer_spec(cfg, params, vocab(cfg.src_vocab_size), vocab(cfg.tgt_vocab_size))
  folder = export.spec_converter(spec).convert(str(tmp_path / "m"), force=True)
  translator = ctranslate2.Translator(folder, device="cpu", compute_type="float32")
  src, tgt_in = ragged_batch(seed=5, rows=4, s_len=9, t_len=7, vocab=min(cfg.src_vocab_size,
                                                                         cfg.tgt_vocab_size))
  sources = [[int(t) for t in row if t] for row in src]
  targets = [[int(t) for t in row[1:] if t] for row in tgt_in]
  src_eos = np.zeros((len(sources), src.shape[1] + 1), np.int32)
  tgt_full = np.zeros((len(targets), tgt_in.shape[1] + 1), np.int32)
  for r, (s, t) in enumerate(zip(sources, targets)):
    src_eos[r, :len(s) + 1] = s + [EOS_ID]
    tgt_full[r, :len(t) + 1] = [BOS_ID] + t
  logp = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, src_eos, tgt_full)))
  scored = translator.score_batch([[f"w{i}" for i in s] for s in sources],
                                  [[f"w{i}" for i in t] for t in targets])
  for r, (t, result) in enumerate(zip(targets, scored)):
    ours = logp[r, np.arange(len(t) + 1), t + [EOS_ID]]
    np.testing.assert_allclose(np.asarray(result.log_probs), ours, atol=1e-4)
