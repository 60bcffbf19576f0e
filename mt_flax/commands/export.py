r"""Export a trained run for serving: ``python -m mt_flax export --workdir DIR --format ctranslate2
--out OUT [--checkpoint best|latest|averaged] [--quantization int8|float16|...] [--force]``.

Writes a CTranslate2 model folder (``model.bin``, ``config.json``, vocabularies),
the SentencePiece models, and a README with the two lines of Python that
translate with it. Greedy outputs are mt_flax's; how beam search relates is in
that README (and in :mod:`mt_flax.export`). Needs the ``ctranslate2`` extra.
"""
from __future__ import annotations

from mt_flax import cli, export
from mt_flax.inference import load_trained


def build_parser():
  parser = cli.new_parser("export", __doc__)
  cli.add_workdir_args(parser)
  parser.add_argument("--format", choices=export.FORMATS, default="ctranslate2",
                      help="output format (default ctranslate2)")
  parser.add_argument("--out", required=True, help="output folder (local)")
  parser.add_argument("--quantization", choices=export.QUANTIZATIONS, default=None,
                      help="weight type of the exported model (default float32)")
  parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
  return parser


def run(args) -> int:
  trained = load_trained(args.workdir, which=args.checkpoint)
  info = export.export_ctranslate2(trained, args.out, quantization=args.quantization,
                                   force=args.force)
  print(f"exported {info['params']} of {args.workdir} to {args.out} "
        f"({info['quantization']}, {info['bytes'] / 1e6:.2f} MB); see {args.out}/README.md")
  return 0


main = cli.entry("export", build_parser, run)
