"""The built-in demo's recipe: how the shipped base model ``r3v-clevr-base`` was made.

Nothing in r3v's core imports this package; the weights it writes ship as package data in
``r3v/assets/r3v-clevr-base``. Rebuild them with ``python -m r3v.demo.base_model --out DIR``.
"""
