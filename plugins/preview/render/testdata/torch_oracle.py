"""Oracle for plugins/preview/render tests (run with .venv-torch).

Writes into OUTDIR:
  taesd_bare.safetensors      random TAESD decoder weights (16 latent channels,
                              like taef1) under madebyollin/taesd's keys, F32
  taesd_diffusers.safetensors the same weights under diffusers AutoencoderTiny's
                              keys (decoder.layers.{i-1}...), F16 (the weights
                              are fp16-representable so both files are equal)
  latent.bin, decoded.bin     a random [1,16,H,W] latent and the torch decoder's
                              raw output [1,3,8H,8W] (before clamp), fp32 LE
  unpacked.bin, packed.bin    a random [1,16,2h,2w] latent and diffusers'
                              FluxPipeline._pack_latents of it ([1,h*w,64])
  patched.bin                 diffusers' Flux2Pipeline._patchify_latents of a
                              [1,32,2h,2w] latent ([1,128,h,w]); its source is
                              unpacked32.bin
  shapes.json                 the sizes used
The decoder is a copy of madebyollin/taesd taesd.py's Decoder.
The diffusers functions are taken from the installed diffusers source by name
(ast), so the heavy pipeline modules are not imported.
"""
import ast, json, os, sys, importlib.util

import torch
import torch.nn as nn
from safetensors.torch import save_file

out = sys.argv[1]
torch.manual_seed(1234)


def conv(n_in, n_out, **kwargs):
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


def Decoder(latent_channels=4):
    return nn.Sequential(
        Clamp(), conv(latent_channels, 64), nn.ReLU(),
        Block(64, 64), Block(64, 64), Block(64, 64), nn.Upsample(scale_factor=2), conv(64, 64, bias=False),
        Block(64, 64), Block(64, 64), Block(64, 64), nn.Upsample(scale_factor=2), conv(64, 64, bias=False),
        Block(64, 64), Block(64, 64), Block(64, 64), nn.Upsample(scale_factor=2), conv(64, 64, bias=False),
        Block(64, 64), conv(64, 3),
    )


C, H, W = 16, 5, 7
dec = Decoder(C).eval()
with torch.no_grad():
    for p in dec.parameters():
        # Scale up the default init so activations neither vanish nor blow
        # up, then round to fp16-representable values.
        p.mul_(1.7)
        p.copy_(p.half().float())
sd = {k: v.contiguous() for k, v in dec.state_dict().items()}
save_file(sd, os.path.join(out, "taesd_bare.safetensors"))


def diffusers_key(k):
    idx, rest = k.split(".", 1)
    return f"decoder.layers.{int(idx) - 1}.{rest}"


save_file({diffusers_key(k): v.half() for k, v in sd.items()}, os.path.join(out, "taesd_diffusers.safetensors"))

latent = torch.randn(1, C, H, W) * 1.5
with torch.no_grad():
    decoded = dec(latent)
latent.numpy().tofile(os.path.join(out, "latent.bin"))
decoded.numpy().tofile(os.path.join(out, "decoded.bin"))


def diffusers_fn(module, cls, name):
    spec = importlib.util.find_spec("diffusers")
    path = os.path.join(os.path.dirname(spec.origin), *module.split(".")) + ".py"
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for fn in node.body:
                if isinstance(fn, ast.FunctionDef) and fn.name == name:
                    fn.decorator_list = []
                    ns = {"torch": torch}
                    exec(compile(ast.Module(body=[fn], type_ignores=[]), path, "exec"), ns)
                    return ns[name]
    raise SystemExit(f"{path}: {cls}.{name} not found")


pack = diffusers_fn("pipelines.flux.pipeline_flux", "FluxPipeline", "_pack_latents")
patchify = diffusers_fn("pipelines.flux2.pipeline_flux2", "Flux2Pipeline", "_patchify_latents")
h, w = 3, 4
unpacked = torch.randn(1, 16, 2 * h, 2 * w)
packed = pack(unpacked, 1, 16, 2 * h, 2 * w)
assert packed.shape == (1, h * w, 64), packed.shape
unpacked.numpy().tofile(os.path.join(out, "unpacked.bin"))
packed.contiguous().numpy().tofile(os.path.join(out, "packed.bin"))
unpacked32 = torch.randn(1, 32, 2 * h, 2 * w)
patched = patchify(unpacked32)
assert patched.shape == (1, 128, h, w), patched.shape
unpacked32.numpy().tofile(os.path.join(out, "unpacked32.bin"))
patched.contiguous().numpy().tofile(os.path.join(out, "patched.bin"))

json.dump({"C": C, "H": H, "W": W, "grid_h": h, "grid_w": w,
           "decoded_absmax": float(decoded.abs().max()), "decoded_std": float(decoded.std())},
          open(os.path.join(out, "shapes.json"), "w"))
print(json.dumps({"decoded_absmax": float(decoded.abs().max()), "decoded_std": float(decoded.std())}))
