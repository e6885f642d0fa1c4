"""Decode images with Pillow (libjpeg/zlib) for plugins/preview/render tests.

Usage: pil_decode.py FILE...  Prints one JSON line per file:
{"file", "format", "size": [w, h], "mode", "sha256" of the decoded RGB pixels}.
"""
import hashlib, json, sys

from PIL import Image

for path in sys.argv[1:]:
    with Image.open(path) as im:
        im.load()
        rgb = im.convert("RGB")
        print(json.dumps({"file": path, "format": im.format, "size": list(im.size), "mode": im.mode,
                          "sha256": hashlib.sha256(rgb.tobytes()).hexdigest()}))
