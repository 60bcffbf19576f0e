"""The command line: one module per ``python -m mt_flax <command>``.

Each module holds only its argparse part: ``build_parser()``, ``run(args)``
and ``main = cli.entry(...)`` (see :mod:`mt_flax.cli`). ``run`` turns the
parsed flags into explicit arguments of library functions; nothing below this
package sees an argparse Namespace or imports it.
"""
