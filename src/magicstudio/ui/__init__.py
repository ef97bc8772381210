"""``magicstudio ui``: the studio in a browser (Gradio), the top layer: it may import every layer, none imports it.

- ``jobs``: the SQLite job store and the runner (one training subprocess at a time, states derived honestly)
- ``uploads``: photos checked by decoding, stored under server-made names, prepared with their masks
- ``app``: the Gradio page (Studio, Gallery, Runs)
- ``command``: the ``magicstudio ui`` command
"""
