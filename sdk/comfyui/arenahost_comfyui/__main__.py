"""`python -m arenahost_comfyui install COMFYUI_DIR`: after `pip install`, register the nodes with a ComfyUI.

ComfyUI loads node packs only from its custom_nodes/ folders; this writes
custom_nodes/arenahost/__init__.py, two lines that import the installed
package's nodes. (Linking or copying sdk/comfyui itself into custom_nodes/
works too, without pip.)
"""

import sys
from pathlib import Path

STUB = '"""arenahost nodes, installed with pip (python -m arenahost_comfyui install)."""\n' \
       "from arenahost_comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "install":
        print("usage: python -m arenahost_comfyui install COMFYUI_DIR", file=sys.stderr)
        return 2
    root = Path(argv[1]).expanduser()
    cn = root / "custom_nodes"
    if not cn.is_dir():
        print(f"{root}: no custom_nodes/ folder; pass ComfyUI's directory (or its --base-directory)", file=sys.stderr)
        return 1
    d = cn / "arenahost"
    if d.exists() and not (d / "__init__.py").read_text(errors="replace").startswith('"""arenahost nodes, installed with pip'):
        print(f"{d} exists and is not this stub (a linked copy of sdk/comfyui?); leaving it alone", file=sys.stderr)
        return 1
    d.mkdir(exist_ok=True)
    (d / "__init__.py").write_text(STUB)
    print(f"wrote {d / '__init__.py'}; restart ComfyUI")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
