"""Oracle for PythonFloat: reads one float64 bit pattern (hex) per line on
stdin and prints json.dumps of the float per line."""
import json
import struct
import sys

for line in sys.stdin:
    line = line.strip()
    if line:
        print(json.dumps(struct.unpack("<d", bytes.fromhex(line)[::-1])[0]))
