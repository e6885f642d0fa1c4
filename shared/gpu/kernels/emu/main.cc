// The CPU emulator's driver: runs kernels.cu launches over a memory image.
//
//   emu IMAGE LAUNCHES   reads IMAGE (device memory, addressed from 0),
//                        runs each line of LAUNCHES, writes IMAGE back.
//
// A launch line: NAME GRID BLOCK SHARED ARG...; an argument is p<offset>
// (a pointer into the image; p0 is null), i<integer> or d<double>.
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <string>

#include "emu.h"

#include "../kernels.cu"

#include "kernels_table.h"
#include "emu_run.h"

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: emu IMAGE LAUNCHES\n");
        return 2;
    }
    std::ifstream in(argv[1], std::ios::binary);
    std::vector<unsigned char> mem((std::istreambuf_iterator<char>(in)), {});
    in.close();
    std::ifstream ls(argv[2]);
    std::string line;
    while (std::getline(ls, line)) {
        if (line.empty()) continue;
        std::istringstream f(line);
        std::string name;
        unsigned grid, block, shared;
        f >> name >> grid >> block >> shared;
        auto k = kernels.find(name);
        if (k == kernels.end() || block % 32 != 0 || block > 1024) {
            std::fprintf(stderr, "emu: bad launch %s\n", line.c_str());
            return 1;
        }
        Args args;
        std::string tok;
        while (f >> tok) {
            // p0 is the null pointer (no allocation starts at 0).
            if (tok[0] == 'p') {
                u64 off = std::stoull(tok.substr(1));
                args.push_back(off == 0 ? 0 : (u64)(uintptr_t)(mem.data() + off));
            }
            else if (tok[0] == 'i') args.push_back((u64)std::stoll(tok.substr(1)));
            else { double d = std::stod(tok.substr(1)); u64 v; std::memcpy(&v, &d, 8); args.push_back(v); }
        }
        if (args.size() != k->second.params) {
            std::fprintf(stderr, "emu: %s takes %zu arguments, launch has %zu\n", name.c_str(), k->second.params, args.size());
            return 1;
        }
        // Dynamic shared memory has a guard zone: a kernel that writes
        // past the plan's Shared bytes fails the run.
        if (std::string err = emu_run_grid(k->second, args, grid, block, shared); !err.empty()) {
            std::fprintf(stderr, "emu: %s: %s\n", name.c_str(), err.c_str());
            return 1;
        }
    }
    std::ofstream out(argv[1], std::ios::binary | std::ios::trunc);
    out.write((const char*)mem.data(), (std::streamsize)mem.size());
    return 0;
}
