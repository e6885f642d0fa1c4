// Package render owns turning one diffusion latent into a preview image: the
// published latent-to-RGB factor tables (SD1.5, SDXL, SD3, FLUX.1, FLUX.2),
// model-family detection from the channel count, unpacking of latents packed
// 2×2 into 4·C channels (diffusers token-major and channel-major), fp32/bf16/
// fp16 input, upscaling to the output size, JPEG/PNG encoding, and an
// optional TAESD/TAEF1 decoder for users who provide its weights.
//
// Latents are expected in the diffusion model's latent space (ComfyUI's
// `process_in` space: SD1.5 raw×0.18215, FLUX.1 (raw−0.1159)×0.3611, ...):
// the same tensor the sampler denoises, preferably the predicted x0. Only the
// first batch item is rendered.
//
// The package is pure computation: no I/O besides reading a decoder weights
// file, no globals that a job can change. Everything a render depends on is
// in its Options.
package render
