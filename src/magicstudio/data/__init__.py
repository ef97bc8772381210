"""Data layer: user photos in, prepared training sets out.

- ``images``: robust loading of any photo, folder listing, crops with a known point mapping;
- ``faces``: backend-neutral face analysis (``FaceAnalyzer``, ``Face``) and the mediapipe backend;
- ``masks``: mask format (``uint8`` 0/255, ``(H, W)``) and utilities (latent downsampling, previews);
- ``prepare``: ``prepare_folder`` / ``load_prepared``, the on-disk prepared set and its manifest;
- ``samples``: bundled public-domain portraits and the demo's photo folders.

Submodules are imported explicitly (``from magicstudio.data.prepare import prepare_folder``) so that
importing one does not pull in torch, OpenCV or mediapipe for the others.
"""
