#!/usr/bin/env python3
"""Unpack comfyui-frontend-package's static/ folder from its wheel, without source maps.

Usage: unpack-comfy-frontend.py WHEEL OUTDIR   (make comfy-frontend runs it)
"""
import os
import sys
import zipfile

PREFIX = "comfyui_frontend_package/static/"


def main(wheel: str, out: str) -> None:
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if not name.startswith(PREFIX) or name.endswith("/") or name.endswith(".map"):
                continue
            dst = os.path.join(out, name[len(PREFIX):])
            if os.path.commonpath([os.path.abspath(dst), os.path.abspath(out)]) != os.path.abspath(out):
                sys.exit(f"{wheel}: {name} leaves the output folder")
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(dst, "wb") as f:
                f.write(z.read(name))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
