"""`python -m mt_flax audit` and the invariance checks: pass on correct masks, fail on wrong ones."""
import numpy as np
import pytest

from mt_flax import audit, invariance, masks
from mt_flax.model import Transformer, TransformerConfig
from test_decode import random_params
from test_decode_run import call_main, run_cli, trained_run

V = 48
CHECK_NAMES = ["causality", "padding-content", "padding-length", "batch-independence",
               "cross-length", "cached-decoding"]


@pytest.fixture(scope="module")
def tiny():
  model = Transformer(TransformerConfig(src_vocab_size=V, tgt_vocab_size=V, d_model=32,
                                        num_heads=4, num_encoder_layers=1, num_decoder_layers=1,
                                        mlp_dim=64))
  return model, random_params(model, seed=0)


def ragged_batch(seed=0, rows=3, s_len=6, t_len=8):
  """src [B, S], tgt_in [B, T] (BOS first), every row with its own length; the last row longest."""
  rng = np.random.default_rng(seed)
  src, tgt = np.zeros((rows, s_len), np.int32), np.zeros((rows, t_len), np.int32)
  for b in range(rows):
    n, m = (s_len, t_len) if b == rows - 1 else (rng.integers(2, s_len), rng.integers(2, t_len))
    src[b, :n] = rng.integers(4, V, n)
    tgt[b, 0], tgt[b, 1:m] = 2, rng.integers(4, V, m - 1)
  return src, tgt


def test_audit_cli_passes_on_the_trained_run():
  proc = run_cli("audit", "--workdir", trained_run(), "--batches", "1", "--rows", "3")
  out = proc.stdout.decode()
  assert proc.returncode == 0, out + proc.stderr.decode()[-2000:]
  for name in CHECK_NAMES:
    assert f"PASS {name}:" in out
  assert "all checks passed" in out


def keras_cross_mask(tgt, src, tgt_segments=None, src_segments=None):
  """The Keras example's bug: the decoder's own padding mask used for cross-attention."""
  return masks.padding_mask(tgt != 0, tgt != 0)


def test_the_keras_cross_mask_fails_cross_length_and_padding(tiny, monkeypatch):
  src, tgt = ragged_batch(1, s_len=8, t_len=8)    # equal widths: no shape error to hide behind
  monkeypatch.setattr(masks, "cross_mask", keras_cross_mask)
  results = {r.name: r for r in invariance.run_checks(*tiny, src, tgt,
                                                      names=("cross-length", "padding-length"))}
  assert not results["cross-length"].passed and not results["padding-length"].passed


def test_a_missing_causal_mask_fails_causality(tiny, monkeypatch):
  monkeypatch.setattr(masks, "causal_mask", lambda n: np.ones((1, 1, n, n), bool))
  result, = invariance.run_checks(*tiny, *ragged_batch(2), names=("causality",))
  assert not result.passed and result.max_change > result.tolerance


def test_an_unmasked_source_padding_fails_padding_content(tiny, monkeypatch):
  monkeypatch.setattr(masks, "cross_mask",
                      lambda tgt, src, *a: masks.padding_mask(tgt != 0, np.ones(src.shape, bool)))
  result, = invariance.run_checks(*tiny, *ragged_batch(3), names=("padding-content",))
  assert not result.passed


def test_audit_exits_nonzero_when_a_check_fails(monkeypatch, capsys):
  monkeypatch.setattr(masks, "cross_mask", keras_cross_mask)
  rc = call_main(audit.main, ["--workdir", trained_run(), "--batches", "1", "--rows", "3"],
                 b"", monkeypatch)
  out = capsys.readouterr().out
  assert rc == 1 and "FAIL cross-length" in out and "FAILED:" in out


def test_audit_reports_bad_input_in_one_line(monkeypatch, capsys, tmp_path):
  rc = call_main(audit.main, ["--workdir", str(tmp_path)], b"", monkeypatch)
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith("mt_flax audit: error:") and "config.json" in err
