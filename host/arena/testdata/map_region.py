"""Map an arena region the way a Python plugin does and check the host's data.

usage: map_region.py PATH SIZE OFFSET COUNT

The host wrote float32 values i * 0.5 for i in range(COUNT) at OFFSET of the
segment file PATH (SIZE bytes). This maps the whole segment (MAP_SHARED),
checks them through a zero-copy numpy view, then negates them in place so
the host can see the write.
"""
import mmap
import os
import sys

import numpy as np


def main() -> None:
    path, size, offset, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    fd = os.open(path, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    view = np.frombuffer(mm, dtype=np.float32, count=count, offset=offset)
    want = np.arange(count, dtype=np.float32) * np.float32(0.5)
    if not np.array_equal(view, want):
        bad = int(np.flatnonzero(view != want)[0])
        sys.exit(f"element {bad} is {view[bad]}, want {want[bad]}")
    np.negative(view, out=view)
    del view
    mm.close()
    print("python ok")


if __name__ == "__main__":
    main()
