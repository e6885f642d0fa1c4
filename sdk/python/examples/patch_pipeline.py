"""A UI that already holds a diffusers FluxPipeline hands it to arenahost (a pipeline plugin; torch env)."""
from arenahost import Plugin, Result
from arenahost.diffusers_flux import build_small_pipeline, patch_pipeline, prompt_embeddings

pipe = build_small_pipeline()  # the UI's own pipeline: FluxPipeline.from_pretrained(...) in a real UI
plugin = Plugin("my-ui-flux", "0.1.0", kind="pipeline")
state = {}

@plugin.method("run")
def run(call, args):
    if "report" not in state:  # Linear layers -> arena NF4 weights + LoRA side factors the host binds
        state["report"] = patch_pipeline(pipe, call.host, model=args.get("model", ""))
    pe, pooled = prompt_embeddings(args.get("prompt", ""))
    out = pipe(prompt_embeds=pe, pooled_prompt_embeds=pooled, height=args.get("size", 256), width=args.get("size", 256),
               num_inference_steps=args.get("steps", 4), output_type="np")
    return Result({"summary": state["report"].summary(), "mean": float(out.images.mean())})

if __name__ == "__main__":
    plugin.serve()
