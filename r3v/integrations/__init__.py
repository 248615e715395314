"""Bridges to other tools: lmms-eval (model + task exports) and merged checkpoints for any engine.

This package's ``__init__`` stays import-light: lmms-eval loads :func:`lmms_eval_models` through
its ``lmms_eval.models`` entry point while it builds its own model registry, so nothing heavy
(torch, lmms-eval's model base class) may be imported here.
"""

from __future__ import annotations

#: The model name lmms-eval knows r3v by: ``lmms-eval --model r3v --model_args ...``.
LMMS_MODEL_NAME = "r3v"
LMMS_MODEL_CLASS = "r3v.integrations.lmms_eval.R3VLmms"


def lmms_eval_models():
    """The ``lmms_eval.models`` entry point: a manifest naming r3v's lmms-eval model class.

    lmms-eval 0.7.3 accepts a ``ModelManifest``, an iterable of them, or a callable returning
    either; the class itself is imported only when an evaluation asks for ``--model r3v``.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=LMMS_MODEL_NAME, simple_class_path=LMMS_MODEL_CLASS)
