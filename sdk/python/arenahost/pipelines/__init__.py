"""Python-side pipelines (plugins of kind "pipeline") built on the SDK."""
