r"""Model shapes on the tiny Bible config, as an explicit list of 3 trials.

    ./launch.sh sweep experiments/bible_en_es_tiny.py experiments/sweeps/bible_tiny_depth.py
"""


def get_sweep() -> list[dict]:
  return [
      {"model.num_encoder_layers": 1, "model.num_decoder_layers": 1},
      {"model.num_encoder_layers": 2, "model.num_decoder_layers": 2},
      {"model.num_encoder_layers": 3, "model.num_decoder_layers": 1},
  ]
