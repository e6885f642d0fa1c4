package render

import (
	"fmt"
	"slices"
)

// Family names a latent format, which fixes its channel count and its
// latent-to-RGB factors.
type Family string

// The families with published factors.
const (
	FamilySD15  Family = "sd15"  // Stable Diffusion 1.x/2.x, 4 channels
	FamilySDXL  Family = "sdxl"  // SDXL, 4 channels
	FamilySD3   Family = "sd3"   // SD3/3.5, 16 channels
	FamilyFlux  Family = "flux"  // FLUX.1, 16 channels (64 when packed 2×2)
	FamilyFlux2 Family = "flux2" // FLUX.2, 32 channels (128 when packed 2×2)
)

// Factors is one family's linear latent-to-RGB map: for each latent pixel x
// (one value per channel) rgb = Σ_c x[c]·RGB[c] + Bias, in [-1, 1] for a
// well-behaved latent.
type Factors struct {
	Family Family
	// Source cites where the numbers were published.
	Source string
	// RGB has one row [R, G, B] per (unpacked) latent channel.
	RGB [][3]float32
	// Bias is zero where none is published.
	Bias [3]float32
}

// Channels is the unpacked latent channel count the factors apply to.
func (f Factors) Channels() int { return len(f.RGB) }

// PackedChannels is the channel count of the same latent packed 2×2
// (4·Channels): a FLUX.1 latent packed by diffusers has 64, a FLUX.2 latent
// as its sampler sees it has 128.
func (f Factors) PackedChannels() int { return 4 * len(f.RGB) }

// Packable reports whether the family's latents are ever packed 2×2 (FLUX.1
// by diffusers' _pack_latents, FLUX.2 by its sampler).
func (f Family) Packable() bool { return f == FamilyFlux || f == FamilyFlux2 }

// factorTables holds the exact values of Comfy-Org/ComfyUI
// comfy/latent_formats.py (master), class by class. The tests compare them
// with testdata/factors.json (extracted from a copy of the published tables)
// and spot-check entries typed from the source.
var factorTables = map[Family]Factors{
	FamilySD15: {
		Family: FamilySD15,
		// Comfy-Org/ComfyUI comfy/latent_formats.py: latent_rgb_factors of class SD15; no bias published.
		Source: "Comfy-Org/ComfyUI comfy/latent_formats.py SD15",
		RGB: [][3]float32{
			{0.3512, 0.2297, 0.3227}, {0.3250, 0.4974, 0.2350}, {-0.2829, 0.1762, 0.2721}, {-0.2120, -0.2616, -0.7177},
		},
		Bias: [3]float32{0.0000, 0.0000, 0.0000},
	},
	FamilySDXL: {
		Family: FamilySDXL,
		// Comfy-Org/ComfyUI comfy/latent_formats.py: latent_rgb_factors and latent_rgb_factors_bias of class SDXL.
		Source: "Comfy-Org/ComfyUI comfy/latent_formats.py SDXL",
		RGB: [][3]float32{
			{0.3651, 0.4232, 0.4341}, {-0.2533, -0.0042, 0.1068}, {0.1076, 0.1111, -0.0362}, {-0.3165, -0.2492, -0.2188},
		},
		Bias: [3]float32{0.1084, -0.0175, -0.0011},
	},
	FamilySD3: {
		Family: FamilySD3,
		// Comfy-Org/ComfyUI comfy/latent_formats.py: latent_rgb_factors and latent_rgb_factors_bias of class SD3.
		Source: "Comfy-Org/ComfyUI comfy/latent_formats.py SD3",
		RGB: [][3]float32{
			{-0.0922, -0.0175, 0.0749}, {0.0311, 0.0633, 0.0954}, {0.1994, 0.0927, 0.0458}, {0.0856, 0.0339, 0.0902},
			{0.0587, 0.0272, -0.0496}, {-0.0006, 0.1104, 0.0309}, {0.0978, 0.0306, 0.0427}, {-0.0042, 0.1038, 0.1358},
			{-0.0194, 0.0020, 0.0669}, {-0.0488, 0.0130, -0.0268}, {0.0922, 0.0988, 0.0951}, {-0.0278, 0.0524, -0.0542},
			{0.0332, 0.0456, 0.0895}, {-0.0069, -0.0030, -0.0810}, {-0.0596, -0.0465, -0.0293}, {-0.1448, -0.1463, -0.1189},
		},
		Bias: [3]float32{0.2394, 0.2135, 0.1925},
	},
	FamilyFlux: {
		Family: FamilyFlux,
		// Comfy-Org/ComfyUI comfy/latent_formats.py: latent_rgb_factors and latent_rgb_factors_bias of class Flux.
		Source: "Comfy-Org/ComfyUI comfy/latent_formats.py Flux",
		RGB: [][3]float32{
			{-0.0346, 0.0244, 0.0681}, {0.0034, 0.0210, 0.0687}, {0.0275, -0.0668, -0.0433}, {-0.0174, 0.0160, 0.0617},
			{0.0859, 0.0721, 0.0329}, {0.0004, 0.0383, 0.0115}, {0.0405, 0.0861, 0.0915}, {-0.0236, -0.0185, -0.0259},
			{-0.0245, 0.0250, 0.1180}, {0.1008, 0.0755, -0.0421}, {-0.0515, 0.0201, 0.0011}, {0.0428, -0.0012, -0.0036},
			{0.0817, 0.0765, 0.0749}, {-0.1264, -0.0522, -0.1103}, {-0.0280, -0.0881, -0.0499}, {-0.1262, -0.0982, -0.0778},
		},
		Bias: [3]float32{-0.0329, -0.0718, -0.0851},
	},
	FamilyFlux2: {
		Family: FamilyFlux2,
		// Comfy-Org/ComfyUI comfy/latent_formats.py: latent_rgb_factors and latent_rgb_factors_bias of class Flux2 (32 rows, applied after latent_rgb_factors_reshape unpacks 128 channels).
		Source: "Comfy-Org/ComfyUI comfy/latent_formats.py Flux2",
		RGB: [][3]float32{
			{0.0058, 0.0113, 0.0073}, {0.0495, 0.0443, 0.0836}, {-0.0099, 0.0096, 0.0644}, {0.2144, 0.3009, 0.3652},
			{0.0166, -0.0039, -0.0054}, {0.0157, 0.0103, -0.0160}, {-0.0398, 0.0902, -0.0235}, {-0.0052, 0.0095, 0.0109},
			{-0.3527, -0.2712, -0.1666}, {-0.0301, -0.0356, -0.0180}, {-0.0107, 0.0078, 0.0013}, {0.0746, 0.0090, -0.0941},
			{0.0156, 0.0169, 0.0070}, {-0.0034, -0.0040, -0.0114}, {0.0032, 0.0181, 0.0080}, {-0.0939, -0.0008, 0.0186},
			{0.0018, 0.0043, 0.0104}, {0.0284, 0.0056, -0.0127}, {-0.0024, -0.0022, -0.0030}, {0.1207, -0.0026, 0.0065},
			{0.0128, 0.0101, 0.0142}, {0.0137, -0.0072, -0.0007}, {0.0095, 0.0092, -0.0059}, {0.0000, -0.0077, -0.0049},
			{-0.0465, -0.0204, -0.0312}, {0.0095, 0.0012, -0.0066}, {0.0290, -0.0034, 0.0025}, {0.0220, 0.0169, -0.0048},
			{-0.0332, -0.0457, -0.0468}, {-0.0085, 0.0389, 0.0609}, {-0.0076, 0.0003, -0.0043}, {-0.0111, -0.0460, -0.0614},
		},
		Bias: [3]float32{-0.0329, -0.0718, -0.0851},
	},
}

// Families lists the families with factors, in a stable order.
func Families() []Family {
	return []Family{FamilySD15, FamilySDXL, FamilySD3, FamilyFlux, FamilyFlux2}
}

// FactorsFor returns a copy of the family's factor table.
func FactorsFor(f Family) (Factors, error) {
	t, ok := factorTables[f]
	if !ok {
		return Factors{}, fmt.Errorf("family %q: unknown (known: %v)", f, Families())
	}
	t.RGB = slices.Clone(t.RGB)
	return t, nil
}

// Detect infers the family from a latent's channel count (for a token-major
// latent: its feature count), and whether that count means packed 2×2. It
// returns an error where the count is ambiguous (4: SD1.5 or SDXL; 16: SD3 or
// FLUX.1), where the job must name the family, or unknown.
func Detect(channels int, layout Layout) (Family, bool, error) {
	if layout == TokenMajor {
		switch channels {
		case 64:
			return FamilyFlux, true, nil
		case 128:
			return FamilyFlux2, true, nil
		}
		return "", false, fmt.Errorf("token-major latent with %d features: only 64 (flux packed) and 128 (flux2 packed) are known", channels)
	}
	switch channels {
	case 4:
		return "", false, fmt.Errorf("%d channels: ambiguous between %s and %s; the job must name the family", channels, FamilySD15, FamilySDXL)
	case 16:
		return "", false, fmt.Errorf("%d channels: ambiguous between %s and %s; the job must name the family", channels, FamilySD3, FamilyFlux)
	case 32:
		return FamilyFlux2, false, nil
	case 64:
		return FamilyFlux, true, nil
	case 128:
		return FamilyFlux2, true, nil
	}
	return "", false, fmt.Errorf("%d channels: no known family (4 sd15/sdxl, 16 sd3/flux, 32 flux2, 64 flux packed, 128 flux2 packed)", channels)
}

// resolve checks a named family against the channel count, or detects it
// when none is named, and reports whether the latent is packed 2×2.
func resolve(named Family, channels int, layout Layout) (Factors, bool, error) {
	if named == "" {
		fam, packed, err := Detect(channels, layout)
		if err != nil {
			return Factors{}, false, err
		}
		return factorTables[fam], packed, nil
	}
	t, ok := factorTables[named]
	if !ok {
		return Factors{}, false, fmt.Errorf("family %q: unknown (known: %v)", named, Families())
	}
	switch {
	case layout == TokenMajor && named.Packable() && channels == t.PackedChannels():
		return t, true, nil
	case layout == TokenMajor:
		return Factors{}, false, fmt.Errorf("family %s: token-major latent with %d features, want %d (packed 2×2)", named, channels, t.PackedChannels())
	case channels == t.Channels():
		return t, false, nil
	case named.Packable() && channels == t.PackedChannels():
		return t, true, nil
	case named.Packable():
		return Factors{}, false, fmt.Errorf("family %s: %d channels, want %d (or %d packed 2×2)", named, channels, t.Channels(), t.PackedChannels())
	}
	return Factors{}, false, fmt.Errorf("family %s: %d channels, want %d", named, channels, t.Channels())
}
