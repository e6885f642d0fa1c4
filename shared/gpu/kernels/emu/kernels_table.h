// kernels_table.h: kernels.cu's entry points by name, with their
// parameter counts, for the emulator's drivers (main.cc, the image runner
// the Go tests use, and fakecuda.cc, the stand-in libcuda). Include it after
// emu.h and kernels.cu.
#pragma once
#include <functional>
#include <map>
#include <string>
#include <vector>

using Args = std::vector<u64>;
static double D(u64 v) { double d; std::memcpy(&d, &v, 8); return d; }
static i64 I(u64 v) { return (i64)v; }

// Each kernel with its parameter count (a launch with another count is
// refused, as cuLaunchKernel would misread it) and its call.
struct Kernel {
    size_t params;
    std::function<void(const Args&)> run;
};

static const std::map<std::string, Kernel> kernels = {
    {"nf4_dequantize", {6, [](const Args& a) { nf4_dequantize(a[0], a[1], I(a[2]), I(a[3]), a[4], I(a[5])); }}},
    {"nf4_quantize", {6, [](const Args& a) { nf4_quantize(a[0], I(a[1]), I(a[2]), a[3], a[4], I(a[5])); }}},
    {"nested_dequantize", {6, [](const Args& a) { nested_dequantize(a[0], a[1], a[2], D(a[3]), I(a[4]), a[5]); }}},
    {"nested_quantize", {6, [](const Args& a) { nested_quantize(a[0], I(a[1]), D(a[2]), a[3], a[4], a[5]); }}},
    {"absmax_sum", {3, [](const Args& a) { absmax_sum(a[0], I(a[1]), a[2]); }}},
    {"nf4_fuse", {13, [](const Args& a) { nf4_fuse(a[0], a[1], I(a[2]), I(a[3]), I(a[4]), a[5], a[6], I(a[7]), I(a[8]), I(a[9]), I(a[10]), I(a[11]), a[12]); }}},
    {"nf4_fuse_stats", {14, [](const Args& a) { nf4_fuse_stats(a[0], a[1], I(a[2]), I(a[3]), I(a[4]), a[5], a[6], I(a[7]), I(a[8]), I(a[9]), I(a[10]), I(a[11]), a[12], a[13]); }}},
    {"nf4_fuse2d", {11, [](const Args& a) { nf4_fuse2d(a[0], a[1], I(a[2]), I(a[3]), I(a[4]), a[5], a[6], I(a[7]), I(a[8]), I(a[9]), a[10]); }}},
    {"nf4_fuse2d_direct", {11, [](const Args& a) { nf4_fuse2d_direct(a[0], a[1], I(a[2]), I(a[3]), I(a[4]), a[5], a[6], I(a[7]), I(a[8]), I(a[9]), a[10]); }}},
    {"nf4_fuse2d_stats", {12, [](const Args& a) { nf4_fuse2d_stats(a[0], a[1], I(a[2]), I(a[3]), I(a[4]), a[5], a[6], I(a[7]), I(a[8]), I(a[9]), a[10], a[11]); }}},
    {"side_rows", {5, [](const Args& a) { side_rows(a[0], I(a[1]), I(a[2]), D(a[3]), a[4]); }}},
    {"side_cols", {10, [](const Args& a) { side_cols(a[0], I(a[1]), I(a[2]), I(a[3]), I(a[4]), D(a[5]), a[6], I(a[7]), I(a[8]), I(a[9])); }}},
};

