"""Dense head families: one module each (``fcos``, ``retinanet``, ``atss``), their descriptions in ``spec``.

Adding a family: its head module here, its :class:`~fcos_offline.model.heads.spec.HeadSpec` in
``spec.py``, its line in ``model.detector.HEADS`` (see docs/architecture.md).
"""
