"""The built-in base models' recipes: how the shipped ``r3v-grid-base`` (grid-count, the demo's)
and ``r3v-clevr-base`` (clevr-synth) were made.

Nothing in r3v's core imports this package; the weights it writes ship as package data in
``r3v/assets/<name>``. Rebuild them with ``python -m r3v.demo.base_model --out DIR`` and
``python -m r3v.demo.grid_base --out DIR``.
"""
