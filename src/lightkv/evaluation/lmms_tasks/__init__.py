"""lmms-eval task definitions shipped with lightkv (``lightkv_shapes.yaml``: the offline shapes QA set).

Not imported by lightkv itself: lmms-eval reads the YAML and loads ``utils.py`` next to it.
"""
