"""The command layer: one module per ``python -m mt_flax COMMAND``, flags only."""
