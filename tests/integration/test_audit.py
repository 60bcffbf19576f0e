"""`mt_flax audit` and the invariance checks: pass on correct masks, fail on wrong ones."""
import numpy as np
import pytest

from mt_flax import invariance, masks
from mt_flax.commands import audit

CHECK_NAMES = ["causality", "padding-content", "padding-length", "batch-independence",
               "cross-length", "cached-decoding"]


@pytest.fixture(scope="module")
def tiny(tiny_model):
  return tiny_model(num_encoder_layers=1, num_decoder_layers=1)


def test_audit_command_passes_on_the_trained_run(trained_run, call_main, capsys):
  code = call_main(audit.main, ["--workdir", trained_run, "--batches", "1", "--rows", "3"])
  out, err = capsys.readouterr()
  assert code == 0, out + err[-2000:]
  for name in CHECK_NAMES:
    assert f"PASS {name}:" in out
  assert "all checks passed" in out


def test_the_keras_cross_mask_fails_cross_length_and_padding(tiny, ragged_batch, keras_cross_mask,
                                                             monkeypatch):
  src, tgt = ragged_batch(1, s_len=8, t_len=8)    # equal widths: no shape error to hide behind
  monkeypatch.setattr(masks, "cross_mask", keras_cross_mask)
  results = {r.name: r for r in invariance.run_checks(*tiny, src, tgt,
                                                      names=("cross-length", "padding-length"))}
  assert not results["cross-length"].passed and not results["padding-length"].passed


def test_a_missing_causal_mask_fails_causality(tiny, ragged_batch, monkeypatch):
  monkeypatch.setattr(masks, "causal_mask", lambda n: np.ones((1, 1, n, n), bool))
  result, = invariance.run_checks(*tiny, *ragged_batch(2), names=("causality",))
  assert not result.passed and result.max_change > result.tolerance


def test_an_unmasked_source_padding_fails_padding_content(tiny, ragged_batch, monkeypatch):
  monkeypatch.setattr(masks, "cross_mask",
                      lambda tgt, src, *a: masks.padding_mask(tgt != 0, np.ones(src.shape, bool)))
  result, = invariance.run_checks(*tiny, *ragged_batch(3), names=("padding-content",))
  assert not result.passed


def test_audit_exits_nonzero_when_a_check_fails(trained_run, call_main, keras_cross_mask,
                                                monkeypatch, capsys):
  monkeypatch.setattr(masks, "cross_mask", keras_cross_mask)
  rc = call_main(audit.main, ["--workdir", trained_run, "--batches", "1", "--rows", "3"])
  out = capsys.readouterr().out
  assert rc == 1 and "FAIL cross-length" in out and "FAILED:" in out


def test_audit_reports_bad_input_in_one_line(call_main, capsys, tmp_path):
  rc = call_main(audit.main, ["--workdir", str(tmp_path)])
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith("mt_flax audit: error:") and "config.json" in err
